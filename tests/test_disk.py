"""A run knows what it will write (issue 20): the plan against what a run really writes, the CIFAR-10 preset's plan
without training, and the refusal when the disk cannot hold it."""

from collections import namedtuple

import pytest
from conftest import TINY

from ddpm.config import compose
from ddpm.train import train
from ddpm.training.disk import disk_plan
from ddpm.validation import ConfigError


def test_the_plan_counts_what_a_run_writes(tmp_path):
    run = tmp_path / "run"
    cfg = compose([*TINY, "trainer.max_steps=20", "callbacks.model_checkpoint.every_n_train_steps=10", "ema.snapshot_count=4",
                   "callbacks.sample_grid.every_n_steps=10"], output_dir=run)
    plan = disk_plan(cfg)
    train(cfg)
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    snapshots = sorted((run / "ema_snapshots").glob("*.pt"))
    assert plan.checkpoints == len(checkpoints) == 3 and plan.snapshots == len(snapshots) == 4
    for planned, files in ((plan.checkpoint_bytes, checkpoints), (plan.snapshot_bytes, snapshots)):
        sizes = [f.stat().st_size for f in files]
        assert all(0.9 * planned < size < 1.1 * planned for size in sizes), (planned, sizes)  # headers and names aside
    assert plan.grids == len(list((run / "samples").glob("*.png"))) == 3


def test_the_cifar10_preset_plans_under_100_gb_per_run():
    """It once would have written 16,000 snapshots (about 4.6 TB): snapshots are per run now, in float16."""
    plan = disk_plan(compose(["experiments=cifar10_cfg_cosine"], output_dir="/tmp/ddpm-disk-plan"))
    assert 35e6 < plan.parameters < 37e6 and plan.snapshots == 40 and plan.checkpoints == 81
    assert plan.total < 100e9, plan.describe()


def test_a_run_that_would_fill_the_disk_is_refused_before_training(tmp_path, monkeypatch):
    import ddpm.training.disk

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ddpm.training.disk.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    cfg = compose([*TINY, "trainer.max_steps=20"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert "\n" not in message and "this run would write about" in message and "1.0 MB free" in message
    assert "ema.snapshot_count" in message and not list(tmp_path.rglob("*.ckpt"))


def test_the_plan_is_printed_at_start(tmp_path, caplog):
    caplog.set_level("INFO")
    train(compose([*TINY, "trainer.max_steps=2", "~callbacks.sample_grid"], output_dir=tmp_path / "run"))
    assert any(r.message.startswith("disk: this run writes about") and "free in" in r.message for r in caplog.records)
