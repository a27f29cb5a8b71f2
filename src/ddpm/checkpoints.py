"""Reading a checkpoint: a file someone sends you never decides what code runs.

A checkpoint carries the resolved config it was trained with and the group options it was composed from. A config
read from a file is code chosen by whoever wrote it (each ``_target_`` is a callable), so it is never built as it is:
``rebuild_config`` takes a fresh config from this project's ``conf/`` with the recorded choices (``ddpm.options``) and
copies only plain values onto it. To load a network of your own, add it as an option (``conf/model/my_net.yaml``):
the config tree is the registry.

No Hydra, omegaconf or Lightning here: the Python API (``ddpm.load``) reads checkpoints through this module too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from ddpm.core.errors import ConfigError
from ddpm.options import base_config, is_global, options, read_option, targets, train_defaults

def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                    build_from_config: bool = True, key: str = "ckpt_path") -> dict:
    """A checkpoint written by ``ddpm.train``; ConfigError naming the file when it is missing, truncated, not ours,
    or carries a config that is not this project's (``rebuild_config``); its ``config`` is the rebuilt one. ``mmap``:
    map the tensors instead of reading them (to look at the config alone).

    ``build_from_config=False``: nothing will be built from its config (a run resuming from it builds from the
    command line's config and only compares the two), so the config is read as data, in today's names
    (``upgrade_config``), and a callback of the user's own (``+callbacks.mine._target_=...``) does not refuse it.
    ``key``: the setting that named the file, for the messages (``guidance.guide.ckpt_path`` for a guide)."""
    path = Path(path).expanduser()
    source = f"{key}={str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{source}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)  # tensors and plain data only
    except Exception as error:  # truncated zip, foreign pickle, text...: torch raises many kinds
        raise ConfigError(f"{source}: {_load_failure(error)}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise ConfigError(f"{source}: not a ddpm checkpoint (no state_dict and config inside; "
                          "was it written by python -m ddpm.train?)")
    step = checkpoint.get("global_step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"{source}: its global_step is {str(step)[:40]!r}, not a step count; not a ddpm "
                          "checkpoint")
    if not build_from_config:
        checkpoint["config"] = upgrade_config(checkpoint["config"])
        return checkpoint
    checkpoint["config"] = rebuild_config(checkpoint["config"], source, checkpoint.get("choices"))
    return checkpoint


# Modules that moved (ddpm/core, ddpm/training, ddpm/evaluation); a checkpoint written before names the old paths.
MOVED_MODULES = {
    **{f"ddpm.{m}": f"ddpm.core.{m}" for m in ("schedules", "guidance", "unet", "samplers")},
    "ddpm.diffusion": "ddpm.core.processes.ddpm", "ddpm.core.diffusion": "ddpm.core.processes.ddpm",
    **{f"ddpm.{m}": f"ddpm.training.{m}" for m in ("module", "callbacks", "checkpoint", "loggers", "rundirs")},
}
# Targets that were renamed or moved one by one (the data sets became plain datasets in ddpm.data, which training
# wraps; training's callbacks went to one module per concept).
RENAMED_TARGETS = {
    **{f"{module}.{old}": f"ddpm.data.{new}" for module in ("ddpm.data", "ddpm.training.data")
       for old, new in (("DigitsDataModule", "Digits"), ("TorchvisionDataModule", "Torchvision"),
                        ("ImageFolderDataModule", "ImageFolderData"))},
    **{f"ddpm.training.callbacks.{name}": f"ddpm.training.{module}.{name}" for name, module in (
        ("SampleGrid", "sampling"), ("SampleQuality", "sampling"), ("EvaluateAtEnd", "sampling"),
        ("SaveResolvedConfig", "checkpoint"), ("LastCheckpoint", "checkpoint"), ("ProgressBar", "progress"),
        ("ProgressLog", "progress"))},
}
# Samplers were functions built as partials (``_partial_: true``); they are classes whose fields are the same keys.
SAMPLER_CLASSES = {f"ddpm.core.samplers.{module}.sample_{module}": f"ddpm.core.samplers.{module}.{cls}" for module, cls in (
    ("ddim", "DDIM"), ("ddpm", "DDPMSampler"), ("dpmpp_2m", "DPMSolverPP2M"), ("heun", "Heun"))}
RENAMED_TARGETS.update(SAMPLER_CLASSES)


# What a config without a ``diffusion`` node means (every checkpoint written before the node existed): eps, L_simple.
DIFFUSION_DEFAULTS = {"prediction": "eps", "loss_weight": "uniform", "min_snr_gamma": 5.0}


def upgrade_config(config: Any) -> Any:
    """A checkpoint's config in today's terms: moved targets renamed (``upgrade_targets``) and, when it predates the
    ``diffusion`` node, that node with the settings it was trained with (``DIFFUSION_DEFAULTS``); a schedule from before
    ``schedule.zero_terminal_snr`` was not rescaled."""
    config = upgrade_targets(config)
    if isinstance(config, dict) and "diffusion" not in config:
        config["diffusion"] = dict(DIFFUSION_DEFAULTS)
    if isinstance(config, dict) and isinstance(config.get("ema"), dict):  # before post-hoc EMA: the classic one only
        config["ema"].setdefault("warmup", False)
        config["ema"].setdefault("sigma_rels", [])
        if "snapshot_every" in config["ema"]:  # before snapshot_count: full-precision snapshots every N steps
            config["ema"].setdefault("snapshot_count", 0)
            config["ema"].setdefault("snapshot_dtype", "float32")
    if isinstance(config, dict) and isinstance(config.get("schedule"), dict):
        config["schedule"].setdefault("zero_terminal_snr", False)
    return config


def upgrade_targets(config: Any) -> Any:
    """``config`` with each ``_target_`` under a moved module renamed to where it lives now (``ddpm.unet.UNet`` ->
    ``ddpm.core.unet.UNet``). Only renames: the result is still only compared with conf/ (``rebuild_config``)."""
    if isinstance(config, list):
        return [upgrade_targets(v) for v in config]
    if not isinstance(config, dict):
        return config
    out = {k: upgrade_targets(v) for k, v in config.items()}
    target = out.get("_target_")
    if isinstance(target, str):
        old = next((m for m in MOVED_MODULES if target.startswith(m + ".")), None)
        if old is not None:
            out["_target_"] = MOVED_MODULES[old] + target[len(old):]
        out["_target_"] = RENAMED_TARGETS.get(out["_target_"], out["_target_"])
        if out["_target_"] in SAMPLER_CLASSES.values():
            out.pop("_partial_", None)
    return out


def _load_failure(error: Exception) -> str:
    text = str(error).strip()
    if "Weights only load failed" in text:  # a pickle that names Python objects: refused, never unpickled
        detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line), "")
        return ("refused: the file holds pickled Python objects, not only tensors and plain data, and loading it could "
                f"run code ({detail or 'torch.load(weights_only=True) refused it'}). ddpm checkpoints never need this: "
                "only if you trust its source, convert it yourself")
    reason = text.splitlines()[0] if text else type(error).__name__
    return f"not a readable checkpoint (truncated or not a torch file: {reason})"


# --- rebuilding from a checkpoint's config: only this project's own options -------------------------------------
# A checkpoint's config is never built as it is: ``rebuild_config`` composes a fresh config from this project's conf/
# with the run's group choices (``checkpoint["choices"]``; inferred for checkpoints from before them) and walks both
# trees together: every key of the checkpoint must be a key of that config, its plain values are kept, and every
# ``_target_`` (and ``_partial_``, ...) of the result is the composed option's, the checkpoint's own only compared with
# it. Keys the run had removed (``~callbacks.sample_grid``) stay removed.

def leaves(node: Any, prefix: str = "", into_lists: bool = True) -> dict[str, Any]:
    """``{"a.b.0": value}`` for every leaf of a nested dict (and list, with ``into_lists``). For configs this project
    composed (dotted keys cannot occur in them) and for comparisons; never the basis of a trust decision."""
    if isinstance(node, dict) or (into_lists and isinstance(node, list)):
        out = {}
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            out.update(leaves(value, f"{prefix}{key}.", into_lists))
        return out
    return {prefix[:-1]: node}


IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z", re.ASCII)  # keys of a config: plain ASCII identifiers, nothing else
SCALARS = (str, int, float, bool, type(None))
# The groups a run chooses options of (train.yaml's defaults list, less hydra's own and the presets, which act through
# the choices and values they set).
CHOSEN_GROUPS = ("data", "model", "process", "objective", "schedule", "guidance", "sampler", "optim", "trainer", "callbacks", "logger",
                 "paths", "speed")



def _refuse(source: str, what: str) -> ConfigError:
    return ConfigError(f"{source}: {what}; a checkpoint may only select among the options in conf/ (add yours there): "
                       "refusing to build anything from it")


def _checked_choices(choices: Any, source: str) -> dict[str, str]:
    """The checkpoint's recorded choices, each an existing option of one of CHOSEN_GROUPS, or a one-line refusal."""
    if not isinstance(choices, dict):
        raise _refuse(source, f"its recorded group choices are {type(choices).__name__}, not a mapping")
    for group, option in choices.items():
        if group not in CHOSEN_GROUPS:
            raise _refuse(source, f"it records a choice for {str(group)[:40]!r}, which is not a config group {list(CHOSEN_GROUPS)}")
        if option is None:  # no option (process=flow removes the schedule): its node must be absent (``_overlay``)
            continue
        if not isinstance(option, str) or not IDENTIFIER.match(option) or option not in options(group):
            raise _refuse(source, f"{group}={str(option)[:60]!r} is not one of this project's options {sorted(options(group))}")
    return dict(choices)


def infer_choices(config: dict) -> dict[str, str]:
    """The option of each group that a config (from a checkpoint without recorded choices) was composed with: the one
    whose node has the same ``_target_``s and the most values in common, the default on a tie. A wrong guess costs
    nothing: the values are the checkpoint's anyway, and a target that differs is refused."""
    defaults = train_defaults()
    choices = {}
    for group in CHOSEN_GROUPS:
        node = config.get(group)
        # plain values only: a tensor compared with == answers with a tensor (the overlay refuses it anyway)
        stored = {k: v for k, v in leaves(node).items() if isinstance(v, SCALARS)} if isinstance(node, dict) else {}
        targets = {k: v for k, v in stored.items() if k.endswith("_target_")}

        def score(name, option):
            same_targets = {k: v for k, v in option.items() if k.endswith("_target_")} == targets
            return same_targets, sum(option.get(k, object()) == v for k, v in stored.items()), name == defaults.get(group)

        # the option files themselves first; composed (their defaults lists followed) when none has the same targets
        for read in (lambda name, path: leaves(yaml.safe_load(path.read_text()) or {}),
                     lambda name, path: leaves(read_option(group, name))):
            scores = {name: score(name, read(name, path)) for name, path in options(group).items()}
            if scores:
                choices[group] = max(scores, key=scores.get)
            if not scores or scores[choices[group]][0]:
                break
    return choices


def _targets_of(group: str, inner: str) -> list[str]:
    """The targets the options of ``group`` put at ``inner`` (a dotted path inside the group's node), for messages; an
    option written at the top of the config (``# @package _global_``: process=, objective=) puts them under the group."""
    full = f"{group}.{inner}" if inner else group
    return sorted({t for name, p in options(group).items() for path, t in targets(yaml.safe_load(p.read_text()) or {})
                   if path == (full if is_global(group, name) else inner)})


def _plain(value: Any) -> bool:
    return isinstance(value, SCALARS) or (isinstance(value, list) and all(_plain(v) for v in value))


def _same(ours: Any, theirs: Any) -> bool:
    """Whether a value read from a file equals ours: plain values of the same type only (a tensor compared with ``==``
    would answer with a tensor)."""
    return isinstance(theirs, SCALARS) and type(ours) is type(theirs) and ours == theirs


# How deep and how large a checkpoint's config may be: ours are about 5 levels and 300 values. A file can hold a
# mapping that contains itself (pickle's memo), which a recursive walk would follow forever.
MAX_DEPTH, MAX_NODES = 32, 100_000


def _check_shape(config: Any, source: str) -> None:
    """Refuse a config that is deeper than MAX_DEPTH, larger than MAX_NODES, or contains itself."""
    stack, seen = [(config, 0)], 0
    on_path: set[int] = set()
    exits: list[int] = []
    while stack:
        node, depth = stack.pop()
        if node is None and depth < 0:  # the end of a container's children
            on_path.discard(exits.pop())
            continue
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_NODES:
            raise _refuse(source, f"its config is deeper than {MAX_DEPTH} levels or larger than {MAX_NODES} values")
        if isinstance(node, (dict, list)):
            if id(node) in on_path:
                raise _refuse(source, "its config contains itself")
            on_path.add(id(node))
            exits.append(id(node))
            stack.append((None, -1))
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))


def _overlay(base: Any, stored: Any, path: str, source: str) -> Any:
    """``stored`` (a checkpoint's config) with the ``_target_``s of ``base`` (composed from conf/): its keys, which must
    all be keys of ``base``, and its plain values."""
    where = path or "the config"
    if isinstance(stored, dict):
        target = stored.get("_target_")
        if "_target_" in stored and (not isinstance(base, dict) or not _same(base.get("_target_"), target)):
            group, _, inner = path.partition(".")
            allowed = _targets_of(group, f"{inner}" if inner else "") if group in CHOSEN_GROUPS else []
            raise _refuse(source, f"config key {path + '.' if path else ''}_target_={str(target)[:120]!r} is not one of "
                                  f"this project's options" + (f" {allowed}" if allowed else ""))
        if base is None and not stored:
            return None
        if not isinstance(base, dict):
            raise _refuse(source, f"config key {where} holds a mapping where this project's config has {str(base)[:60]!r}")
        out = {key: value for key, value in base.items() if key.startswith("_")}  # the option's _target_, _partial_
        for key, value in stored.items():
            if not isinstance(key, str) or not IDENTIFIER.match(key):
                raise _refuse(source, f"config key {str(key)[:60]!r} under {where} is not a plain identifier")
            here = f"{path}.{key}" if path else key
            if key.startswith("_"):
                if key not in base or not _same(base[key], value):
                    raise _refuse(source, f"config key {here}={str(value)[:80]!r} differs from this project's "
                                          f"{base.get(key, '<absent>')!r}")
                continue
            if key not in base:
                if isinstance(value, dict) and "_target_" in value:
                    raise _refuse(source, f"config key {here}._target_={str(value['_target_'])[:120]!r} is not one of "
                                          "this project's options")
                raise _refuse(source, f"config key {here} is not a key of this project's config")
            out[key] = _overlay(base[key], value, here, source)
        return out
    if isinstance(stored, list):
        if isinstance(base, list) and any(isinstance(b, dict) for b in base):  # e.g. trainer.plugins: node by node
            if len(stored) != len(base):
                raise _refuse(source, f"config key {where} holds {len(stored)} entries where this project's has {len(base)}")
            return [_overlay(b, v, f"{path}.{i}", source) for i, (b, v) in enumerate(zip(base, stored))]
        if isinstance(base, dict) or not _plain(stored):
            first = next((v for v in stored if isinstance(v, dict)), None)
            if isinstance(first, dict) and "_target_" in first:
                raise _refuse(source, f"config key {where} holds a _target_={str(first['_target_'])[:120]!r}, not one of "
                                      "this project's options")
            raise _refuse(source, f"config key {where} holds a list of mappings where this project's config has "
                                  f"{str(base)[:60]!r}")
        return _check_strings(stored, path, source)
    if not isinstance(stored, SCALARS):
        raise _refuse(source, f"config key {where} holds a {type(stored).__name__}, not a plain value")
    if isinstance(base, dict) and stored is not None:  # null switches a node off (callbacks.evaluate_at_end: null)
        raise _refuse(source, f"config key {where} holds {str(stored)[:60]!r} where this project's config has a mapping")
    return _check_strings(stored, path, source)


def _check_strings(value: Any, path: str, source: str) -> Any:
    """A value copied as it is, once no string in it would be read as an interpolation (a saved config is resolved,
    and resolvers such as ``oc.decode`` can create nodes)."""
    for text in (value if isinstance(value, list) else [value]):
        if isinstance(text, list):
            _check_strings(text, path, source)
        elif isinstance(text, str) and "${" in text:
            raise ConfigError(f"{source}: config key {path} holds an interpolation {text[:80]!r}; a checkpoint's config is "
                              "saved resolved, so this file was altered: refusing to load it")
    return value


def rebuild_config(config: Any, source: str, choices: Any = None) -> dict:
    """A checkpoint's config recomposed from this project's own conf/ (see above): today's options chosen as the run
    chose them, the run's values copied over them. ConfigError, one line, for anything that is not a plain value at a
    key this project's config has, or a ``_target_`` other than the option's own."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: its config is not a mapping; not a ddpm checkpoint")
    _check_shape(config, source)
    _check_shape(choices, source)
    config = upgrade_config(copy.deepcopy(config))
    choices = _checked_choices(choices, source) if choices is not None else infer_choices(config)
    # Every key of the result is the checkpoint's, so none of conf/'s interpolations is left (the overlay keeps only the
    # _target_-like keys of the base, and refuses interpolations in the file).
    return _overlay(base_config(choices), config, "", source)


