"""Checkpoints that survive faults: written atomically, with the run's group choices recorded.

Lightning writes ``last.ckpt`` in place, so a kill during the write leaves half a file where the previous
good checkpoint was. ``AtomicCheckpointIO`` writes to a temporary file in the same folder, flushes it to disk
and renames it over the target: a reader sees the old file or the new one, never a torn one. ``LastCheckpoint`` writes
``last.ckpt`` at the end and when a signal (Ctrl+C, SIGTERM, SLURM's preemption) asks the run to stop. Reading one
back, and refusing what is not this project's, is ``ddpm.checkpoints``'s.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import OmegaConf

from ddpm.checkpoints import CHOSEN_GROUPS, leaves
from ddpm.core.errors import ConfigError
from ddpm.files import WriteError, atomic_write, read_regular

log = logging.getLogger(__name__)

# Config keys that fix the network and the data it models: resuming or sampling across a change in any of
# them would load weights into a different model.
MODEL_KEYS = ("model", "process", "objective._target_", "schedule", "diffusion.prediction", "guidance.conditional",
              "data.image_size", "data.channels", "data.num_classes")
# What a checkpoint from before a key existed trained with (before objectives: the denoising one).
BEFORE_THE_KEY = {"objective._target_": "ddpm.core.objectives.denoising.Denoising"}


def speed_keys(config: dict) -> set[str]:
    """How the network computes, not what it computes: a resumed run may switch these. ``model.compile`` (a training
    option of every backbone) and the backbone's own switches, named by its class's ``speed_options``."""
    from ddpm.builders import resolve_target

    target = (config.get("model") or {}).get("_target_") if isinstance(config.get("model"), dict) else None
    try:
        options = getattr(resolve_target(target), "speed_options", ()) if isinstance(target, str) else ()
    except ConfigError:  # not a shipped target: nothing to exempt (the difference is reported)
        options = ()
    return {"model.compile", *(f"model.{name}" for name in options)}


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (disk full, permissions); the previous checkpoints are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``.<name>.tmp``, fsync, then rename over ``<name>``; read back with ``weights_only=True``.

    The checkpoint a run resumes from was read and checked once already (``ddpm.training.resume.read_checked``, before
    the loggers start); ``expect`` hands that dict over, and ``load_checkpoint`` returns it rather than reading the
    file again, so what Lightning restores is what was checked. In a process spawned for DDP (which gets this plugin
    pickled, without the dict) the file is read again and used only if its bytes are the ones checked. Removing a
    checkpoint (ModelCheckpoint's earlier last.ckpt or top-k) unlinks one regular ``.ckpt`` file, never a folder."""

    def __init__(self) -> None:
        super().__init__()
        self._expected: dict[str, tuple[str, dict | None]] = {}  # path -> (sha256 of its bytes, the checked dict)

    def expect(self, path, checkpoint: dict, digest: str) -> None:
        self._expected[os.path.abspath(path)] = (digest, checkpoint)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_expected"] = {path: (digest, None) for path, (digest, _) in self._expected.items()}
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Every file Lightning reads back (a resume, ddp_spawn's weights of rank 0): tensors and plain data only,
        # whatever the caller asks, since a pickle can run code.
        expected = self._expected.pop(os.path.abspath(path), None)
        if expected is None:
            return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)
        digest, checkpoint = expected
        if checkpoint is None:
            data = read_regular(Path(path), what=f"ckpt_path={str(path)!r}")
            if hashlib.sha256(data).hexdigest() != digest:
                raise ConfigError(f"ckpt_path={str(path)!r}: changed since it was checked; refusing to resume from it")
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return checkpoint

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        if path.suffix == ".ckpt" and path.is_file() and not path.is_symlink():
            path.unlink()
        else:
            log.warning("not removing %s: only a checkpoint file of this run is ever removed", path)


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
    speed = speed_keys(requested)
    lines = []
    for key in sorted(set(saved_flat) | set(requested_flat)):
        if not any(key == k or key.startswith(k + ".") for k in keys) or key in speed:
            continue
        a, b = saved_flat.get(key, BEFORE_THE_KEY.get(key, "<absent>")), requested_flat.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: checkpoint {a!r}, requested {b!r}")
    return lines


class SaveResolvedConfig(L.Callback):
    """Write the resolved config (the one every checkpoint also carries) to ``dirpath/config.yaml`` as fitting
    starts, so the checkpoints' folder says how they were made."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and pl_module.config is not None:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(pl_module.config), self.dirpath / "config.yaml")


class LastCheckpoint(L.Callback):
    """``dirpath/last.ckpt`` always holds the newest state. It is written at the end of training (ModelCheckpoint
    only writes on its step interval) and when a signal asks the run to stop: the current step is finished,
    last.ckpt written, training stopped, and the run resumes from it (``resume=auto``). Signals:

    - SIGINT (Ctrl+C) and SIGTERM (``kill``, scancel; Lightning turns SIGTERM into a stop at the step boundary);
    - the preemption/time-limit signal submitit asks SLURM for (``preempt_signal``, USR2 by default): after the
      save, and after the loggers are finished, submitit's own handler requeues the job (``requeue``), and the
      requeued job, whose directory is the same, resumes.
    From ``arm`` on (ddpm.train arms it before the loggers start), the preemption signal and SIGTERM that arrive
    before the first step are held and stop the run as it begins. ``received`` names the signal that stopped the run."""

    def __init__(self, dirpath: str, preempt_signal: str = "USR2"):
        self.dirpath, self.preempt = Path(dirpath), f"SIG{preempt_signal.removeprefix('SIG')}"
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._previous_at_stop: dict[int, object] = {}  # the handlers replaced, kept past teardown for requeue()
        self._saved_step: int | None = None

    def arm(self) -> None:
        """Hold the preemption signal and SIGTERM from now on (ddpm.train calls this before the loggers start): one
        that arrives before the first step stops the run as it begins (``on_train_start``), with last.ckpt written,
        rather than submitit requeueing the job with a wandb run just started (USR2), or the SIGTERM of scancel or
        scontrol requeue being ignored (submitit's handler) until SIGKILL ends a run that has saved nothing."""
        self.received = None
        if threading_main() and not self._previous:
            for signum in (getattr(signal, self.preempt), signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._held)

    def _held(self, signum, frame) -> None:
        # Nothing is logged here, and the handler replaced is not called: a signal lands between two bytecodes, perhaps
        # inside a log write that logging would re-enter (ddpm.launchers.quiet_submitit_signals). on_train_start says
        # which signal stopped the run.
        self.received = self.received or signal.Signals(signum).name

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self._previous:
            self.arm()
        if threading_main():
            signal.signal(getattr(signal, self.preempt), self._on_signal)
            if signal.SIGINT not in self._previous:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.received is not None:  # held since arm(): stop before the first step; on_train_end writes last.ckpt
            log.warning("%s before the first step: stopping as the run begins", self.received)
            trainer.should_stop = True

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":  # a second Ctrl+C: stop now, the old way
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = name

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.received_sigterm and self.received is None:
            self.received = "SIGTERM"
        if self.received is None or self._saved_step == trainer.global_step:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the whole state; every rank joins, rank 0 writes
        self._saved_step = trainer.global_step
        log.warning("%s at step %d: saved %s; the same command resumes from it", self.received, trainer.global_step, path)
        trainer.should_stop = True  # SIGINT; for SIGTERM Lightning raises SIGTERMException right after this hook

    def requeue(self) -> None:
        """After the preemption signal stopped the run: hand it to the handler that was there before (submitit's,
        which requeues this SLURM job and exits). ddpm.train calls this once the loggers are finished, since the
        requeue makes SLURM send SIGTERM to every process of the job, wandb's service included."""
        previous = self._previous_at_stop.get(getattr(signal, self.received)) if self.received else None
        if self.received == self.preempt and callable(previous):
            previous(getattr(signal, self.received), None)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """A step that finished is never lost to what comes after it. Lightning runs the checkpoint callbacks last in
        each step, so an error in another callback's work on that step (a grid, a quality measurement, the final
        evaluation) would end the run before the step is saved: it is saved here, and the same command resumes from
        it once the cause is fixed. Also a SIGTERM that lands after this callback's hook (Lightning checks for one after
        every hook and before each step; found by tests/test_hardening.py, 1 run in 3 on 2 cores)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from ddpm.training.module import NonFiniteLossError

        if isinstance(exception, (KeyboardInterrupt, CheckpointWriteError, NonFiniteLossError)) or trainer.global_step == 0 \
                or self._saved_step == trainer.global_step:
            return  # a second Ctrl+C stops at once; a full disk or non-finite weights are not saved over what is there
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.processed != progress.started:  # the error came inside the step: its weights did not move yet
            return
        signalled = isinstance(exception, SIGTERMException)
        if not signalled and trainer.world_size > 1:  # a save is collective; one rank's error cannot join the others
            return
        path = self.dirpath / "last.ckpt"
        if path.is_file() and torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"] == trainer.global_step:
            return
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as error:  # non-finite weights (never saved), a full disk: the earlier checkpoints stand
            log.warning("could not save step %d before stopping: %s", trainer.global_step, error)
            return
        self._saved_step = trainer.global_step
        if signalled:
            self.received = self.received or "SIGTERM"
            log.warning("SIGTERM at step %d: saved %s; the same command resumes from it", trainer.global_step, path)
        else:
            log.warning("%s after step %d: saved %s first; fix the cause and run the same command again to resume from it",
                        type(exception).__name__, trainer.global_step, path)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        path = self.dirpath / "last.ckpt"
        if self._saved_step == trainer.global_step:
            return
        if path.is_file() and torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"] == trainer.global_step:
            return  # ModelCheckpoint just wrote this step
        trainer.save_checkpoint(path, weights_only=False)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self._previous_at_stop = dict(self._previous)
        if threading_main():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()
