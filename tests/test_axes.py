"""The ablation axes as config: every new option composes, trains 5 steps and writes a grid; the layout keeps the
core free of Lightning, Hydra, omegaconf and wandb; checkpoints written before the core existed still sample."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from ddpm.training.assemble import build_module
from ddpm.inference import load
from ddpm.core.schedules import rescale_zero_terminal_snr
from ddpm.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

NEW_OPTIONS = {
    "prediction_x0": ["diffusion.prediction=x0"],
    "prediction_v_min_snr": ["diffusion.prediction=v", "diffusion.loss_weight=min_snr"],
    "eps_min_snr": ["diffusion.loss_weight=min_snr", "diffusion.min_snr_gamma=1.0"],
    "sigmoid": ["schedule=sigmoid"],
    "zero_terminal_snr_v": ["schedule=cosine_zero_terminal_snr", "diffusion.prediction=v"],
    "rescaled_cfg": ["guidance.rescale=0.7", "guidance.scale=2"],
    "guidance_interval": ["guidance.interval=[0.28,5.42]", "guidance.scale=2"],
    "heun": ["sampler=heun", "callbacks.sample_grid.steps=5"],
}


@pytest.mark.parametrize("name", NEW_OPTIONS)
def test_every_new_option_trains_five_steps_and_writes_a_grid(name, tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=5", *NEW_OPTIONS[name])
    module = train(cfg)
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    assert all(torch.isfinite(p).all() for p in module.state_dict().values() if p.is_floating_point())
    loaded = load(tmp_path / "run" / "checkpoints" / "last.ckpt")  # what it means travels in the checkpoint
    assert loaded.denoiser.prediction == cfg.diffusion.prediction
    assert (loaded.process.alphas_cumprod[-1] == 0) == cfg.schedule.zero_terminal_snr


def test_zero_terminal_snr_with_eps_is_refused_before_training(tmp_path):
    result = run_cli("ddpm.train", "schedule=cosine", "schedule.zero_terminal_snr=true", "logger=none",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: diffusion.prediction='eps': must be one of ['x0', 'v'] with schedule.zero_terminal_snr=true")
    assert result.stderr.count("\n") == 1
    assert "diffusion.prediction=v" in result.stderr and not (tmp_path / "run").exists()


def test_the_issue_command_composes(tmp_path):
    result = run_cli("ddpm.train", "--cfg", "job", "diffusion.prediction=v", "diffusion.loss_weight=min_snr",
                     "schedule=sigmoid", "guidance.rescale=0.7", "sampler=heun", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("prediction: v", "loss_weight: min_snr", "_target_: ddpm.core.schedules.sigmoid_betas", "rescale: 0.7",
                 "_target_: ddpm.core.samplers.heun.Heun"):  # premise changed (issue 30): a sampler is a class
        assert line in result.stdout, line


def test_zero_terminal_snr_rescale_is_lin_et_al_algorithm_1(tiny_cfg):
    """sqrt(alpha_bar) is shifted and scaled: 0 at t = T, unchanged at t = 1, linear in between (checked by hand)."""
    from ddpm.core.schedules import cosine_betas, linear_betas, sigmoid_betas

    for betas in (linear_betas(1000), cosine_betas(1000), sigmoid_betas(1000)):
        old = torch.cumprod(1 - betas, 0).sqrt()
        new = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).sqrt()
        assert new[-1].item() == pytest.approx(0, abs=1e-12) and new[0].item() == pytest.approx(old[0].item(), rel=1e-12)
        expected = old[0] * (old - old[-1]) / (old[0] - old[-1])
        torch.testing.assert_close(new, expected, rtol=1e-10, atol=1e-12)
    module = build_module(tiny_cfg("schedule.zero_terminal_snr=true", "diffusion.prediction=v"))
    assert module.process.alphas_cumprod[-1] == 0 and module.process.betas[-1] == 1


def test_core_imports_none_of_lightning_hydra_omegaconf_wandb():
    """A fresh interpreter imports every module of ddpm.core; none of the four frameworks may come with it."""
    code = ("import importlib, pkgutil, sys, ddpm.core\n"
            "names = [m.name for m in pkgutil.walk_packages(ddpm.core.__path__, 'ddpm.core.')]\n"
            "[importlib.import_module(n) for n in names]\n"
            "assert len(names) >= 12, names\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra', 'omegaconf', 'wandb'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_instantiate_only_in_the_entry_points_and_config_code():
    allowed = {"assemble.py", "train.py", "sample.py", "evaluate.py", "config.py"}
    users = {p.name for p in (ROOT / "src" / "ddpm").rglob("*.py") if "instantiate(" in p.read_text()}
    assert users and users <= allowed, users - allowed


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_a_checkpoint_from_before_the_core_samples_as_it_did(sampler, tmp_path):
    """tests/data/checkpoint_before_core.ckpt was written by commit 3839586 (before ddpm/core, the ``diffusion`` node
    and prediction targets), and the npz holds what that commit's ``ddpm.sample`` drew from it (w = 1, seed 0, 10
    images; ddim with 10 steps). It loads as prediction=eps and draws the same images (uint8, off by at most 1 level
    where float32 rounding moved)."""
    steps = ["sampler.steps=10"] if sampler == "ddim" else []
    result = run_cli("ddpm.sample", f"ckpt_path={DATA / 'checkpoint_before_core.ckpt'}", f"sampler={sampler}", *steps,
                     "sampler.precision=float32",
                     "num_samples=10", "guidance.scale=1", "device=cpu", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = np.load(tmp_path / "out" / "samples.npz")["images"].astype(int)
    before = np.load(DATA / "checkpoint_before_core_samples.npz")[sampler].astype(int)
    assert np.abs(got - before).max() <= 1 and (got == before).mean() > 0.99
    assert load(DATA / "checkpoint_before_core.ckpt").denoiser.prediction == "eps"
