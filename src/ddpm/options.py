"""Where the configs live, and the options of a config group read as plain data, without Hydra.

``conf/`` and ``experiments/`` sit at the top of the repository. A source checkout or an editable install reads them
there; a wheel ships them inside the package as ``ddpm/conf`` (with the presets in ``ddpm/conf/experiments``), so the
entry points find them either way.

The option files are this project's registry: the only callables a checkpoint may name are the ``_target_``s written
in them (``ddpm.checkpoints``), and the Python API (``ddpm.load``) builds samplers from them by name. This module
imports nothing else of ours and no Hydra: composing a whole run is ``ddpm.config.compose``'s, reading one option of a
group is here.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The directory holding train.yaml: ``ddpm/conf`` in a wheel, ``<repo>/conf`` in a checkout."""
    for candidate in (PACKAGE_DIR / "conf", PACKAGE_DIR.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no Hydra configs found next to {PACKAGE_DIR}: reinstall the package (pip install -e .)")


def experiments_root() -> Path:
    """The directory whose ``experiments/`` and ``evaluations/`` subfolders hold the presets."""
    conf = config_dir()
    return conf if (conf / "experiments").is_dir() else conf.parent


def options(group: str) -> dict[str, Path]:
    """``{option: file}`` of a config group (``options("sampler")["ddim"]`` is conf/sampler/ddim.yaml)."""
    return {p.stem: p for p in sorted((config_dir() / group).glob("*.yaml"))}


def merge(base: Any, update: Any) -> Any:
    """OmegaConf's merge of two plain trees: mappings merged key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for key, value in update.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(update)


# ddpm.sample / ddpm.evaluate: a guidance setting given as this takes the checkpoint's own value (conf/sample.yaml)
FROM_CHECKPOINT = "checkpoint"

GLOBAL = "# @package _global_"  # an option whose keys go to the top of the config (conf/speed/*.yaml)


@functools.lru_cache(maxsize=None)
def _read(group: str, name: str) -> dict:
    path = options(group).get(name)
    if path is None:
        raise KeyError(f"{group}={name!r}: not one of {sorted(options(group))}")
    node = yaml.safe_load(path.read_text()) or {}
    defaults = node.pop("defaults", None)
    if defaults is None:
        return node
    # A group option's defaults list, as Hydra reads it: other options of the same group by name, an option of a group
    # placed under a key of this one (``/logger@wandb: wandb``), and _self_ where this file's own keys go (last when it
    # is not listed). Nothing else occurs in this project's options (a test compares with Hydra's composition).
    out: dict = {}
    entries = list(defaults) if "_self_" in defaults else [*defaults, "_self_"]
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)).startswith("override /"):
            continue  # another group's option (process=flow: schedule null, sampler ddim): ``overridden_choices``
        if entry == "_self_":
            out = merge(out, node)
        elif isinstance(entry, str):
            out = merge(out, _read(group, entry))
        elif isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)).startswith("/") and "@" in next(iter(entry)):
            (key, option), = entry.items()
            other, package = key[1:].split("@", 1)
            out = merge(out, {package: _read(other, option)})
        else:
            raise ValueError(f"{path}: a defaults entry {entry!r} that ddpm.options cannot read (use another option of "
                             f"conf/{group}/ by name)")
    return out


def overridden_choices(group: str, name: str) -> dict[str, str | None]:
    """``{group: option}`` that an option's defaults list sets for other groups (``- override /sampler: ddim``)."""
    node = yaml.safe_load(options(group)[name].read_text()) or {}
    return {key.removeprefix("override /"): value for entry in node.get("defaults") or [] if isinstance(entry, dict)
            for key, value in entry.items() if key.startswith("override /")}


def read_option(group: str, name: str) -> dict:
    """The node an option gives its group, its defaults list followed, interpolations (``${data.image_size}``) left as
    they are written."""
    return copy.deepcopy(_read(group, name))


def is_global(group: str, name: str) -> bool:
    """Whether the option writes at the top of the config (``# @package _global_``) rather than under its group."""
    return options(group)[name].read_text().startswith(GLOBAL)


def base_config(choices: dict[str, str]) -> dict:
    """The config train.yaml composes with these group options and no preset, as plain data with interpolations left
    unresolved: what Hydra's compose gives (tests/test_options.py compares the two for every option), without Hydra.
    Groups not in ``choices`` take train.yaml's defaults."""
    train = yaml.safe_load((config_dir() / "train.yaml").read_text()) or {}
    out = {k: v for k, v in train.items() if k not in ("defaults", "hydra")}  # _self_ comes first in train.yaml
    implied: dict = {}
    for group, default in train_defaults().items():  # options that choose for other groups, as Hydra's overrides do
        if group not in ("hydra", "experiments") and choices.get(group, default) is not None:
            implied.update(overridden_choices(group, choices.get(group, default)))
    choices = {**implied, **choices}
    for group, default in train_defaults().items():
        option = choices.get(group, default)
        if group in ("hydra", "experiments") or option is None:
            continue
        node = read_option(group, option)
        out = merge(out, node if is_global(group, option) else {group: node})
    return out


def targets(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path of the node, its ``_target_``) for every ``_target_`` in a plain tree."""
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            out.append((prefix.removesuffix("."), node["_target_"]))
        for key, value in node.items():
            out.extend(targets(value, f"{prefix}{key}."))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(targets(value, f"{prefix}{i}."))
    return out


@functools.cache
def shipped_targets() -> dict[str, frozenset[str]]:
    """``{group: targets of its options}`` plus ``"*"``: every target anywhere in conf/, experiments/ and evaluations/."""
    files = [*config_dir().rglob("*.yaml"), *(experiments_root() / "experiments").glob("*.yaml"),
             *(experiments_root() / "evaluations").glob("*.yaml")]
    out = {"*": frozenset(t for f in files for _, t in targets(yaml.safe_load(f.read_text()) or {}))}
    for group in sorted(p.name for p in config_dir().iterdir() if p.is_dir()):
        out[group] = frozenset(t for f in options(group).values() for _, t in targets(yaml.safe_load(f.read_text()) or {}))
    return out


def train_defaults() -> dict[str, str]:
    """The option train.yaml's defaults list picks for each group (``{"model": "unet_tiny", ...}``)."""
    entries = yaml.safe_load((config_dir() / "train.yaml").read_text())["defaults"]
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items() if not k.startswith("override ")}


def select(cfg: Any, key: str, default: Any = None) -> Any:
    """The plain value at a dotted key of a plain dict or a Config (resolving only that key), else ``default``."""
    if isinstance(cfg, dict):
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node
    from omegaconf import OmegaConf  # a DictConfig: omegaconf is loaded already

    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
