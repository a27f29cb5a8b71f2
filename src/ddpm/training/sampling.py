"""Callbacks that sample the model while it trains, through ``module.pipeline()`` (the same ``ddpm.Pipeline`` path as
``ddpm.sample``): sample grids, quality curves, and the final evaluation that ``ddpm.report`` tabulates."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from ddpm.core.guidance import guidance_usable
from ddpm.core.samplers import as_sampler, check_steps
from ddpm.core.settings import integer, number, one_of, require
from ddpm.evaluation.records import write_metrics
from ddpm.evaluation.registry import sized
from ddpm.images import class_rows, save_png, to_grid
from ddpm.training.progress import timed

log = logging.getLogger(__name__)


def completed(trainer: L.Trainer) -> bool:
    """Training reached its configured end (max_steps, or max_epochs), rather than being stopped early by a signal:
    only then are the final grid and the final evaluation worth their time."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.global_step >= trainer.max_steps
    return trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.current_epoch >= trainer.max_epochs


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` and at the end of training, sample with the EMA weights and the configured
    sampler and guidance; save ``dirpath/step_XXXXXXX.png`` (and ``final.png``) and log it to wandb.
    ``steps`` overrides the sampler's number of steps for these grids (None: the sampler's own)."""

    key = "callbacks.sample_grid"  # its node in conf/callbacks/default.yaml, for messages

    def __init__(self, dirpath: str, every_n_steps: int = 1000, per_class: int = 10, num_samples: int = 64,
                 seed: int = 0, min_size: int = 32, steps: int | None = None):
        k = self.key
        require(integer(every_n_steps) and every_n_steps >= 0, f"{k}.every_n_steps", every_n_steps, "an integer >= 0 (0: only the final grid)")
        for name, value in (("per_class", per_class), ("num_samples", num_samples)):
            require(integer(value) and value > 0, f"{k}.{name}", value, "an integer > 0")
        require(integer(min_size) and min_size >= 0, f"{k}.min_size", min_size, "an integer >= 0")
        require(integer(seed), f"{k}.seed", seed, "an integer")
        if steps is not None:
            check_steps(steps, None, key=f"{k}.steps")
        self.dirpath, self.every_n_steps, self.per_class = Path(dirpath), every_n_steps, per_class
        self.num_samples, self.seed, self.min_size, self.steps = num_samples, seed, min_size, steps
        self._written: dict[int, Path] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self.write(trainer, pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not completed(trainer):
            log.info("no final grid: training stopped early at step %d", trainer.global_step)
            return
        if trainer.global_step in self._written:  # the same weights were just drawn: copy, don't resample
            if trainer.is_global_zero:
                shutil.copyfile(self._written[trainer.global_step], self.dirpath / "final.png")
            return
        self.write(trainer, pl_module, "final")

    def write(self, trainer: L.Trainer, pl_module, name: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        model = pl_module.pipeline()  # the EMA weights, the configured sampler and guidance
        num_classes = model.num_classes
        n = num_classes * self.per_class if num_classes is not None else self.num_samples
        path = self.dirpath / f"{name}.png"
        with timed(f"step {trainer.global_step}: drawing {path.name} ({n} images, {self.steps or 'all'} sampler steps)"):
            # A private generator (seed): the grid is the same noise every time, and the training RNG stream is untouched.
            images = model.sample(n, steps=self.steps, seed=self.seed, batch_size=n)
        grid = to_grid(images, nrow=class_rows(len(images), num_classes), min_size=self.min_size)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_png(grid, path)
        self._written[trainer.global_step] = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[grid], step=trainer.global_step, caption=[name])
        return path


class SampleQuality(L.Callback):
    """Every ``every_n_steps``, sample ``num_samples`` images (EMA weights, configured sampler and guidance, ``steps``
    steps) and log the cheap quality metrics (``quality/fd_digits``, ``quality/guided_accuracy``,
    ``quality/diversity`` on digits; ``quality/fid`` with Inception elsewhere) so quality-against-steps is a curve.
    Small samples bias Fréchet distances upwards: compare these curves with each other, not with ``ddpm.evaluate``."""

    key = "callbacks.sample_quality"

    def __init__(self, every_n_steps: int = 500, num_samples: int = 500, steps: int | None = 50, seed: int = 0,
                 feature_extractor: str = "auto", reference_split: str = "train", cache_dir: str | None = None,
                 sampler=None):
        from ddpm.evaluation.metrics import EXTRACTORS, REFERENCE_SPLITS

        k = self.key
        require(integer(every_n_steps) and every_n_steps >= 0, f"{k}.every_n_steps", every_n_steps, "an integer >= 0 (0: off)")
        require(integer(num_samples) and num_samples >= 2, f"{k}.num_samples", num_samples, "an integer >= 2")
        require(integer(seed), f"{k}.seed", seed, "an integer")
        if steps is not None:
            check_steps(steps, None, key=f"{k}.steps")
        one_of(f"{k}.feature_extractor", feature_extractor, EXTRACTORS)
        one_of(f"{k}.reference_split", reference_split, REFERENCE_SPLITS)
        self.every_n_steps, self.num_samples, self.steps, self.seed = every_n_steps, num_samples, steps, seed
        self.sampler = sampler  # None: the module's sampler (with ``steps``)
        self.feature_extractor, self.reference_split, self.cache_dir = feature_extractor, reference_split, cache_dir
        self._extractor = self._reference = self._extractor_info = None
        self.history: list[dict] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Build the extractor and the reference statistics now: a missing download or a bad key fails before the
        # first step, not an hour into training.
        if self.every_n_steps > 0 and trainer.is_global_zero:
            self._prepare(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and trainer.is_global_zero:
            with timed(f"step {step}: quality on {self.num_samples} samples"):
                metrics = self.measure(trainer, pl_module)
            self.history.append({"step": step, **metrics})
            for logger in trainer.loggers:
                logger.log_metrics({f"quality/{key}": value for key, value in sized(metrics, self.num_samples).items()}, step=step)

    def _prepare(self, trainer: L.Trainer, pl_module) -> None:
        from ddpm.evaluation.metrics import prepare

        self._extractor, self._extractor_info, self._reference = prepare(self.feature_extractor, trainer.datamodule.data, self.reference_split,
                                                      self.cache_dir, device=pl_module.device)

    def measure(self, trainer: L.Trainer, pl_module, guidance_scale: float | None = None) -> dict:
        from ddpm.evaluation.metrics import sample_metrics

        if self._extractor is None:
            self._prepare(trainer, pl_module)
        model = pl_module.pipeline()
        guidance = None if guidance_scale is None else replace(model.guidance, scale=guidance_scale)
        out = model.draw(self.num_samples, sampler=self.sampler, steps=None if self.sampler else self.steps,
                         guidance=guidance, seed=self.seed, batch_size=self.num_samples)
        return sample_metrics(self._extractor, self._reference, out["images"], out["labels"])


class EvaluateAtEnd(SampleQuality):
    """After training, measure the EMA model at each of ``guidance_scales`` (w) and write ``path`` (metrics.json):
    what ``ddpm.report`` tabulates for a sweep. Scales above 0 are skipped (null) for a model trained without label
    dropout (p_uncond = 0), which never saw the null label."""

    key = "callbacks.evaluate_at_end"

    def __init__(self, path: str, guidance_scales=(1.0,), num_samples: int = 1000, **kwargs):
        super().__init__(every_n_steps=0, num_samples=num_samples, **kwargs)
        scales = list(guidance_scales) if not isinstance(guidance_scales, (str, bytes)) and hasattr(guidance_scales, "__iter__") else None
        require(scales is not None and all(number(w) and w >= 0 for w in scales), f"{self.key}.guidance_scales",
                guidance_scales, "a list of guidance scales w >= 0, e.g. [0, 1, 2]")
        self.path, self.guidance_scales = Path(path), [float(w) for w in guidance_scales]

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._prepare(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if not completed(trainer):  # no metrics.json for an interrupted model: a report would read it as finished
            log.info("no final evaluation: training stopped early at step %d", trainer.global_step)
            return
        results = []
        for w in self.guidance_scales if pl_module.conditional else [0.0]:
            usable = guidance_usable(pl_module.p_uncond, w, pl_module.conditional)
            with timed(f"final evaluation at w={w:g} on {self.num_samples} samples"):
                metrics = self.measure(trainer, pl_module, guidance_scale=w) if usable else None
            model = pl_module.pipeline()
            run = model.sampler_for(self.sampler, None if self.sampler else self.steps)
            protocol = model.protocol(run, replace(model.guidance, scale=w), self.seed, self.num_samples,
                                      self._reference.info, self._extractor_info, precision="float32", compile=False)
            results.append({"guidance_scale": w, "metrics": metrics, "protocol": protocol})
            for logger in trainer.loggers:
                if metrics:
                    logger.log_metrics({f"eval/w={w:g}/{k}": v for k, v in sized(metrics, self.num_samples).items()},
                                       step=trainer.global_step)
        loss = trainer.callback_metrics.get("train/loss")
        record = {"global_step": trainer.global_step, "final_loss": float(loss) if loss is not None else None,
                  "evaluations": results,
                  "protocol": {"num_samples": self.num_samples, "seed": self.seed, "weights": "ema",
                               "sampler": _describe(self.sampler, self.steps), "reference": self._reference.info}}
        write_metrics(self.path, record)


def _describe(sampler, steps) -> dict:
    """A sampler as plain data for protocols (None: the run's configured sampler at ``steps``)."""
    option = as_sampler(sampler) if sampler is not None else None
    if option is not None:
        return {"name": option.name, **option.settings()}
    return {"name": "configured", "steps": steps}
