"""`python -m ddpm.sample`: a checkpoint in, a grid and samples.npz out, reproducibly."""

import numpy as np
import pytest
from conftest import TINY, run_cli

from ddpm.config import compose
from ddpm.training.callbacks import even_labels
from ddpm.sample import sample
from ddpm.train import train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("train")
    train(compose([*TINY, "trainer.max_steps=5", "~callbacks.sample_grid"], output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def test_even_labels():
    assert even_labels(20, 10).tolist() == [c for c in range(10) for _ in range(2)]
    assert even_labels(7, 3).bincount().tolist() == [3, 2, 2]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_same_seed_same_checkpoint_identical_npz(checkpoint, tmp_path, sampler):
    outputs = []
    for run in ("a", "b"):
        cfg = compose([f"ckpt_path={checkpoint}", f"sampler={sampler}", "sampler.steps=8", "num_samples=20",
                       "batch_size=8", "trajectory=2"], config_name="sample", output_dir=tmp_path / run)
        out = sample(cfg)
        assert out["nfe"] == 3 * 8  # three batches of 8 steps each
        outputs.append(np.load(tmp_path / run / "samples.npz"))
        assert (tmp_path / run / "grid.png").is_file() and (tmp_path / run / "trajectory.png").is_file()
    a, b = outputs
    assert a["images"].dtype == np.uint8 and a["images"].shape == (20, 8, 8, 1)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert a["labels"].tolist() == even_labels(20, 10).tolist()


def test_sample_cli(checkpoint, tmp_path):
    result = run_cli("ddpm.sample", f"ckpt_path={checkpoint}", "sampler=ddim", "sampler.steps=5", "guidance.scale=2",
                     "num_samples=10", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = np.load(tmp_path / "out" / "samples.npz")
    assert data["images"].shape == (10, 8, 8, 1) and data["labels"].tolist() == list(range(10))
