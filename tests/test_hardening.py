"""Bad input fails fast with a one-line message naming the key; faults (kill, NaN, SIGTERM, corrupt files) never
lose a run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

from ddpm.config import compose
from ddpm.module import DiffusionModule, NonFiniteLossError
from ddpm.sample import sample
from ddpm.train import train
from ddpm.validation import ConfigError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("train")
    train(compose([*TINY, "trainer.max_steps=3", "~callbacks.sample_grid"], output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def _empty_dir(tmp):
    (tmp / "empty").mkdir(exist_ok=True)
    return tmp / "empty"


# (entry point, overrides, the key the message must name). {ckpt} is a valid checkpoint, {tmp} the test's folder.
BAD_INPUTS = [
    ("train", ["guidance.p_uncond=1.5"], "guidance.p_uncond"),
    ("train", ["guidance.p_uncond=-0.1"], "guidance.p_uncond"),
    ("train", ["guidance.scale=-1"], "guidance.scale"),
    ("train", ["guidance.p_uncond=0", "guidance.scale=2"], "guidance.scale"),
    ("train", ["schedule.timesteps=0"], "schedule.timesteps"),
    ("train", ["schedule.beta_end=0.00001"], "schedule.beta_end"),
    ("train", ["sampler=ddim", "sampler.steps=0"], "sampler.steps"),
    ("train", ["sampler=ddim", "sampler.steps=5000"], "sampler.steps"),
    ("train", ["sampler.variance=wide"], "sampler.variance"),
    ("train", ["sampler=dpmpp_2m", "sampler.spacing=karras"], "sampler.spacing"),
    ("train", ["data.image_size=9"], "data.image_size"),
    ("train", ["model.attention_resolutions=[3]"], "model.attention_resolutions"),
    ("train", ["data.batch_size=0"], "data.batch_size"),
    ("train", ["optim.optimizer.lr=0"], "optim.optimizer.lr"),
    ("train", ["ema.decay=1.0"], "ema.decay"),
    ("train", ["trainer.precision=fp8"], "trainer.precision"),
    ("train", ["model.sdpa=maybe"], "model.sdpa"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps"),
    ("train", ["schedule=quadratic"], "schedule/quadratic"),        # Hydra: unknown option, lists the available ones
    ("train", ["guidance.p_uncnd=0.1"], "guidance.p_uncnd"),         # Hydra: unknown key
    ("train", ["ckpt_path={tmp}/nope.ckpt"], "ckpt_path"),
    ("train", ["data=image_folder", "data.root={tmp}/empty"], "data.num_classes"),
    ("train", ["data=image_folder", "data.root={tmp}/missing", "data.num_classes=2"], "data.root"),
    ("train", ["data=image_folder", "data.root={tmp}/empty", "data.num_classes=2"], "data.root"),
    ("train", ["data=mnist", "data.root={tmp}/empty", "data.download=false"], "data.root"),
    ("sample", ["ckpt_path={tmp}/nope.ckpt"], "ckpt_path"),
    ("sample", ["ckpt_path={ckpt}", "num_samples=0"], "num_samples"),
    ("sample", ["ckpt_path={ckpt}", "labels=[12]"], "labels"),
    ("sample", ["ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=500"], "sampler.steps"),
    ("sample", ["ckpt_path={ckpt}", "guidance.scale=-2"], "guidance.scale"),
    ("evaluate", ["ckpt_path={ckpt}", "metrics.reference_split=val"], "metrics.reference_split"),
    ("evaluate", ["ckpt_path={ckpt}", "metrics.feature_extractor=vgg"], "metrics.feature_extractor"),
    ("evaluate", ["ckpt_path={ckpt}", "num_samples=1"], "num_samples"),
    ("evaluate", ["ckpt_path={ckpt}", "+data=cifar10"], "data.channels"),
]


HYDRA_LEVEL = {"schedule/quadratic", "guidance.p_uncnd"}  # composition errors: Hydra's own message and exit status


@pytest.mark.parametrize("entry,overrides,key", BAD_INPUTS, ids=[f"{e}:{' '.join(o)}" for e, o, _ in BAD_INPUTS])
def test_bad_input_fails_fast_naming_the_key(entry, overrides, key, checkpoint, tmp_path, capsys):
    """The entry point's own exit path (ddpm.config.run_cli) in-process; Hydra's composition errors in a subprocess."""
    import importlib

    from ddpm.config import run_cli as run_entry

    _empty_dir(tmp_path)
    earlier = tmp_path / "earlier" / "checkpoints" / "last.ckpt"  # an earlier run's file that must survive
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"earlier run")
    overrides = [o.format(tmp=tmp_path, ckpt=checkpoint) for o in overrides]
    extra = TINY if entry == "train" else []
    if key in HYDRA_LEVEL:
        result = run_cli(f"ddpm.{entry}", *extra, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
        status, stderr = result.returncode, result.stderr
    else:
        cfg = compose([*extra, *overrides], config_name=entry, output_dir=tmp_path / "run")
        task = getattr(importlib.import_module(f"ddpm.{entry}"), entry)
        with pytest.raises(SystemExit) as exit_info:
            run_entry(task, cfg)
        status, stderr = exit_info.value.code, capsys.readouterr().err
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and key in stderr, stderr  # one line, naming the key
    assert status not in (0, None)
    assert any(key in line for line in stderr.splitlines()), stderr[-2000:]
    assert [p for p in tmp_path.rglob("*.ckpt")] == [earlier]  # nothing trained
    assert earlier.read_bytes() == b"earlier run"  # nothing earlier deleted
    assert not (tmp_path / "run" / "samples.npz").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_hydra_lists_the_available_options(tmp_path):
    result = run_cli("ddpm.train", "schedule=quadratic", cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and "Available options in 'schedule'" in result.stderr
    assert "cosine" in result.stderr and "linear" in result.stderr


def test_download_without_network_suggests_digits(tmp_path, monkeypatch):
    from urllib.error import URLError

    from torchvision import datasets

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    cfg = compose([*TINY, "data=mnist", f"data.root={tmp_path / 'mnist'}"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.root=.*could not get mnist.*use data=digits"):
        train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_corrupt_image_is_reported_with_its_path(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / c / "ok.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    cfg = compose([*TINY, "data=image_folder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=2", "data.batch_size=3",
                   "data.image_size=8"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"cannot read image .*broken.png"):
        train(cfg)


def test_rerun_in_the_same_directory_never_overwrites(checkpoint, tmp_path):
    run = checkpoint.parent.parent
    before = {p.name: p.read_bytes() for p in run.joinpath("checkpoints").glob("*.ckpt")}
    cfg = compose([*TINY, "trainer.max_steps=3", "~callbacks.sample_grid", "resume=never"], output_dir=run)
    with pytest.raises(ConfigError, match=r"paths.checkpoint_dir=.*already holds checkpoints"):
        train(cfg)
    assert {p.name: p.read_bytes() for p in run.joinpath("checkpoints").glob("*.ckpt")} == before
    out = tmp_path / "sampled"
    sample(compose([f"ckpt_path={checkpoint}", "num_samples=10", "sampler=ddim", "sampler.steps=2"], config_name="sample", output_dir=out))
    first = (out / "samples.npz").read_bytes()
    with pytest.raises(ConfigError, match=r"hydra.run.dir=.*already holds \['grid.png', 'samples.npz'\]"):
        sample(compose([f"ckpt_path={checkpoint}", "num_samples=10", "seed=1"], config_name="sample", output_dir=out))
    assert (out / "samples.npz").read_bytes() == first


# --- checkpoints ----------------------------------------------------------------------------------------------
def test_truncated_and_foreign_checkpoints_are_named(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"ckpt_path=.*truncated.ckpt.*not a readable checkpoint"):
        DiffusionModule.from_checkpoint(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ConfigError, match=r"ckpt_path=.*foreign.ckpt.*not a ddpm checkpoint"):
        DiffusionModule.from_checkpoint(foreign)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    result = run_cli("ddpm.sample", f"ckpt_path={text}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ckpt_path=") and "not a readable" in result.stderr


def test_resuming_with_another_model_names_the_differing_keys(checkpoint, tmp_path):
    cfg = compose([*TINY, "trainer.max_steps=6", f"ckpt_path={checkpoint}", "model.base_channels=32", "schedule=cosine"],
                  output_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert "holds a different model" in message and "model.base_channels: checkpoint 16, requested 32" in message
    assert "schedule._target_" in message and "\n" not in message


def test_evaluating_against_another_dataset_is_refused(checkpoint, tmp_path):
    from ddpm.evaluate import evaluate

    cfg = compose([f"ckpt_path={checkpoint}", "+data=mnist"], config_name="evaluate", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.image_size=32: the checkpoint's model has image_size=8"):
        evaluate(cfg)


# --- numerical faults -----------------------------------------------------------------------------------------
def test_non_finite_loss_stops_training_and_keeps_finite_checkpoints(tmp_path):
    cfg = compose([*TINY, "trainer.max_steps=40", "callbacks.model_checkpoint.every_n_train_steps=5",
                   "~callbacks.sample_grid", "trainer.gradient_clip_val=null", "optim.warmup_steps=0",
                   "optim.optimizer.lr=1e12"], output_dir=tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss (nan|inf|-inf) at step \d+"):
        train(cfg)
    for path in (tmp_path / "run" / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


# --- signals and kills ----------------------------------------------------------------------------------------
def _train_cmd(run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ddpm.train", *TINY, f"trainer.max_steps={steps}", "~callbacks.sample_grid",
            "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint.save_top_k=1",
            f"hydra.run.dir={run}", *extra]


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else "exited"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _first_logged_step(run: Path, version: int) -> int:
    import csv

    rows = list(csv.DictReader(open(run / "csv" / f"version_{version}" / "metrics.csv")))
    return min(int(r["step"]) for r in rows if r.get("train/loss"))


def test_sigkill_during_checkpointing_then_resume(tmp_path):
    """A checkpoint every step, SIGKILL at random moments (so often mid-save), then the same command again:
    every restart resumes from the newest complete last.ckpt."""
    run, rng, steps = tmp_path / "run", random.Random(0), 150
    last = run / "checkpoints" / "last.ckpt"
    resumed_from = []
    for kill in range(3):
        process = subprocess.Popen(_train_cmd(run, steps), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for(run / "csv" / f"version_{kill}" / "metrics.csv", process)
        time.sleep(rng.uniform(0.1, 1.0))
        process.kill()
        process.wait()
        checkpoint = torch.load(last, weights_only=True)  # always complete: the previous file or the new one
        resumed_from.append(checkpoint["global_step"])
        assert not [p for p in run.joinpath("checkpoints").glob("*.ckpt") if p.name.endswith(".tmp")]
    result = subprocess.run(_train_cmd(run, steps), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == steps
    # Each restart (csv version k+1) began right after the step its predecessor's newest checkpoint held.
    for k, step in enumerate(resumed_from):
        assert _first_logged_step(run, k + 1) == step, (k, step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2])  # USR2: SLURM via submitit, before a time limit
def test_signal_saves_last_and_a_rerun_resumes(tmp_path, signum):
    run = tmp_path / "run"
    process = subprocess.Popen(_train_cmd(run, 2000, "callbacks.model_checkpoint.every_n_train_steps=0"), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(run / "csv" / "version_0" / "metrics.csv", process)
    time.sleep(1.0)
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]  # Hydra's job log goes to stdout
    assert process.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output and f"stopped by {signal.Signals(signum).name}" in output
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 2000
    result = subprocess.run(_train_cmd(run, step + 5, "callbacks.model_checkpoint.every_n_train_steps=0"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _first_logged_step(run, 1) == step
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 5
