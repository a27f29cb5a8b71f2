"""Progress a person can follow: one bar over the run in optimizer steps, log lines that reach train.log and cluster
logs, and a line around each slow piece of work (sampling a grid, a quality measurement)."""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


class timed:
    """Log a line as a slow piece of work starts (so a frozen progress bar says why) and one with its duration."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        log.info("%s ...", self.what)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            log.info("%s: done in %.1f s", self.what, time.perf_counter() - self.start)


class ProgressBar(TQDMProgressBar):
    """One bar for the whole run, counted in optimizer steps (``step 500/2000``, with its rate and time left), not
    Lightning's bar per epoch; with the training loss, read from the device only when the bar redraws (every
    ``refresh_rate`` steps). Logging the loss with ``prog_bar=True`` instead makes Lightning convert it to a Python
    number after every step: a host-device synchronisation per step on a GPU."""

    @property
    def train_description(self) -> str:
        return "step"

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.total = trainer.max_steps if trainer.max_steps > 0 else None
        bar.initial = bar.n = trainer.global_step  # a resumed run counts (and times) from where it resumed
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # epochs of a small dataset are a few steps each: the bar spans the run

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number: not progress
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["loss"] = f"{loss.item():.4f}"
        return metrics


class ProgressLog(L.Callback):
    """A log line every ``every_n_steps`` steps (``step 500/2000 (25%) loss 0.0412, 14.2 steps/s, 1m46s left``): the
    progress record that reaches train.log and cluster logs, where a progress bar does not."""

    def __init__(self, every_n_steps: int = 250):
        self.every_n_steps = every_n_steps

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        rate = (step - self._start_step) / max(time.perf_counter() - self._start, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        total = trainer.max_steps if trainer.max_steps > 0 else None
        left = f", {duration((total - step) / rate)} left" if total and rate > 0 else ""
        log.info("step %d%s%s, %.1f steps/s%s", step, f"/{total} ({100 * step / total:.0f}%)" if total else "",
                 f" loss {loss.item():.4f}" if loss is not None else "", rate, left)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
