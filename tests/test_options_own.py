"""Each option owns its settings and its rules (issue 30): the copies that drifted apart, now one, each with a test that
failed before: resuming another process's run, an explicit model.num_classes, non-finite numbers, one EMA update."""

import math

import pytest
import torch
from conftest import TINY

from ddpm.config import compose
from ddpm.core.errors import ConfigError
from ddpm.train import train
from ddpm.validation import validate

CONTINUOUS = [o for o in TINY if not o.startswith("schedule.")]


def test_resuming_a_flow_runs_folder_as_edm_is_refused(tmp_path):
    """training/checkpoint.py's MODEL_KEYS lacked ``process``: the flow run's weights were loaded into an EDM run."""
    run = tmp_path / "run"
    train(compose([*CONTINUOUS, "process=flow", "trainer.max_steps=2", "~callbacks.sample_grid"], output_dir=run))
    with pytest.raises(ConfigError) as refused:
        train(compose([*CONTINUOUS, "process=edm", "trainer.max_steps=4", "~callbacks.sample_grid"], output_dir=run))
    message = str(refused.value)
    assert "\n" not in message and "holds a different model than requested" in message and "process._target_" in message


def test_an_explicit_model_num_classes_is_honoured_or_refused(tmp_path):
    """It was silently replaced by data.num_classes: now a class embedding as wide as asked for (a row per class and
    one for the null label), and one too narrow for the data's labels is refused in one line."""
    module = train(compose([*TINY, "model.num_classes=12", "trainer.max_steps=1", "~callbacks.sample_grid"],
                           output_dir=tmp_path / "wide"))
    assert module.net.class_embed.num_embeddings == 13 and module.net.null_label == 12
    with pytest.raises(ConfigError, match=r"^model.num_classes=5: must be at least data.num_classes=10"):
        validate(compose([*TINY, "model.num_classes=5"], output_dir=tmp_path / "narrow"), "train")


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_number_is_refused_wherever_it_is_read(value, tmp_path):
    """The eight "is this a number" tests did not agree: guidance.scale=inf trained and sampled NaNs."""
    from ddpm.core.guidance import Guidance

    for overrides, key in ((["guidance.scale=" + value], "guidance.scale"), (["guidance.rescale=" + value], "guidance.rescale"),
                           (["optim.optimizer.lr=" + value], "optim.optimizer.lr"), (["ema.decay=" + value], "ema.decay"),
                           (["sampler=ddim", "sampler.eta=" + value], "sampler.eta")):
        with pytest.raises(ConfigError, match=rf"{key}=") as refused:
            validate(compose([*TINY, *overrides], output_dir=tmp_path / "run"), "train")
        assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"guidance.scale=.*must be checkpoint \(the checkpoint's own value\) or a number"):
        validate(compose(["ckpt_path=x", f"guidance.scale={value}"], config_name="sample"), "sample")
    with pytest.raises(ConfigError, match="guidance.scale="):
        Guidance(float(value))


def test_the_classic_and_the_power_emas_update_through_one_function(tmp_path, monkeypatch):
    """The EMA update was written twice (training/module.py and core/ema.py); now both call core/ema.py's."""
    import ddpm.core.ema as ema
    import ddpm.training.module as module

    calls = []
    real = ema.lerp_weights_

    def counting(average, net, weight):
        calls.append(weight)
        return real(average, net, weight)

    monkeypatch.setattr(ema, "lerp_weights_", counting)
    monkeypatch.setattr(module, "lerp_weights_", counting)
    train(compose([*TINY, "trainer.max_steps=2", "~callbacks.sample_grid", "ema.decay=0.9", "ema.sigma_rels=[0.05,0.1]"],
                  output_dir=tmp_path / "run"))
    classic = [w for w in calls if math.isclose(w, 0.1)]
    assert len(calls) == 2 * 3 and len(classic) == 2  # per step: the classic EMA and the two power EMAs
