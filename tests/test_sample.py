"""`python -m ddpm.sample`: a checkpoint in, a grid and samples.npz out, reproducibly."""

import re

import numpy as np
import torch
import pytest
from conftest import TINY, run_cli

from ddpm.config import compose
from ddpm.inference import even_labels
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
        # network evaluations per image, as metrics.json counts them (premise changed, issue 22: sample's total over the
        # three batches was 3 * 8; it now draws through Pipeline.draw, which counts per batch for both)
        assert out["nfe"] == 8
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


def test_sampling_precision_bf16_runs_the_network_in_bf16(tiny_cfg):
    from ddpm.training.assemble import build_module

    module = build_module(tiny_cfg())
    torch.manual_seed(0)
    for p in module.ema.module.parameters():  # the zero-initialised output layer would make both outputs 0
        torch.nn.init.normal_(p, std=0.05)
    seen = []
    module.ema.module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    images = {p: module.pipeline().sample(torch.arange(4), seed=0, precision=p)
              for p in ("float32", "bf16")}
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    assert images["bf16"].dtype == torch.float32 and torch.isfinite(images["bf16"]).all()
    assert not torch.equal(images["bf16"], images["float32"])


@pytest.mark.slow
def test_sampling_with_a_compiled_network_matches_eager(tiny_cfg):
    from ddpm.training.assemble import build_module

    module = build_module(tiny_cfg())
    model = module.pipeline()
    eager = model.sample(torch.arange(4), seed=0)
    compiled = model.sample(torch.arange(4), seed=0, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not any(k.startswith("_compiled") for k in module.state_dict())


def test_the_command_lines_guidance_is_the_checkpoints_unless_given(tmp_path):
    """guidance.scale, rescale and interval default to `checkpoint` (the run's own guidance node, as ddpm.load's model
    samples by default); each one given replaces only itself. (Premise changed, issue 22: rescale and interval were
    0 and null whatever the checkpoint held, and scale's null meant the checkpoint's.)"""
    from types import SimpleNamespace

    from ddpm.core.guidance import Guidance
    from ddpm.sample import guidance_of

    model = SimpleNamespace(guidance=Guidance(2.0, 0.7, (0.28, 5.42)))

    def chosen(*overrides):
        return guidance_of(compose(["ckpt_path=x", *overrides], config_name="sample"), model)

    assert chosen() == model.guidance
    assert chosen("guidance.scale=3") == Guidance(3.0, 0.7, (0.28, 5.42))
    assert chosen("guidance.interval=null", "guidance.rescale=0") == Guidance(2.0, 0.0, None)
    assert chosen("guidance.interval=[0.5,2]") == Guidance(2.0, 0.7, (0.5, 2.0))


def test_a_guidance_key_must_be_checkpoint_or_a_value(checkpoint, tmp_path):
    from ddpm.validation import ConfigError, validate

    for override, message in (("guidance.scale=null", "guidance.scale=None: must be checkpoint (the checkpoint's own "
                                                      "value) or a number >= 0"),
                              ("guidance.rescale=latest", "guidance.rescale='latest': must be checkpoint")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose([f"ckpt_path={checkpoint}", override], config_name="sample"), "sample")


def test_guidance_methods_from_python_and_the_command_line(checkpoint, tmp_path):
    """guidance.method=apg from the command line; autoguidance from Python with a loaded guide, recorded in the
    protocol; the model as its own guide gives the conditional samples."""
    import torch

    from ddpm import Guidance, load
    from ddpm.validation import ConfigError, validate

    model, raw = load(checkpoint, device="cpu"), load(checkpoint, ema=False, device="cpu")
    labels = list(range(10))
    conditional = model.sample(labels, sampler="ddim", steps=5, guidance=0.0)
    itself = model.sample(labels, sampler="ddim", steps=5, guidance=Guidance(2.0, method="autoguidance", guide=model))
    torch.testing.assert_close(itself, conditional, rtol=0, atol=1e-5)
    guided = model.sample(labels, sampler="ddim", steps=5, guidance=Guidance(2.0, method="autoguidance", guide=raw))
    assert not torch.allclose(guided, conditional)
    protocol = model.protocol(model.sampler_for("ddim", 5), model.guidance_for(Guidance(2.0, method="autoguidance", guide=raw)),
                              0, 10, {}, {})
    assert protocol["guidance_method"] == "autoguidance" and protocol["guide"]["weights"] == "raw"

    def run(name, *overrides):
        cfg = compose([f"ckpt_path={checkpoint}", "sampler=ddim", "sampler.steps=5", "num_samples=10", "guidance.scale=2",
                       "sampler.precision=float32", *overrides], config_name="sample", output_dir=tmp_path / name)
        return sample(cfg)["images"]

    cfg_images, apg_images = run("cfg"), run("apg", "guidance.method=apg")
    assert not torch.equal(cfg_images, apg_images)
    assert torch.equal(apg_images, model.sample(labels, sampler="ddim", steps=5, guidance=Guidance(2.0, method="apg")))
    # autoguidance from the command line: this run's raw weights as the guide... by an EMA it lacks, refused in one line
    with pytest.raises(ConfigError, match="needs a guide"):
        run("auto0", "guidance.method=autoguidance")
    with pytest.raises(ConfigError, match="that is the model itself"):
        run("auto1", "guidance.method=autoguidance", f"guidance.guide.ckpt_path={checkpoint}")
    with pytest.raises(ConfigError, match=r"guidance.guide.step=3: no checkpoint .*step_0000003.ckpt"):
        run("auto2", "guidance.method=autoguidance", "guidance.guide.step=3")
    assert torch.equal(run("auto3", "guidance.guide.step=3"), cfg_images)  # a guide only autoguidance reads
    with pytest.raises(ConfigError, match="cfg or apg for a training run's own samples"):
        validate(compose(["guidance.method=autoguidance"]), "train")


def test_autoguidance_by_an_earlier_step_of_the_same_run(tmp_path):
    """guidance.guide.step=N guides with this run's checkpoint at step N: the samples are those of the Python API with
    that checkpoint loaded as the guide."""
    import torch

    from ddpm import Guidance, load

    run = tmp_path / "train"
    train(compose([*TINY, "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=3",
                   "~callbacks.sample_grid"], output_dir=run))
    last, early = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "step_0000003.ckpt"
    assert early.is_file()
    cfg = compose([f"ckpt_path={last}", "sampler=ddim", "sampler.steps=4", "num_samples=10", "sampler.precision=float32",
                   "guidance.method=autoguidance", "guidance.scale=1.5", "guidance.guide.step=3"],
                  config_name="sample", output_dir=tmp_path / "out")
    images = sample(cfg)["images"]
    model = load(last, device="cpu")
    expected = model.sample(list(range(10)), sampler="ddim", steps=4,
                            guidance=Guidance(1.5, method="autoguidance", guide=load(early, device="cpu")))
    assert torch.equal(images, expected)
    assert not torch.equal(images, model.sample(list(range(10)), sampler="ddim", steps=4, guidance=0.0))


def test_cfgpp_runs_with_ddim_and_is_refused_with_other_samplers(checkpoint, tmp_path):
    from ddpm import Guidance, load
    from ddpm.validation import ConfigError, validate

    model = load(checkpoint, device="cpu")
    images = model.sample(list(range(10)), sampler="ddim", steps=5, guidance=Guidance(0.6, method="cfgpp"))
    assert images.shape == (10, 1, 8, 8) and images.abs().max() <= 1
    with pytest.raises(ConfigError, match="CFG\\+\\+ is defined for \\['ddim'\\]"):
        model.sample(list(range(10)), sampler="dpmpp_2m", steps=5, guidance=Guidance(0.6, method="cfgpp"))
    for overrides, message in ((["sampler=dpmpp_2m"], "cfgpp needs sampler=ddim sampler.eta=0"),
                               (["sampler=ddim", "guidance.scale=2"], "at most 1 with guidance.method=cfgpp")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose([f"ckpt_path={checkpoint}", "guidance.method=cfgpp", *overrides], config_name="sample"), "sample")
    cfg = compose([f"ckpt_path={checkpoint}", "sampler=ddim", "sampler.steps=5", "num_samples=10", "sampler.precision=float32",
                   "guidance.method=cfgpp", "guidance.scale=0.6"], config_name="sample", output_dir=tmp_path / "out")
    assert torch.equal(sample(cfg)["images"], images)


def test_grids_are_torchvisions_pixel_for_pixel(tmp_path):
    """ddpm.images writes torchvision's make_grid and save_image out (importing torchvision cost every command 2.7 s):
    the same PNG bytes for grey and colour images, full and ragged last rows."""
    from PIL import Image
    from torchvision.utils import make_grid as theirs_grid, save_image

    from ddpm.images import make_grid, save_png

    generator = torch.Generator().manual_seed(0)
    for shape, nrow in (((20, 1, 8, 8), 10), ((7, 3, 5, 6), 3), ((1, 1, 4, 4), 8)):
        images = torch.rand(shape, generator=generator)
        ours, theirs = make_grid(images, nrow=nrow, padding=2, pad_value=1.0), theirs_grid(images, nrow=nrow, padding=2, pad_value=1.0)
        assert torch.equal(ours, theirs), shape
        save_png(ours, tmp_path / "ours.png")
        save_image(theirs, tmp_path / "theirs.png")
        assert (Image.open(tmp_path / "ours.png").tobytes() == Image.open(tmp_path / "theirs.png").tobytes()), shape
