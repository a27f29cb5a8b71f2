"""Issue 18, item 3: one training run is one wandb run, across preemptions and resumes, read back from the files wandb
wrote offline; and a run whose wandb service died of the job's SIGTERM ends without a traceback."""

import os
import subprocess
import sys
import textwrap

import pytest
from test_train import KillAt
from wandb_files import run_segments

from ddpm.core.errors import ConfigError
from ddpm.train import train
from ddpm.training.loggers import run_id


def test_a_run_killed_and_resumed_is_one_wandb_run_with_one_step_axis(tiny_cfg, tmp_path, offline_env):
    """Killed by SIGTERM at step 17 and at step 41, resumed each time in its directory: three offline segments of one
    run id (the one in <run>/wandb/run_id), each finished, whose rows hold every step once, in order, the wandb step
    equal to the trainer's; `wandb sync --dry-run` sees one run."""
    common = ["logger=wandb", "trainer.max_steps=60", "~callbacks.sample_grid", "~callbacks.lr_monitor"]
    for step in (17, 41):
        with pytest.raises(SystemExit):
            train(tiny_cfg(*common), [KillAt(step)])
    train(tiny_cfg(*common))

    wandb_dir = tmp_path / "run" / "wandb"
    segments = run_segments(wandb_dir)
    assert len(segments) == 3
    assert all(s["run_ids"] == {(wandb_dir / "run_id").read_text().strip()} for s in segments)
    assert all(s["finished"] for s in segments)  # each segment's service wrote its exit record: nothing left unflushed
    loss_rows = [row for s in segments for row in s["history"] if "train/loss" in row]
    steps = [row["trainer/global_step"] for row in loss_rows]
    assert steps == list(range(60))  # trainer=debug logs every step: each once, in order, across the segments
    assert all(row["_step"] == row["trainer/global_step"] for row in loss_rows)
    first_of = [s["history"][0]["trainer/global_step"] for s in segments if s["history"]]
    assert first_of == [0, 17, 41]  # each segment continues at its resumed step

    dry = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", *map(str, sorted(wandb_dir.glob("offline-run-*")))],
                         capture_output=True, text=True, cwd=tmp_path, env=offline_env, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]


def test_the_run_id_file_is_an_input_and_is_refused_when_it_is_not_an_id(tmp_path):
    made = run_id(tmp_path)
    assert run_id(tmp_path) == made and len(made) == 8
    assert [p.name for p in (tmp_path / "wandb").iterdir()] == ["run_id"]  # no temporary left beside it
    for bad in ("../other", "", "A" * 3, "x" * 65, "id\nmore"):
        (tmp_path / "wandb" / "run_id").write_text(bad)
        with pytest.raises(ConfigError, match=r"run_id should hold this run's wandb id \(1-64 of a-z, 0-9\)"):
            run_id(tmp_path)
    (tmp_path / "wandb" / "run_id").unlink()
    os.symlink(tmp_path / "elsewhere", tmp_path / "wandb" / "run_id")
    with pytest.raises(ConfigError, match="remove it to start a new wandb run"):
        run_id(tmp_path)


def test_segments_starting_at_once_agree_on_one_run_id(tmp_path):
    """Two processes making the id of one run directory at the same moment: one id is written, whole, and both
    return it (the file is linked into place, never created empty and filled)."""
    script = f"from ddpm.training.loggers import run_id; print(run_id({str(tmp_path)!r}))"
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    ids = {run.communicate(timeout=120)[0].strip() for run in runs}
    assert ids == {(tmp_path / "wandb" / "run_id").read_text().strip()}


def test_a_run_whose_wandb_service_died_of_the_signal_ends_without_a_traceback(tmp_path, offline_env):
    """SLURM's SIGTERM reaches every process of a job: wandb's service (a Go program, which cannot be shielded from it)
    dies at once. finish_wandb then lets the run go with one warning, where wandb.finish would print a
    ConnectionResetError traceback (issue 18, item 3). What was flushed before (every flush_interval_s) is in the file."""
    script = textwrap.dedent(f"""
        import logging, signal, time
        logging.basicConfig(level=logging.WARNING)
        from wandb.sdk import wandb_setup
        from ddpm.training.loggers import finish_wandb, wandb_logger
        logger = wandb_logger(project="p", save_dir={str(tmp_path)!r}, mode="offline", flush_interval_s=0.2)
        for step in range(50):
            logger.log_metrics({{"loss": 1.0 / (step + 1)}}, step=step)
        time.sleep(1.5)
        process = wandb_setup.singleton()._connection._proc._process
        process.send_signal(signal.SIGTERM)
        process.wait()
        logger.log_metrics({{"loss": 0.0}}, step=50)  # the step the run was on when the signal came
        finish_wandb()
        print("exited cleanly")
    """)
    env = {k: v for k, v in offline_env.items() if k != "WANDB_SERVICE"}  # its own service, as a job has (not pytest's)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "exited cleanly" in result.stdout, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ConnectionResetError" not in result.stderr, result.stderr[-3000:]
    assert "wandb: its service stopped before the run finished" in result.stderr
    (segment,) = run_segments(tmp_path / "wandb")
    assert [row["trainer/global_step"] for row in segment["history"]] == list(range(49))  # flushed: all but the open row
