"""The README's cluster command lines on a real one-node SLURM cluster (tests/slurm/cluster.sh up; `make test-slurm`):
a sweep, time limits and preemption requeues, DDP over SLURM tasks, a failing job, a signal during start-up (issue 18).

SLURM's own signals, time limits and requeues throughout; the cluster's timers are shortened (a requeued job may start
again after 10 s, not 120: its job credentials expire sooner; tests/slurm/cluster.sh)."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from wandb_files import run_segments

ROOT = Path(__file__).resolve().parents[1]


def cluster_reason() -> str | None:
    """Why no cluster can be used here (None: sinfo answers and a node is up)."""
    if shutil.which("sbatch") is None:
        return "no SLURM here (sbatch not found); bash tests/slurm/cluster.sh up starts a one-node cluster"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed ({error}); bash tests/slurm/cluster.sh up"
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no SLURM node up (sinfo: {states or 'nothing'}); bash tests/slurm/cluster.sh up"
    return None


REASON = cluster_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.xdist_group("slurm")]

# Each job: one CPU, 2 GB, the cluster's debug partition; jobs side by side on the node.
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
PACE = ["+callbacks.pace._target_=pace.Pace"]  # tests/slurm/pace.py: a step takes at least +callbacks.pace.seconds


def environment(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_SERVICE", "SLURM_", "PYTEST_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'tests' / 'slurm'}{os.pathsep}{env.get('PYTHONPATH', '')}",
               HOME=str(tmp_path / "home"), WANDB_MODE="offline", DDPM_CACHE=str(tmp_path / "cache"))
    return env


def sweep(tmp_path: Path, *overrides: str, timeout: int = 420, background: bool = False):
    """``python -m ddpm.train --multirun <the SLURM launcher> <overrides>``, from tmp_path, as a user types it."""
    command = [sys.executable, "-m", "ddpm.train", "--multirun", *SLURM, *TINY, *overrides,
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if background:
        return subprocess.Popen(command, cwd=tmp_path, env=environment(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True, timeout=timeout)


def job_ids(sweep_dir: Path) -> list[str]:
    """The SLURM ids of the sweep's jobs (an array: ``8_0``, ``8_1``), from submitit's folders."""
    folder = sweep_dir / ".submitit"
    return sorted(p.parent.name for p in folder.glob("*/*_submitted.pkl")) if folder.is_dir() else []


def job_log(sweep_dir: Path, job: str, task: int = 0) -> str:
    """What a task of a job wrote, every segment of it: its stderr (SLURM's, submitit's, Lightning's lines), then its
    stdout (ddpm's log lines)."""
    paths = [sweep_dir / ".submitit" / job / f"{job}_{task}_log.{stream}" for stream in ("err", "out")]
    return "\n".join(path.read_text(errors="replace") for path in paths if path.is_file())


def wait_running(sweep_dir: Path, launcher: subprocess.Popen, timeout: float = 120) -> str:
    """The first job of the sweep once SLURM runs it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the sweep ended before a job ran: {launcher.stdout.read()[-3000:]}")
        for job in job_ids(sweep_dir):
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
            if state == "RUNNING":
                return job
        time.sleep(0.2)
    raise AssertionError(f"no job of {sweep_dir} ran within {timeout} s")


def final_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def test_a_two_job_sweep_finishes_with_a_directory_each_and_a_report(tmp_path):
    result = sweep(tmp_path, "seed=0,1", "trainer.max_steps=20")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweep_dir = tmp_path / "sweep"
    assert "job 0 (seed=0" in result.stdout and "job 1 (seed=1" in result.stdout and ": finished" in result.stdout
    assert len(job_ids(sweep_dir)) == 2
    for job in ("0", "1"):
        assert final_step(sweep_dir / job) == 20 and (sweep_dir / job / "samples" / "final.png").is_file()
    report = subprocess.run([sys.executable, "-m", "ddpm.report", str(sweep_dir)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=environment(tmp_path))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (sweep_dir / "report.md").is_file() and "seed" in (sweep_dir / "runs.csv").read_text()


def test_a_job_that_hits_its_time_limit_is_requeued_again_and_again_and_is_one_wandb_run(tmp_path):
    """A 1-minute limit with USR2 20 s before it: SLURM signals each segment, last.ckpt is written, the wandb run is
    finished, submitit requeues the job, the next segment resumes. SLURM's background check (every 30 s) signals once
    the end is within signal_delay_s + 30 s, so 10 to 40 s into a segment: after start-up has installed the handlers
    (a 30-s delay let the signal land 0.1 s into a job, before Python ran, and the task died of it), and soon enough
    that 700 steps of at least 0.1 s cannot fit in fewer than three segments. Read back: one wandb id over every
    segment, each finished, every step logged once, in order."""
    total = 700
    result = sweep(tmp_path, *PACE, "+callbacks.pace.seconds=0.1", f"trainer.max_steps={total}", "logger=wandb",
                   "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=20", timeout=600)
    sweep_dir = tmp_path / "sweep"
    (job,) = job_ids(sweep_dir)
    log = job_log(sweep_dir, job)
    assert result.returncode == 0, result.stdout[-2000:] + log[-4000:]
    # Every segment that SLURM signalled, whether at a step or still starting (then it stops as it begins, same step).
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR2 at step (\d+)", log)]
    assert len(stops) >= 2 and stops == sorted(stops), stops  # timed out and requeued more than once
    assert final_step(sweep_dir / "0") == total
    segments = run_segments(sweep_dir / "0" / "wandb")
    assert len(segments) == len(stops) + 1
    assert {i for s in segments for i in s["run_ids"]} == {(sweep_dir / "0" / "wandb" / "run_id").read_text().strip()}
    assert all(s["finished"] for s in segments), [s["folder"] for s in segments if not s["finished"]]
    steps = [row["trainer/global_step"] for s in segments for row in s["history"] if "train/loss" in row]
    assert steps == list(range(total))
    assert "Traceback" not in log and "Problem finishing run" not in log


def test_a_job_preempted_by_scontrol_requeue_at_a_random_step_resumes(tmp_path):
    running = sweep(tmp_path, *PACE, "+callbacks.pace.seconds=0.05", "trainer.max_steps=500", background=True)
    sweep_dir = tmp_path / "sweep"
    job = wait_running(sweep_dir, running)
    deadline = time.time() + 120
    while not list((sweep_dir / "0" / "ema_snapshots").glob("ema_*.pt")) and time.time() < deadline:
        time.sleep(0.2)  # until training writes its first EMA snapshot (step 13)
    time.sleep(random.Random().uniform(0, 15))  # then somewhere in its 25 s of training
    subprocess.run(["scontrol", "requeue", job], check=True)
    output, _ = running.communicate(timeout=420)
    log = job_log(sweep_dir, job)
    assert running.returncode == 0, output[-2000:] + log[-4000:]
    (stopped,) = [int(s) for s in re.findall(r"SIGTERM at step (\d+): saved", log)]
    assert 0 < stopped < 500
    assert f"(step {stopped}; resume=auto)" in log  # the requeued job resumed from it
    assert final_step(sweep_dir / "0") == 500


def test_ddp_over_two_slurm_tasks_finishes_with_both_ranks(tmp_path):
    result = sweep(tmp_path, "trainer=ddp_cpu", "trainer.max_steps=10", "trainer.enable_progress_bar=false")
    sweep_dir = tmp_path / "sweep"
    (job,) = job_ids(sweep_dir)
    assert result.returncode == 0, result.stdout[-2000:] + job_log(sweep_dir, job)[-3000:]
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in job_log(sweep_dir, job, task=rank)
    assert final_step(sweep_dir / "0") == 10


def test_a_failing_job_is_failed_in_the_summary_with_its_own_line_and_the_other_finishes(tmp_path):
    result = sweep(tmp_path, "data.batch_size=32,5000", "trainer.max_steps=10")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"job 0 \(.*data.batch_size=32.*\): finished", result.stdout), result.stdout[-2000:]
    assert re.search(r"job 1 \(.*data.batch_size=5000.*\): failed: data.batch_size=5000: larger than the training set",
                     result.stdout), result.stdout[-2000:]
    assert result.stderr.strip().splitlines()[-1] == ("error: 1 of 2 jobs failed (listed above, each with its own "
                                                      "error); the others finished")
    assert "Traceback" not in result.stderr
    assert final_step(tmp_path / "sweep" / "0") == 10


def test_a_signal_during_start_up_requeues_the_job(tmp_path):
    """USR2 three seconds into the job, while ddpm.train is still importing torch and Lightning (about 5 s): submitit's
    handler is installed by then (ddpm.train's module is light), so the job is requeued instead of dying of it."""
    running = sweep(tmp_path, "trainer.max_steps=20", background=True)
    sweep_dir = tmp_path / "sweep"
    job = wait_running(sweep_dir, running)
    time.sleep(3)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    output, _ = running.communicate(timeout=300)
    log = job_log(sweep_dir, job)
    assert running.returncode == 0, output[-2000:] + log[-4000:]
    assert "Caught signal SIGUSR2" in log and "DUE TO JOB REQUEUE" in log, log[-3000:]
    assert final_step(sweep_dir / "0") == 20
