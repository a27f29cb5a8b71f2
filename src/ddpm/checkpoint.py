"""Checkpoints that survive faults: written atomically, read with a clear message when they cannot be.

Lightning writes ``last.ckpt`` in place, so a kill during the write leaves half a file where the previous
good checkpoint was. ``AtomicCheckpointIO`` writes to a temporary file in the same folder, flushes it to disk
and renames it over the target: a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from ddpm.validation import ConfigError

# Config keys that fix the network and the data it models: resuming or sampling across a change in any of
# them would load weights into a different model.
MODEL_KEYS = ("model", "schedule", "guidance.conditional", "data.image_size", "data.channels", "data.num_classes")
# How the network computes, not what it computes: a resumed run may switch these.
SPEED_KEYS = ("model.channels_last", "model.sdpa", "model.compile")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``<name>.tmp``, fsync, then rename over ``<name>``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A checkpoint written by ``ddpm.train``; ConfigError naming the file when it is missing, truncated or not ours.
    ``mmap``: map the tensors instead of reading them (to look at the config alone)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={str(path)!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)  # tensors and plain data only
    except Exception as error:  # truncated zip, foreign pickle, text...: torch raises many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"ckpt_path={str(path)!r}: not a readable checkpoint (truncated or not a torch file: {reason[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise ConfigError(f"ckpt_path={str(path)!r}: not a ddpm checkpoint (no state_dict and config inside; "
                          "was it written by python -m ddpm.train?)")
    return checkpoint


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_differences(saved: dict, requested: dict, keys: tuple[str, ...] = MODEL_KEYS) -> list[str]:
    """``key: checkpoint X, requested Y`` for every leaf under ``keys`` that differs between two resolved configs."""
    saved_flat, requested_flat = _flatten(saved), _flatten(requested)
    lines = []
    for key in sorted(set(saved_flat) | set(requested_flat)):
        if not any(key == k or key.startswith(k + ".") for k in keys) or key in SPEED_KEYS:
            continue
        a, b = saved_flat.get(key, "<absent>"), requested_flat.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: checkpoint {a!r}, requested {b!r}")
    return lines
