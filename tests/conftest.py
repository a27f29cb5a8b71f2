import os
import subprocess
import sys

import pytest
import torch

from ddpm.config import compose

# Under pytest-xdist, share the cores between the workers: each worker running as many threads as there
# are cores oversubscribes the CPU, and spinning OpenMP threads then make every test several times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses the CLI tests start

# A network and schedule small enough that a training step takes milliseconds.
TINY = [
    "logger=csv",
    "trainer=debug",
    "trainer.max_steps=10",
    "trainer.enable_progress_bar=false",
    "model.base_channels=16",
    "model.norm_groups=4",
    "data.batch_size=32",
    "schedule.timesteps=100",
    "callbacks.sample_grid.steps=10",
    "callbacks.sample_grid.per_class=2",
    "~callbacks.sample_quality",  # these two are tested on their own (tests/test_evaluate.py)
    "~callbacks.evaluate_at_end",
]


@pytest.fixture
def tiny_cfg(tmp_path):
    """compose(overrides) for a tiny run writing under tmp_path/run."""
    def make(*overrides: str, output_dir=None):
        return compose([*TINY, *overrides], output_dir=output_dir or tmp_path / "run")
    return make


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """An environment with no wandb credentials: no API key, an empty HOME and netrc."""
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    return os.environ


def run_cli(*args: str, cwd, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """`python -m ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
