"""Checkpoints that survive faults and never run code: written atomically, read with a clear message when they
cannot be, and rebuilt only from this project's own options.

Lightning writes ``last.ckpt`` in place, so a kill during the write leaves half a file where the previous
good checkpoint was. ``AtomicCheckpointIO`` writes to a temporary file in the same folder, flushes it to disk
and renames it over the target: a reader sees the old file or the new one, never a torn one.

A checkpoint carries the resolved config it was trained with, and the model is rebuilt from it. Rebuilding
calls each node's ``_target_``, so that config is code chosen by whoever wrote the file: ``check_trusted``
accepts only the targets of the options shipped in ``conf/`` (each group's own, at that group's place) and
refuses anything else before a single object is built. To load a network of your own, add it as an option
(``conf/model/my_net.yaml``): the config tree is the registry.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO

from ddpm.core.errors import ConfigError

# Config keys that fix the network and the data it models: resuming or sampling across a change in any of
# them would load weights into a different model.
MODEL_KEYS = ("model", "schedule", "diffusion.prediction", "guidance.conditional", "data.image_size", "data.channels", "data.num_classes")
# How the network computes, not what it computes: a resumed run may switch these.
SPEED_KEYS = ("model.channels_last", "model.sdpa", "model.compile")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous checkpoints are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``.<name>.tmp``, fsync, then rename over ``<name>``; read back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Every file Lightning reads back (a resume, ddp_spawn's weights of rank 0): tensors and plain data only,
        # whatever the caller asks, since a pickle can run code.
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` atomically: a reader sees the old file or the new one, never a torn one; a
    full disk raises CheckpointWriteError naming the file and the room left, and leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(_write_failure(path, error)) from None
    os.replace(tmp, path)


def temporary_path(path: Path) -> Path:
    """Where ``AtomicCheckpointIO`` writes ``path`` before renaming it: a hidden ``.<name>.tmp`` beside it."""
    return path.with_name(f".{path.name}.tmp")


def _write_failure(path: Path, error: Exception) -> str:
    """One line: which file, why, how much room the disk has, and that the older checkpoints are untouched."""
    free = shutil.disk_usage(path.parent).free
    full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error) or free < 2**20
    reason = "no space left on the disk" if full else (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"could not write checkpoint {path}: {reason} ({free / 2**20:.0f} MiB free in {path.parent}); the earlier "
            "checkpoints there are intact: free some space and run the same command again to resume")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A checkpoint written by ``ddpm.train``; ConfigError naming the file when it is missing, truncated, not ours,
    or carries a config that would run code (``check_trusted``). ``mmap``: map the tensors instead of reading them
    (to look at the config alone)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)  # tensors and plain data only
    except Exception as error:  # truncated zip, foreign pickle, text...: torch raises many kinds
        raise ConfigError(f"ckpt_path={str(path)!r}: {_load_failure(error)}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise ConfigError(f"ckpt_path={str(path)!r}: not a ddpm checkpoint (no state_dict and config inside; "
                          "was it written by python -m ddpm.train?)")
    checkpoint["config"] = upgrade_config(checkpoint["config"])
    check_trusted(checkpoint["config"], f"ckpt_path={str(path)!r}")
    return checkpoint


# Modules that moved (ddpm/core, ddpm/training, ddpm/evaluation); a checkpoint written before names the old paths.
MOVED_MODULES = {
    **{f"ddpm.{m}": f"ddpm.core.{m}" for m in ("schedules", "diffusion", "guidance", "unet", "samplers")},
    **{f"ddpm.{m}": f"ddpm.training.{m}" for m in ("module", "data", "callbacks", "checkpoint", "loggers", "rundirs")},
}


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
    if isinstance(config, dict) and isinstance(config.get("schedule"), dict):
        config["schedule"].setdefault("zero_terminal_snr", False)
    return config


def upgrade_targets(config: Any) -> Any:
    """``config`` with each ``_target_`` under a moved module renamed to where it lives now (``ddpm.unet.UNet`` ->
    ``ddpm.core.unet.UNet``). Only renames: ``check_trusted`` still decides what may be built from the result."""
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
# The config keys a checkpoint's model is rebuilt from (instantiated), and the conf/ group whose options they select.
REBUILT = {"model": "model", "schedule": "schedule", "sampler": "sampler", "optim.optimizer": "optim", "data": "data"}


def leaves(node: Any, prefix: str = "", into_lists: bool = True) -> dict[str, Any]:
    """``{"a.b.0": value}`` for every leaf of a nested dict (and list, with ``into_lists``)."""
    if isinstance(node, dict) or (into_lists and isinstance(node, list)):
        out = {}
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            out.update(leaves(value, f"{prefix}{key}.", into_lists))
        return out
    return {prefix[:-1]: node}


def _targets(node: Any) -> list[tuple[str, Any]]:
    """(path of the node, target) for every ``_target_`` in a YAML/config tree."""
    return [(path.removesuffix("_target_").removesuffix("."), value) for path, value in leaves(node).items()
            if path == "_target_" or path.endswith("._target_")]


@functools.cache
def shipped_targets() -> dict[str, frozenset[str]]:
    """``{rebuilt key: targets of its group's options}`` plus ``"*"``: every target anywhere in conf/ and experiments/.
    Read from the YAML files themselves, so adding an option is all it takes to make it loadable."""
    from ddpm.config import config_dir, experiments_root

    files = [*config_dir().rglob("*.yaml"), *(experiments_root() / "experiments").glob("*.yaml"),
             *(experiments_root() / "evaluations").glob("*.yaml")]
    everywhere = {target for f in files for _, target in _targets(yaml.safe_load(f.read_text()) or {})}
    out = {"*": frozenset(everywhere)}
    for key, group in REBUILT.items():
        inner = key.split(".", 1)[1] if "." in key else ""
        out[key] = frozenset(target for f in (config_dir() / group).glob("*.yaml")
                             for path, target in _targets(yaml.safe_load(f.read_text()) or {}) if path == inner)
    return out


def check_trusted(config: Any, source: str) -> None:
    """Refuse a checkpoint's config that would make rebuilding call anything but this project's own options: a
    ``_target_`` not shipped in conf/, one at a place its group does not put it (e.g. hidden under ``model``), or an
    interpolation (``${...}``; a saved config is resolved, and resolvers such as ``oc.decode`` can create nodes)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: its config is not a mapping; not a ddpm checkpoint")
    allowed = shipped_targets()
    for path, value in leaves(config).items():
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{source}: config key {path} holds an interpolation {value[:80]!r}; a checkpoint's "
                              "config is saved resolved, so this file was altered: refusing to load it")
    for key in REBUILT:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not (isinstance(node, dict) and "_target_" in node):
            raise ConfigError(f"{source}: config key {key} has no _target_; not a ddpm checkpoint")
    for path, target in _targets(config):
        rebuilt = next((key for key in REBUILT if path == key or path.startswith(key + ".")), None)
        ok = target in allowed[rebuilt] and path == rebuilt if rebuilt else target in allowed["*"]
        if not ok or not isinstance(target, str):
            options = sorted(allowed[rebuilt]) if rebuilt else None
            where = f"{path}._target_" if path else "_target_"
            raise ConfigError(f"{source}: config key {where}={target!r} is not one of this project's options"
                              + (f" {options}" if options else "") + "; a checkpoint may only select among the options "
                              "in conf/ (add yours there): refusing to build anything from it")


def config_differences(saved: dict, requested: dict, keys: tuple[str, ...] = MODEL_KEYS) -> list[str]:
    """``key: checkpoint X, requested Y`` for every leaf under ``keys`` that differs between two resolved configs."""
    saved_flat, requested_flat = leaves(saved, into_lists=False), leaves(requested, into_lists=False)
    lines = []
    for key in sorted(set(saved_flat) | set(requested_flat)):
        if not any(key == k or key.startswith(k + ".") for k in keys) or key in SPEED_KEYS:
            continue
        a, b = saved_flat.get(key, "<absent>"), requested_flat.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: checkpoint {a!r}, requested {b!r}")
    return lines
