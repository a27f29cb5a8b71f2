"""``ddpm.options`` reads conf/ without Hydra (for checkpoints and the Python API); Hydra composes the same configs at the
entry points. The two must agree, option by option, or a checkpoint would be rebuilt against another config."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ddpm import options
from ddpm.config import compose

GROUPS = [g for g in options.train_defaults() if g not in ("hydra", "experiments")]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_reads_as_hydra_composes_it(group):
    for name in options.options(group):
        composed = OmegaConf.to_container(compose([f"{group}={name}"]), resolve=False)
        composed.pop("hydra", None)
        assert options.base_config({group: name}) == composed, f"{group}={name}"


def test_defaults_lists_are_followed_and_merged_like_omegaconf():
    zero = options.read_option("schedule", "cosine_zero_terminal_snr")
    assert zero == {**options.read_option("schedule", "cosine"), "zero_terminal_snr": True}
    assert set(options.read_option("logger", "wandb_csv")) == {"wandb", "csv"}
    assert options.merge({"a": {"b": 1, "c": [1, 2]}}, {"a": {"c": [3]}, "d": 4}) == {"a": {"b": 1, "c": [3]}, "d": 4}


def test_an_unreadable_defaults_entry_is_refused(tmp_path, monkeypatch):
    (tmp_path / "schedule").mkdir(parents=True)
    (tmp_path / "train.yaml").write_text("defaults: []\n")
    (tmp_path / "schedule" / "odd.yaml").write_text("defaults:\n  - /model: x\n")  # another group, no package
    monkeypatch.setattr(options, "config_dir", lambda: tmp_path)
    options._read.cache_clear()
    try:
        with pytest.raises(ValueError, match="cannot read"):
            options.read_option("schedule", "odd")
    finally:
        options._read.cache_clear()
