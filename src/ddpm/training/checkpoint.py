"""Checkpoints that survive faults: written atomically, with the run's group choices recorded.

Lightning writes ``last.ckpt`` in place, so a kill during the write leaves half a file where the previous
good checkpoint was. ``AtomicCheckpointIO`` writes to a temporary file in the same folder, flushes it to disk
and renames it over the target: a reader sees the old file or the new one, never a torn one. Reading one back, and
refusing what is not this project's, is ``ddpm.checkpoints``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from ddpm.checkpoints import CHOSEN_GROUPS, leaves
from ddpm.files import WriteError, atomic_write

# Config keys that fix the network and the data it models: resuming or sampling across a change in any of
# them would load weights into a different model.
MODEL_KEYS = ("model", "schedule", "diffusion.prediction", "guidance.conditional", "data.image_size", "data.channels", "data.num_classes")
# How the network computes, not what it computes: a resumed run may switch these.
SPEED_KEYS = ("model.channels_last", "model.sdpa", "model.compile")


class CheckpointWriteError(WriteError):
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
    """torch.save ``obj`` to ``path`` atomically (``ddpm.files.atomic_write``): a reader sees the old file or the new
    one, never a torn one; a full disk raises CheckpointWriteError naming the file and the room left."""
    try:
        atomic_write(Path(path), lambda f: torch.save(obj, f), what="checkpoint")
    except WriteError as error:
        raise CheckpointWriteError(f"{error}; the earlier checkpoints there are intact: free some space and run the same "
                                   "command again to resume") from None


def recorded_choices() -> dict[str, str] | None:
    """The group options of the running Hydra app (``{"model": "unet_tiny", ...}``), for ``checkpoint["choices"]``;
    None outside one (a config built by hand: the loader then infers them)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choices = HydraConfig.get().runtime.choices
    return {group: str(choices[group]) for group in CHOSEN_GROUPS if choices.get(group) is not None}


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
