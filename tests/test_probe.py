"""Values checked before compute, and no non-finite result written as an image (issue 29, items 3 and 4): the dry run
of every sampler on a probe network (``ddpm.core.probe``), the bounds on sizes, weights and samples checked."""

import math

import lightning as L
import pytest
import torch
from conftest import TINY

from ddpm.config import compose
from ddpm.core.errors import ConfigError
from ddpm.train import train
from ddpm.validation import validate

CONTINUOUS = [o for o in TINY if not o.startswith("schedule.")]

TOO_LATE = [  # (overrides, the keys the one line names): each trained before, and failed (or wrote black images) after
    (["process=edm", "sampler.rho=1e-300"], ["sampler=heun(rho=1e-300)", "levels cannot be computed"]),
    (["process=edm", "process.c_noise_scale=1e308"], ["c_noise_scale=1e+308", "noise input"]),
    (["process=flow", "process.c_noise_scale=1e308"], ["c_noise_scale=1e+308", "beyond float32"]),
    (["process=edm", "process.sigma_min=1e-300"], ["process=edm", "non-finite"]),
    (["process=edm", "data.sigma_data=1e-300"], ["sigma_data=1e-300", "not finite"]),
    (["process=edm", "sampler.S_churn=40", "sampler.S_noise=1e308"], ["S_noise=1e+308", "not finite"]),
    (["process=flow", "callbacks.sample_grid.steps=1000000000000"], ["callbacks.sample_grid.steps=1000000000000", "100000"]),
    (["process=flow", "sampler.steps=1000000000000"], ["sampler.steps=1000000000000", "100000"]),
    (["callbacks.sample_grid.per_class=1000000000000"], ["callbacks.sample_grid:", "half of this machine's"]),
    (["callbacks.sample_grid.min_size=10000000"], ["callbacks.sample_grid:", "10000000x10000000"]),
    (["+callbacks.evaluate_at_end.num_samples=1000000000000"], ["callbacks.evaluate_at_end.num_samples", "half of this machine's"]),
    (["sampler=heun", "sampler.lambda_min=-1000"], ["sampler.lambda_min=-1000", ">= -30.0"]),
]


@pytest.mark.parametrize("overrides,keys", TOO_LATE, ids=[" ".join(o) for o, _ in TOO_LATE])
def test_a_value_that_would_fail_late_is_refused_at_start(overrides, keys, tmp_path):
    extra = [o for o in overrides if o.startswith("+callbacks.evaluate_at_end")]
    base = [o for o in CONTINUOUS if not (extra and o == "~callbacks.evaluate_at_end")]
    cfg = compose([*base, *[o.lstrip("+") if extra and o in extra else o for o in overrides]], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as refused:
        validate(cfg, "train")
    message = str(refused.value)
    assert "\n" not in message and all(key in message for key in keys), message


def test_the_defaults_of_every_process_pass_the_dry_run(tmp_path):
    for process in ("ddpm", "flow", "edm", "trigflow"):
        overrides = TINY if process == "ddpm" else [*CONTINUOUS, f"process={process}"]
        validate(compose([*overrides, "callbacks.sample_grid.steps=null"], output_dir=tmp_path / process), "train")


class FailingGrid(L.Callback):
    """A grid that fails at step 4 (as an overflowing sampler setting once did at step 1,000): the step is saved first."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 4:
            raise OverflowError("(34, 'Numerical result out of range')")


def test_a_step_is_saved_before_an_optional_callbacks_error_ends_the_run(tmp_path):
    """Lightning runs its checkpoint callbacks last in a step: the grid's error came before the step's checkpoint, and
    the run had nothing to resume from. Now last.ckpt holds step 4, and the same command resumes from it."""
    common = [*TINY, "trainer.max_steps=8", "~callbacks.sample_grid", "callbacks.model_checkpoint.every_n_train_steps=0"]
    with pytest.raises(OverflowError):
        train(compose(common, output_dir=tmp_path / "run"), [FailingGrid()])
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    module = train(compose(common, output_dir=tmp_path / "run"))
    assert module.global_step == 8


# --- sampling: a checkpoint's process, its weights, the samples --------------------------------------------------
@pytest.fixture(scope="module")
def edm_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("edm") / "run"
    train(compose([*CONTINUOUS, "process=edm", "trainer.max_steps=2", "~callbacks.sample_grid"], output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def _altered(path, tmp_path, change):
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    out = tmp_path / "altered.ckpt"
    torch.save(checkpoint, out)
    return out


@pytest.mark.parametrize("key,value,words", [("c_noise_scale", 1e308, "beyond float32"), ("sigma_min", 1e-300, "non-finite"),
                                             ("sigma_data", 1e-300, "not finite")])
def test_a_checkpoint_whose_process_cannot_sample_is_refused_before_sampling(edm_checkpoint, tmp_path, key, value, words):
    from ddpm.sample import sample

    sent = _altered(edm_checkpoint, tmp_path, lambda c: c["config"]["process"].update({key: value}))
    cfg = compose([f"ckpt_path={sent}", "num_samples=10", "sampler=heun", "sampler.steps=5"], config_name="sample",
                  output_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match=words) as refused:
        sample(cfg)
    assert "\n" not in str(refused.value) and not (tmp_path / "out" / "grid.png").exists()


def test_a_checkpoint_with_non_finite_weights_is_refused_at_load(edm_checkpoint, tmp_path):
    import ddpm

    def poison(checkpoint):
        key = next(k for k in checkpoint["state_dict"] if k.startswith("ema.module.") and k.endswith("weight"))
        checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], math.nan)

    with pytest.raises(ConfigError, match=r"holds non-finite weights \(.*weight\)"):
        ddpm.load(_altered(edm_checkpoint, tmp_path, poison), device="cpu")


def test_non_finite_samples_stop_with_their_likely_cause_and_write_nothing(edm_checkpoint, tmp_path, monkeypatch):
    """Finite weights whose outputs diverge: the samples are refused (not written black), and the line says the settings
    are fine, so the network's own output is the cause."""
    import ddpm
    from ddpm.inference import NonFiniteSamples

    model = ddpm.load(edm_checkpoint, device="cpu")
    real_forward = model.net.forward
    monkeypatch.setattr(model.net, "forward", lambda x, t, labels=None: real_forward(x, t, labels) * math.inf)
    with pytest.raises(NonFiniteSamples, match=r"sampling gave 3 of 3 images with non-finite values.*network's own outputs"):
        model.sample([1, 2, 3], sampler="heun", steps=3)
