"""`python -m ddpm.train [OVERRIDES]`: compose the Hydra config, build the Lightning pieces, fit.

``train(cfg)`` is importable and tested; ``main`` is the thin ``@hydra.main`` wrapper around it.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl+C while the imports below run (seconds): one line, not a traceback (ddpm.interrupts)
    from ddpm.interrupts import quiet_while_starting

    quiet_while_starting()

import json
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from ddpm.config import cli_main, run_cli
from ddpm.options import config_dir

# Torch, Lightning and the rest are imported where they are used, not here: a SLURM job unpickles this module's
# ``main`` before submitit installs its preemption handler, and a signal that lands while torch is importing (5 s)
# would kill the job instead of requeueing it (issue 18, item 6). Importing this module takes 0.3 s.
if TYPE_CHECKING:
    import lightning as L

    from ddpm.training.module import DiffusionModule

log = logging.getLogger(__name__)


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> DiffusionModule:
    """Validate ``cfg``, seed, build data, model, callbacks, logger and trainer, then fit (resuming from
    ``cfg.ckpt_path``, or from the run directory's own last.ckpt when ``resume=auto``). ``extra_callbacks`` join
    the configured ones (handy from Python). Returns the trained module.

    Stops with ConfigError before anything is built when a value is out of range, the data are missing, the
    checkpoint is unreadable or of another model, another ddpm.train is running in the same directory, or the disk
    cannot hold what the run will write (``check_disk``); with SystemExit(128 + signal) after SIGINT/SIGTERM, once
    last.ckpt is written."""
    from lightning.pytorch.utilities import rank_zero_only

    from ddpm.training.loggers import RULES as LOGGER_RULES
    from ddpm.training.rundirs import lock_run_dir, unlock_run_dir
    from ddpm.validation import validate

    validate(cfg, "train", LOGGER_RULES)
    run_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:  # one ddpm.train per run directory at a time (ddpm.training.rundirs)
        lock_run_dir(run_dir)
    try:
        return _fit(cfg, extra_callbacks)
    finally:
        unlock_run_dir(run_dir)


def _fit(cfg: DictConfig, extra_callbacks: Sequence[L.Callback]) -> DiffusionModule:
    """``train`` once its config is valid and its directory locked."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from tqdm.contrib.logging import logging_redirect_tqdm

    import lightning as L
    from ddpm.training.assemble import build_module, built, instantiate_loggers, start_from
    from ddpm.builders import build
    from ddpm.config import resolve_precision
    from ddpm.training.checkpoint import AtomicCheckpointIO, CheckpointWriteError, LastCheckpoint, recorded_choices
    from ddpm.training.data import DataModule
    from ddpm.training.disk import check_disk
    from ddpm.training.loggers import finish_wandb
    from ddpm.training.module import NonFiniteLossError
    from ddpm.training.resume import read_checked, resume_checkpoint
    from ddpm.training.rundirs import commit, settle

    resolve_precision(cfg)
    ckpt_path = resume_checkpoint(cfg)
    check_disk(cfg)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = DataModule(build(OmegaConf.to_container(cfg.data, resolve=True), "data"))
    datamodule.check()
    if rank_zero_only.rank == 0:  # a download that fails does so now, before a logger run or a model exists
        datamodule.prepare_data()
        datamodule.setup()
        datamodule.check_batches(world_size(cfg.trainer))
    module = build_module(cfg, recorded_choices())
    # The training state it resumes from is checked against this run's own objects before a logger starts, and the
    # checkpoint IO hands Lightning that same checked dict (ddpm.training.resume).
    resumed = read_checked(ckpt_path, module, f"ckpt_path={ckpt_path!r}", Path(cfg.paths.checkpoint_dir)) if ckpt_path else None
    if cfg.get("init_from") and not ckpt_path:  # a resumed run continues from its own weights, not init_from's
        start_from(module, cfg.init_from)
    callbacks = [built(node) for name, node in (cfg.get("callbacks") or {}).items()
                 if node and (name != "progress_bar" or cfg.trainer.enable_progress_bar)] + list(extra_callbacks)
    for each in callbacks:
        if isinstance(each, LastCheckpoint):
            each.arm()  # from here on a preemption signal is held until the run can stop cleanly
    logger = instantiate_loggers(cfg.get("logger"))
    if not logger:  # logger=none: a learning-rate monitor has nowhere to write (Lightning refuses it)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = built(cfg.trainer, callbacks=callbacks, logger=logger)
    if resumed is not None:
        for plugin in [trainer.strategy.checkpoint_io]:
            if isinstance(plugin, AtomicCheckpointIO):
                plugin.expect(ckpt_path, *resumed)

    if rank_zero_only.rank == 0:  # every start-up check passed: the run directory's record and log are this command's
        commit(Path(cfg.paths.output_dir))
    settle()  # from here on an error leaves what the run wrote: its checkpoints, its record, its log
    # Every logger gets the whole resolved config, schedule and guidance included.
    for each in trainer.loggers:
        each.log_hyperparams(module.config)
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info("network: %s with %.2fM parameters; writing to %s", cfg.model._target_, n_params / 1e6, cfg.paths.output_dir)

    signal_name, start = None, time.perf_counter()
    try:
        with logging_redirect_tqdm():  # log lines go above the progress bar instead of into it
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        signal_name = "SIGTERM"
    except (NonFiniteLossError, CheckpointWriteError) as error:  # their advice ends "run the same command again"
        raise type(error)(f"{error} ({rerun(cfg)})") from None
    finally:
        last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
        signal_name = signal_name or (last.received if last is not None else None)
        # Stopped by a signal, the process is about to end (and a requeue sends SIGTERM to the whole job): stop wandb's
        # service too, now, rather than in wandb's exit hook, which would meet a service killed by that SIGTERM.
        finish_wandb(service_too=signal_name is not None)
    if signal_name is not None:
        log.warning("stopped by %s at step %d; to resume: %s (or ckpt_path=%s)", signal_name, trainer.global_step,
                    rerun(cfg), Path(cfg.paths.checkpoint_dir) / "last.ckpt")
        if last is not None:
            last.requeue()  # under submitit, on its signal: requeue the job and exit (after wandb finished, above)
        raise SystemExit(128 + getattr(signal, signal_name))
    summarize(cfg, trainer.global_step, time.perf_counter() - start)
    return module


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes the configured trainer will run (devices x nodes; 1 where devices is auto or a list)."""
    devices = trainer_cfg.get("devices", 1)
    return (devices if isinstance(devices, int) and devices > 0 else 1) * int(trainer_cfg.get("num_nodes", 1) or 1)


def rerun(cfg: DictConfig) -> str:
    """How to run this very run again, so that it resumes: its directory must be named (a new command would get a
    fresh clock-named one)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
        return f"the same command with hydra.sweep.dir={Path(cfg.paths.output_dir).parent}"
    return f"the same command with hydra.run.dir={cfg.paths.output_dir}"


def summarize(cfg: DictConfig, steps: int, seconds: float) -> None:
    """The end of a run in a few lines: where everything is, the final metrics, and the commands that come next."""
    from ddpm.training.progress import duration

    out, last = Path(cfg.paths.output_dir), Path(cfg.paths.checkpoint_dir) / "last.ckpt"
    lines = [f"finished {steps} steps in {duration(seconds)}; everything is in {out}"]
    if (Path(cfg.paths.sample_dir) / "final.png").is_file():
        lines.append(f"  samples:  {Path(cfg.paths.sample_dir) / 'final.png'}")
    metrics_file = out / "metrics.json"
    if metrics_file.is_file():
        record = json.loads(metrics_file.read_text())
        n = record["protocol"]["num_samples"]
        for entry in record["evaluations"]:
            if entry["metrics"]:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in entry["metrics"].items())
                lines.append(f"  metrics.json, w={entry['guidance_scale']:g} ({n} samples): {shown}")
    from ddpm.builders import build_sampler

    sampler = build_sampler(OmegaConf.to_container(cfg.sampler, resolve=True)).name
    lines += [f"  sample:   python -m ddpm.sample ckpt_path={last}" + (f" sampler={sampler}" if sampler != "ddpm" else ""),
              f"  evaluate: python -m ddpm.evaluate ckpt_path={last}",
              f"  train on: python -m ddpm.train ckpt_path={last} trainer.max_steps={2 * steps}"]
    log.info("\n".join(lines))


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    run_cli(train, cfg)


def cli() -> None:
    """The command line: ``python -m ddpm.train`` and the ``ddpm-train`` script."""
    cli_main(main)


if __name__ == "__main__":
    cli()
