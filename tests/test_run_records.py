"""A run folder's record (``.hydra/``, the log) is written only by the command that owns the folder (issue 29, item 2):
a refused command, or the loser of two started into one folder, never replaces it or removes what the owner wrote."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, run_cli

from ddpm.config import compose
from ddpm.train import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    train(compose([*TINY, "trainer.max_steps=3", "~callbacks.sample_grid"], output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SAMPLE = ["num_samples=10", "sampler=ddim", "sampler.steps=2"]


def test_a_refused_sample_leaves_the_earlier_record_as_it_was(checkpoint, tmp_path):
    """The refused command's settings never reach the folder's .hydra/ (``ddpm.report`` would read them as the run's)."""
    out = tmp_path / "sampled"
    first = run_cli("ddpm.sample", f"ckpt_path={checkpoint}", *SAMPLE, f"hydra.run.dir={out}", cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(out)
    assert "sampler.steps=2" in before[".hydra/overrides.yaml"].decode() and "sample.log" in before
    again = run_cli("ddpm.sample", f"ckpt_path={checkpoint}", "num_samples=10", "sampler=ddim", "sampler.steps=20",
                    f"hydra.run.dir={out}", cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "already" in again.stderr, again.stderr[-2000:]
    assert _snapshot(out) == before


def test_a_refused_training_command_leaves_the_run_record_as_it_was(tmp_path):
    run = tmp_path / "run"
    first = run_cli("ddpm.train", *TINY, "trainer.max_steps=2", "~callbacks.sample_grid", f"hydra.run.dir={run}",
                    cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(run)
    assert "train.log" in before and ".hydra/config.yaml" in before
    refused = run_cli("ddpm.train", *TINY, "trainer.max_steps=4", "~callbacks.sample_grid", "guidance.p_uncond=1.5",
                      f"hydra.run.dir={run}", cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "guidance.p_uncond" in refused.stderr, refused.stderr[-2000:]
    assert _snapshot(run) == before


def _two_at_once(checkpoint: Path, out: Path) -> None:
    commands = [[sys.executable, "-m", "ddpm.sample", f"ckpt_path={checkpoint}", *SAMPLE, f"seed={seed}",
                 f"hydra.run.dir={out}"] for seed in (1, 2)]
    processes = [subprocess.Popen(c, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for c in commands]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = [seed for seed, (code, _) in zip((1, 2), results) if code == 0][0]
    loser_error = next(err for code, err in results if code == 2)
    # taken while the winner runs, or holding its results once it is done: either way one line, and nothing touched
    assert loser_error.count("error: ") == 1 and ("already taken by another ddpm.sample" in loser_error
                                                  or "already holds ['grid.png', 'samples.npz']" in loser_error), loser_error
    overrides = yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert f"seed={winner}" in overrides and f"seed={3 - winner}" not in overrides, overrides
    assert yaml.safe_load((out / ".hydra" / "config.yaml").read_text())["seed"] == winner
    assert (out / "samples.npz").is_file() and (out / "grid.png").is_file() and (out / "sample.log").is_file()


def test_two_samples_started_into_one_folder_leave_the_winners_record(checkpoint, tmp_path):
    """Once in `make test`; 20 times in a row under the `slow` mark (issue 29's acceptance)."""
    _two_at_once(checkpoint, tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_two_samples_started_into_one_folder_twenty_times(checkpoint, tmp_path, trial):
    _two_at_once(checkpoint, tmp_path / "out")


def test_a_second_training_command_into_a_running_runs_folder_is_refused(tmp_path):
    """ddpm.train holds its run directory while it runs: a second one there (two segments of one run at once) would
    interleave checkpoints; it is refused in one line, and the first goes on (stopped here by SIGTERM, it saves and
    exits as a preempted run does)."""
    import signal
    import time

    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "ddpm.train", *TINY, "trainer.max_steps=100000", "~callbacks.sample_grid",
                              f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.time()
    while not (run / "train.log").exists():  # committed: it holds the lock and has passed its checks
        assert first.poll() is None, first.stderr.read()[-2000:]
        assert time.time() - start < 300
        time.sleep(0.05)
    second = run_cli("ddpm.train", *TINY, "trainer.max_steps=100000", "~callbacks.sample_grid", f"hydra.run.dir={run}",
                     cwd=tmp_path, timeout=300)
    assert first.poll() is None  # still training
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, first.stderr.read()[-2000:]
    assert second.returncode == 2 and "in use by another ddpm.train" in second.stderr, second.stderr[-2000:]
    assert second.stderr.count("error: ") == 1
