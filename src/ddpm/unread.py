"""Settings Hydra lets through that nothing would read: a mandatory ``???`` left unset, a ``+key=value`` that adds a
key no code reads (a typo Hydra accepts because of the +), an evaluation grid given without --multirun. Checked by
``ddpm.validation.validate`` first."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ddpm.options import config_dir

# Nodes that pass any key on, so `+key=value` may add to them: Trainer arguments, optimizer keyword arguments, logger
# keyword arguments, callbacks by name, Hydra's own settings. Anywhere else an appended key is read by nothing.
FREE_KEYS = ("trainer", "optim.optimizer", "logger", "callbacks", "hydra")


def _missing(node, prefix: str = "") -> list[str]:
    """Keys whose value is Hydra's mandatory marker ``???``."""
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in _missing(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "???" else []


def appended_keys(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """One line per ``+key=value`` override that adds a key no code reads (``+guidance.puncond=0.1``, a typo that
    Hydra accepts because of the +). ``+group=option`` (a config group, e.g. ``+data=cifar10``) is fine."""
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()} | {"experiments", "evaluations"}
    lines = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith("+") or key.startswith("++"):
            continue
        key = key[1:].split("@", 1)[0]
        parent, _, leaf = key.rpartition(".")
        if key.split("/")[0] in groups or any(key == free or key.startswith(free + ".") for free in FREE_KEYS):
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = sorted(k for k in (node.keys() if OmegaConf.is_dict(node) else []) if k != leaf and not str(k).startswith("_"))
        lines.append(f"+{key}: {parent or 'the config'} has no key {leaf!r} and nothing would read it (its keys: {known}); "
                     "check the spelling, and set an existing key without the +")
    return lines


def unread_settings(cfg: DictConfig, entry: str) -> list[str]:
    """One line per setting that would not take effect: a mandatory ``???`` left unset, an appended key nothing
    reads, an evaluation grid given without --multirun (only one default evaluation would run)."""
    from hydra.core.hydra_config import HydraConfig

    found = [f"{key}=???: must be set (it has no default); e.g. {key}=..." for key in
             sorted(k for k in _missing(OmegaConf.to_container(cfg, resolve=False)) if not k.startswith("hydra."))]
    if HydraConfig.initialized():
        found += appended_keys(cfg, list(HydraConfig.get().overrides.task))
        preset = HydraConfig.get().runtime.choices.get("evaluations")
        if entry == "evaluate" and preset is not None and str(HydraConfig.get().mode) == "RunMode.RUN":
            found.append(f"evaluations={preset}: a grid of evaluations, run with --multirun (python -m ddpm.evaluate "
                         f"--multirun evaluations={preset} ckpt_path=...); without it only one default evaluation would run")
    return found
