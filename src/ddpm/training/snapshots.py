"""Snapshots of the power-function EMAs, and the post-hoc EMA rebuilt from them (Karras et al. 2024, sec. 3).

During training ``EMASnapshots`` writes ``ema_snapshots/ema_<step>.pt`` every N steps (and at the end): the weights of
each tracked power EMA (``ema.sigma_rels``). After training, ``posthoc_state_dict`` turns the snapshots of a run into
the weights of an EMA of any length ``sigma_rel``, by least squares over the snapshots' averaging profiles.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from ddpm.core.ema import combine, posthoc_coefficients, profile_fit_error, sigma_rel_to_gamma
from ddpm.core.errors import ConfigError
from ddpm.training.checkpoint import atomic_save

log = logging.getLogger(__name__)

# ema.source of ddpm.sample/evaluate: the tracked EMA of that width if the checkpoint has one, else rebuilt (auto);
# only the tracked one (tracked); always rebuilt from the snapshots (posthoc).
EMA_SOURCES = ("auto", "tracked", "posthoc")


class EMASnapshots(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and after the last one), write the power EMAs' weights to
    ``dirpath/ema_<step>.pt``, atomically (a kill leaves the previous snapshots whole). A resumed run writes the
    steps it has not written yet; nothing is rewritten."""

    def __init__(self, dirpath: str, every_n_steps: int = 100):
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        for stray in self.dirpath.glob(".ema_*.pt.tmp") if trainer.is_global_zero else []:  # a write a kill cut short
            stray.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
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
        atomic_save({"step": step, "sigma_rels": power_ema.sigma_rels, "gammas": power_ema.gammas,
                     "state_dicts": [{k: v.detach().cpu() for k, v in a.state_dict().items()} for a in power_ema.averages]}, path)


def snapshot_dir(ckpt_path: str | Path) -> Path:
    """Where a run's snapshots live: ``<run>/ema_snapshots`` for a checkpoint ``<run>/checkpoints/last.ckpt``."""
    return Path(ckpt_path).expanduser().resolve().parent.parent / "ema_snapshots"


def posthoc_state_dict(directory: str | Path, sigma_rel: float, step: int | None = None,
                       sources: list[float] | None = None) -> tuple[dict, dict]:
    """The weights of a power EMA of relative width ``sigma_rel`` at ``step`` (default: the last snapshot), as a
    least-squares combination of the snapshots in ``directory`` (of the EMAs of width in ``sources``; default all);
    and a description for the protocol."""
    files = sorted(Path(directory).glob("ema_*.pt"))
    if not files:
        raise ConfigError(f"ema.sigma_rel={sigma_rel}: no EMA snapshots in {directory} (train with ema.sigma_rels set and "
                          "ema.snapshot_every > 0, or point ema.snapshots at them)")
    try:
        gamma = sigma_rel_to_gamma(sigma_rel)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    snapshots = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    step = step or max(s["step"] for s in snapshots)
    steps, gammas, states = [], [], []
    for s in snapshots:
        if s["step"] > step:
            continue
        for width, g, state in zip(s["sigma_rels"], s["gammas"], s["state_dicts"]):
            if sources is not None and not any(abs(width - w) < 1e-9 for w in sources):
                continue
            steps.append(s["step"]), gammas.append(g), states.append(state)
    coefficients = posthoc_coefficients(steps, gammas, step, gamma)
    fit = profile_fit_error(steps, gammas, step, gamma, coefficients)
    if fit > 0.02:
        log.warning("ema.sigma_rel=%g: the snapshots rebuild its averaging profile only to %.1f%% (L2); the weights can be "
                    "off by several times that: snapshot more often (ema.snapshot_every) for a closer EMA", sigma_rel, 100 * fit)
    info = {"sigma_rel": sigma_rel, "gamma": gamma, "step": step, "snapshots": len(files), "profiles": len(states),
            "profile_fit_error": round(fit, 5),
            "snapshot_sigma_rels": sorted({s for snap in snapshots for s in snap["sigma_rels"]} if sources is None else sources)}
    return combine(states, coefficients), info
