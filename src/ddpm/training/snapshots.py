"""Writing snapshots of the power-function EMAs during training (Karras et al. 2024, sec. 3).

``EMASnapshots`` writes ``ema_snapshots/ema_<step>.pt`` ``ema.snapshot_count`` times per run (and at the end): the
weights of each tracked power EMA (``ema.sigma_rels``), in ``ema.snapshot_dtype``. Reading them back and rebuilding an
EMA of any length from them is ``ddpm.snapshots``'s.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch

from ddpm.core.ema import EMASettings
from ddpm.snapshots import SNAPSHOT_DTYPES, snapshot_step
from ddpm.training.checkpoint import atomic_save

log = logging.getLogger(__name__)


def snapshot_interval(count: int, total_steps: int, every_n_steps: int | None = None) -> int:
    """Steps between snapshots: ``every_n_steps`` when given, else ``count`` spread over the run (0: none)."""
    if every_n_steps is not None:
        return every_n_steps
    return math.ceil(total_steps / count) if count and total_steps > 0 else 0


class EMASnapshots(L.Callback):
    """``count`` times per run (or every ``every_n_steps`` optimizer steps when set), and after the last step, write
    the power EMAs' weights to ``dirpath/ema_<step>.pt`` in ``dtype``, atomically (a kill leaves the previous snapshots
    whole). Weights that are not finite stop the run, as a non-finite loss does. A resumed run first removes the
    snapshots past the step it resumes from (written by an attempt that did not reach a checkpoint, e.g. one stopped
    on a NaN), then writes the steps it has not written yet."""

    def __init__(self, dirpath: str, count: int = 40, every_n_steps: int | None = None, dtype: str = "float32"):
        EMASettings(snapshot_count=count, snapshot_every=every_n_steps, snapshot_dtype=dtype)  # their rules: ema.*
        self.dirpath, self.count, self.every_n_steps, self.dtype = Path(dirpath), count, every_n_steps, SNAPSHOT_DTYPES[dtype]
        self.interval = every_n_steps or 0

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        for stray in self.dirpath.glob(".ema_*.pt.tmp") if trainer.is_global_zero else []:  # a write a kill cut short
            stray.unlink(missing_ok=True)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        self.interval = snapshot_interval(self.count, total, self.every_n_steps)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # The loops are restored by now: global_step is the step of the checkpoint this run resumed from.
        if not trainer.is_global_zero:
            return
        for path in sorted(self.dirpath.glob("ema_*.pt")):
            step = snapshot_step(path)
            if step is not None and step > trainer.global_step:
                log.warning("removing %s: written after step %d, the step this run resumes from, by an attempt that did "
                            "not get that far", path, trainer.global_step)
                path.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.interval and step % self.interval == 0:
            self.write(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.write(trainer, pl_module, trainer.global_step)

    def write(self, trainer: L.Trainer, pl_module, step: int) -> None:
        power_ema = getattr(pl_module, "power_ema", None)
        if power_ema is None or not trainer.is_global_zero or step == 0:
            return
        path = self.dirpath / f"ema_{step:07d}.pt"
        if path.exists():
            return
        if hasattr(pl_module, "check_finite"):  # a non-finite loss says more (which step, what to do) than its weights
            pl_module.check_finite()
        states = [{k: v.detach().to("cpu", self.dtype if v.is_floating_point() else v.dtype) for k, v in a.state_dict().items()}
                  for a in power_ema.averages]
        bad = next((k for state in states for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            from ddpm.training.module import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite power-EMA weights ({bad}) at step {step}: training stopped before writing "
                                     f"{path.name}; checkpoints and snapshots on disk are from before it and finite. Lower "
                                     "optim.optimizer.lr (or raise optim.warmup_steps, keep trainer.gradient_clip_val) and run "
                                     "the same command again: it resumes from the newest checkpoint with the new settings")
        atomic_save({"step": step, "sigma_rels": power_ema.sigma_rels, "gammas": power_ema.gammas, "state_dicts": states,
                     "run_identity": getattr(pl_module, "run_identity", None)}, path)


