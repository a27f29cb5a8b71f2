"""The LightningModule: glue between the denoiser (network + process + prediction target), the training objective,
guidance and a sampler.

It owns no math and builds nothing: ``ddpm.training.assemble`` makes every part from the config and hands them over (the
lightning-hydra-template habit). The composed config travels inside every checkpoint (``checkpoint["config"]``),
so ``ddpm.load`` rebuilds the model from the file alone; ``module.pipeline()`` is the same ``ddpm.Pipeline`` over the live
weights, which the callbacks sample with.
"""

from __future__ import annotations

import logging
import random
import uuid
from functools import partial
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ddpm.core.denoiser import Denoiser
from ddpm.core.ema import PowerEMA, ema_warmup_decay, lerp_weights_
from ddpm.core.errors import NonFiniteLossError  # noqa: F401  (raised here; its home is light, for run_cli)
from ddpm.core.guidance import Guidance, drop_labels
from ddpm.core.objectives import Objective
from ddpm.core.objectives.denoising import Denoising
from ddpm.inference import Pipeline

log = logging.getLogger(__name__)


class DiffusionModule(L.LightningModule):
    def __init__(
        self,
        denoiser: Denoiser,
        sampler: Callable,
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        power_ema_sigma_rels: tuple[float, ...] = (),
        p_uncond: float = 0.1,
        guidance: Guidance = Guidance(),
        config: dict | None = None,
        compile_net: bool = False,
        choices: dict[str, str] | None = None,
        objective: Objective = Denoising(),
    ):
        super().__init__()
        net = denoiser.net
        self.denoiser, self.net, self.process, self.sampler = denoiser, net, denoiser.process, sampler
        self.optimizer_factory, self.warmup_steps = optimizer, warmup_steps
        self.objective = objective  # the training loss (ddpm/core/objectives): denoising, consistency, meanflow, ...
        # training: label dropout (p_uncond); sampling: the guidance this run's callbacks sample with, saved as its default
        self.p_uncond, self.guidance = p_uncond, guidance
        self.config, self.choices = config, choices  # the resolved config and its group options, saved in every checkpoint
        # torch.compile'd forward for the training step; kept off the module tree so checkpoints keep plain keys.
        object.__setattr__(self, "_train_net", torch.compile(net) if compile_net else net)
        # EMA of the weights (Ho et al. sample with decay 0.9999): torch's AveragedModel holds the frozen copy.
        self.ema, self.ema_decay, self.ema_warmup = AveragedModel(net, use_buffers=True), ema_decay, ema_warmup
        self.ema.requires_grad_(False)
        # Power-function EMAs (Karras et al. 2024) whose snapshots let ddpm.sample pick the EMA length after training.
        self.power_ema = PowerEMA(net, list(power_ema_sigma_rels)) if power_ema_sigma_rels else None
        # Which training run this is, drawn when it starts and kept by every later segment: written into every
        # checkpoint and EMA snapshot, so a snapshot of another run is never mistaken for one of this run's.
        self.run_identity: str | None = uuid.uuid4().hex
        # The first non-finite loss (step, value), kept on the device: checking it costs no host sync per step.
        self.register_buffer("_nonfinite", torch.tensor([-1.0, 0.0]), persistent=False)

    @property
    def conditional(self) -> bool:
        return getattr(self.net, "num_classes", None) is not None

    # --- training -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        labels = drop_labels(labels, self.p_uncond, self.net.null_label) if self.conditional else None
        loss = self.objective(self.denoiser, x0, labels, net=self._train_net, ema=self.ema.module, step=self.global_step)
        first_bad = ~torch.isfinite(loss.detach()) & (self._nonfinite[0] < 0)
        candidate = torch.stack([loss.new_full((), float(self.global_step)).float(), loss.detach().float()])
        self._nonfinite.copy_(torch.where(first_bad, candidate, self._nonfinite))
        self.log("train/loss", loss)  # not prog_bar=True, which reads it on the host every step (callbacks.ProgressBar)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:  # a host sync, so only at the logging interval
            self.check_finite()

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if any training loss so far was NaN or infinite."""
        step, value = self._nonfinite.tolist()
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite loss {value} at step {int(step) + 1}: training stopped; checkpoints on disk are from before it "
                "and hold finite weights. Lower optim.optimizer.lr (or raise optim.warmup_steps, keep trainer.gradient_clip_val) "
                "and run the same command again: it resumes from the newest checkpoint with the new settings")

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after the weights move (not in on_train_batch_end, which runs after callbacks such as
        # ModelCheckpoint): a checkpoint at step N then holds the EMA of step N, and a resume matches.
        update = self.global_step + 1  # t = 1, 2, ... (global_step counts this step only after the hook); no device read
        ema_step(self.ema, self.net, ema_warmup_decay(self.ema_decay, update) if self.ema_warmup else self.ema_decay)
        if self.power_ema is not None:
            self.power_ema.update(self.net, update)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer even under bf16, where there is no
        # loss scaler and clipping before the fused step is exact. With a loss scaler (16-mixed) its rule stands.
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.net.parameters())
        # Linear learning-rate warm-up over `optim.warmup_steps` (Ho et al. use 5000), then constant.
        warmup = partial(_linear_warmup, warmup_steps=self.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never write a checkpoint from a run that has gone non-finite: the last good one stays the newest.
        self.check_finite()
        if not torch.stack([torch.isfinite(p).all() for p in self.state_dict().values() if p.is_floating_point()]).all():
            raise NonFiniteLossError(f"non-finite weights at step {self.global_step}: not saving a checkpoint; "
                                     "lower optim.optimizer.lr or keep trainer.gradient_clip_val")
        checkpoint["config"] = self.config
        if self.run_identity is not None:
            checkpoint["run_identity"] = self.run_identity
        if self.choices is not None:  # what ddpm.training.checkpoint.rebuild_config recomposes the config from
            checkpoint["choices"] = self.choices
        # Lightning restores weights, optimizer, schedulers, loops and callbacks, but not the RNGs that draw
        # t, noise, label dropout and the shuffle order; saving them lets a resumed run continue the same stream.
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_rng_state(),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.run_identity = checkpoint.get("run_identity")  # none in a checkpoint from before identities: none since
        self._match_power_emas(checkpoint["state_dict"])
        # Applied in on_train_start, not now: between restoring and the first step Lightning itself draws
        # from the RNG (as it did at the start of the original run), which would shift the stream.
        self._rng_states_to_restore = checkpoint.get("rng_states")
        if checkpoint.get("optimizer_states"):
            apply_optimizer_settings(checkpoint, self.optimizer_factory([nn.Parameter(torch.zeros(1))]).defaults)

    def _match_power_emas(self, state: dict) -> None:
        """Resuming with other ``ema.sigma_rels`` than the checkpoint's (or a checkpoint from before them): the power
        EMAs asked for now start from the checkpoint's weights, as if those were the average so far, and the
        checkpoint's own are dropped. Logged, since their early history is then missing from the snapshots."""
        expected = {k for k in self.state_dict() if k.startswith("power_ema.")}
        saved = {k for k in state if k.startswith("power_ema.")}
        if expected == saved:
            return
        log.warning("resuming with ema.sigma_rels=%s where the checkpoint tracked %s: the power EMAs start from the "
                    "checkpoint's weights at this step", self.power_ema.sigma_rels if self.power_ema else [],
                    "other widths" if saved else "none")
        for key in saved:
            del state[key]
        for key in expected:  # power_ema.averages.<i>.<name> <- net.<name>
            state[key] = state["net." + key.split(".", 3)[3]].clone()

    def on_train_start(self) -> None:
        states, self._rng_states_to_restore = getattr(self, "_rng_states_to_restore", None), None
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(states["python"])

    # --- sampling -------------------------------------------------------------------------------
    def pipeline(self, use_ema: bool = True) -> Pipeline:
        """The module as a ``ddpm.Pipeline`` over its live weights (the EMA copy, or the raw ones), its sampler and its
        guidance: callbacks sample through the same path as ``ddpm.sample``. Nothing is copied."""
        net = self.ema.module if use_ema else self.net
        return Pipeline(self.denoiser.with_net(net), p_uncond=self.p_uncond if self.conditional else 0.0,
                     guidance=self.guidance,
                     sampler=self.sampler, config=self.config, weights="ema" if use_ema else "raw", step=self.global_step)


@torch.no_grad()
def ema_step(ema: AveragedModel, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, parameters and buffers, in one foreach op per dtype.

    The average of torch.optim.swa_utils.get_ema_multi_avg_fn, without ``AveragedModel.update_parameters``, whose
    ``n_averaged == 0`` tests read a device tensor on the host: two GPU synchronisations every training step.
    The average starts as the network itself (AveragedModel copies it), so no first-step copy is needed."""
    lerp_weights_(ema.module, net, 1 - decay)
    ema.n_averaged += 1


def apply_optimizer_settings(checkpoint: dict, requested: dict) -> None:
    """Resume with the optimizer hyperparameters asked for now (lr, betas, weight decay, ...), not the checkpoint's:
    the moments and step counts are kept, the settings replaced in its param groups and in the learning-rate
    scheduler's base rates (where a warm-up is, the rate keeps its place in it). Each change is logged."""
    for state in checkpoint["optimizer_states"]:
        for group in state["param_groups"]:
            old_base = group.get("initial_lr", group["lr"])
            for key, value in requested.items():
                if key in group and group[key] != value and key not in ("lr", "initial_lr"):
                    log.info("resuming with optim.optimizer.%s=%s (the checkpoint had %s)", key, value, group[key])
                    group[key] = value
            if old_base != requested["lr"]:
                log.info("resuming with optim.optimizer.lr=%g (the checkpoint had %g)", requested["lr"], old_base)
                group["lr"] = group["lr"] / old_base * requested["lr"] if old_base else requested["lr"]
                group["initial_lr"] = requested["lr"]
    for scheduler in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in scheduler:
            scheduler["base_lrs"] = [requested["lr"]] * len(scheduler["base_lrs"])
            scheduler["_last_lr"] = [group["lr"] for state in checkpoint["optimizer_states"] for group in state["param_groups"]]


def _numpy_rng_state() -> tuple:
    """numpy's RNG state with its key array as a tensor: checkpoints then load with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _linear_warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
