"""Where a traceback used to be, one line (issue 29, item 8): crafted checkpoints and guides, the Python API's
arguments, the wandb run id file, trainer settings Lightning refuses, export folders."""

import math
import os

import pytest
import torch
from conftest import TINY

import ddpm
from ddpm.config import compose
from ddpm.config import run_cli as run_entry
from ddpm.core.errors import ConfigError
from ddpm.train import train

CONTINUOUS = [o for o in TINY if not o.startswith("schedule.")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddpm") / "run"
    train(compose([*TINY, "trainer.max_steps=2", "~callbacks.sample_grid", "callbacks.model_checkpoint.every_n_train_steps=1"],
                  output_dir=run))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def edm_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("edm") / "run"
    train(compose([*CONTINUOUS, "process=edm", "trainer.max_steps=2", "~callbacks.sample_grid"], output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def _altered(path, tmp_path, change, name="altered.ckpt"):
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    out = tmp_path / name
    torch.save(checkpoint, out)
    return out


def _one_line(call, *words):
    with pytest.raises(ConfigError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("change,words", [
    (lambda c: c.update(state_dict=[1, 2]), ["its state_dict is not a mapping"]),
    (lambda c: c.update(state_dict=None), ["its state_dict is not a mapping"]),
    (lambda c: c["state_dict"].update({0: torch.zeros(1)}), ["its state_dict is not a mapping"]),
    (lambda c: c["config"].update(ema=None), ["holds no ema settings"]),
])
def test_a_crafted_checkpoint_is_one_line_at_load(checkpoint, tmp_path, change, words):
    _one_line(lambda: ddpm.load(_altered(checkpoint, tmp_path, change), device="cpu"), "ckpt_path=", *words)


def test_a_sigma_data_that_overflows_is_one_line_before_sampling(edm_checkpoint, tmp_path):
    def change(c):
        c["config"]["process"]["sigma_data"] = c["config"]["data"]["sigma_data"] = 1e308

    model = ddpm.load(_altered(edm_checkpoint, tmp_path, change), device="cpu")
    _one_line(lambda: model.sample(3, steps=3), "sigma_data=1e+308", "cannot sample")


@pytest.mark.parametrize("call,words", [
    (lambda ck: ddpm.load(ck, ema=None, device="cpu"), ["ema=None: must be true"]),
    (lambda ck: ddpm.load(ck, ema=0.07, ema_sources="abc", device="cpu"), ["ema_sources='abc'"]),
    (lambda ck: ddpm.load(ck, device="tpu:3"), ["device='tpu:3'"]),
    (lambda ck: ddpm.load(ck, device="cpu").evaluate(num_samples=1, sampler="ddim", steps=2), ["num_samples=1: must be an integer >= 2"]),
    (lambda ck: ddpm.load(ck, device="cpu").sample(4, batch_size=0, sampler="ddim", steps=2), ["batch_size=0"]),
    *([(lambda ck: ddpm.load(ck, device="cuda"), ["device='cuda': this machine has 0 CUDA devices"])]
      if not torch.cuda.is_available() else []),
])
def test_the_python_api_refuses_bad_arguments_in_one_line(checkpoint, call, words):
    _one_line(lambda: call(checkpoint), *words)


def test_a_bad_guide_is_named_as_the_guide(checkpoint, tmp_path):
    """A guide's file is refused naming the setting that named it, not ckpt_path (the model's own)."""
    from ddpm.sample import sample

    guide = _altered(checkpoint, tmp_path, lambda c: c.update(state_dict=None), "guide.ckpt")
    cfg = compose([f"ckpt_path={checkpoint}", "guidance.method=autoguidance", f"guidance.guide.ckpt_path={guide}",
                   "num_samples=10", "sampler=ddim", "sampler.steps=2"], config_name="sample", output_dir=tmp_path / "out")
    _one_line(lambda: sample(cfg), f"guidance.guide.ckpt_path='{guide}'", "state_dict")


# --- the command line: exit 2, one line, nothing left behind ---------------------------------------------------------
def _refused_in_one_line(task, cfg, capsys, *words):
    with pytest.raises(SystemExit) as exit_info:
        run_entry(task, cfg)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert all(w in stderr for w in words), stderr


@pytest.mark.parametrize("overrides,words", [
    (["trainer.precision=16-true"], ["trainer.precision='16-true'", "needs a GPU"]),
    (["data=mnist", "data.name=foo"], ["data.name='foo': must be one of"]),
])
def test_settings_lightning_or_a_dataset_would_refuse_with_a_traceback(tmp_path, capsys, overrides, words):
    if "16-true" in overrides[0] and torch.cuda.is_available():
        pytest.skip("a GPU computes float16")
    cfg = compose([*TINY, *overrides, f"data.root={tmp_path}"], output_dir=tmp_path / "run")
    _refused_in_one_line(train, cfg, capsys, *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["a path", "10 MB", "non-ASCII", "a link", "a FIFO", "a folder", "wandb is a file"])
def test_a_wandb_run_id_file_that_is_not_an_id_is_one_line(tmp_path, capsys, offline_env, kind):
    """It was refused, but through Hydra's "Error executing job" and exit status 1 (Hydra wraps what a target raises)."""
    run = tmp_path / "run"
    (run / "wandb").mkdir(parents=True)
    path = run / "wandb" / "run_id"
    if kind == "a path":
        path.write_text("../../etc/passwd")
    elif kind == "10 MB":
        path.write_bytes(b"a" * 10_000_000)
    elif kind == "non-ASCII":
        path.write_text("ünïcödé")
    elif kind == "a link":
        path.symlink_to("/etc/hostname")
    elif kind == "a FIFO":
        os.mkfifo(path)
    elif kind == "a folder":
        path.mkdir()
    else:
        (run / "wandb").rmdir()
        (run / "wandb").write_text("not a folder")
    before = sorted(p.name for p in run.rglob("*"))
    cfg = compose([*[o for o in TINY if o != "logger=csv"], "logger=wandb", "logger.mode=offline", "trainer.max_steps=1"],
                  output_dir=run)
    _refused_in_one_line(train, cfg, capsys, "logger=wandb:")
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing of the refused run left, nothing of yours removed


def test_export_into_the_empty_current_folder_and_not_through_dotdot(checkpoint, tmp_path, monkeypatch, capsys):
    """out=. from an empty folder: a traceback (Path('.') has no name) after loading the model; out=newdir/.. was
    refused with the wrong words and left newdir/ behind."""
    from ddpm.export import export

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    export(compose([f"ckpt_path={checkpoint}", "out=."], config_name="export"))
    assert (empty / "unet" / "config.json").is_file()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    monkeypatch.chdir(busy)
    _refused_in_one_line(export, compose([f"ckpt_path={checkpoint}", "out=newdir/.."], config_name="export"), capsys,
                         "already exists and is not an empty folder")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
