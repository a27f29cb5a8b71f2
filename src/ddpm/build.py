"""Config -> objects: the one place (with the entry points) that calls Hydra's ``instantiate``.

The LightningModule receives its parts built (the lightning-hydra-template habit), so it can be constructed by hand
from plain objects, and a checkpoint's config is built here once ``rebuild_config`` has recomposed it from conf/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ddpm.core.backbone import check_backbone
from ddpm.core.denoiser import Denoiser
from ddpm.core.errors import ConfigError
from ddpm.core.diffusion import GaussianDiffusion
from ddpm.core.schedules import rescale_zero_terminal_snr
from ddpm.checkpoints import load_checkpoint
from ddpm.training.module import DiffusionModule
from ddpm.validation import check_checkpoint_config

def build_net(model_cfg: DictConfig, **overrides) -> nn.Module:
    """The network of the ``model`` group, checked against the backbone contract; ``model.compile`` is a training
    option, not a network argument."""
    net = instantiate({k: v for k, v in model_cfg.items() if k != "compile"}, **overrides)
    check_backbone(net, f"model._target_={model_cfg._target_}")
    return net


def build_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """The process of the ``schedule`` group, rescaled to zero terminal SNR when ``schedule.zero_terminal_snr`` (a
    rescale of any schedule, so a key of each option, read here rather than passed to the schedule function)."""
    betas = instantiate({k: v for k, v in cfg.schedule.items() if k != "zero_terminal_snr"})
    if cfg.schedule.get("zero_terminal_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return GaussianDiffusion(betas)


def build_denoiser(cfg: DictConfig) -> Denoiser:
    num_classes = cfg.data.num_classes if cfg.guidance.conditional else None
    return Denoiser(build_net(cfg.model, num_classes=num_classes), build_diffusion(cfg), cfg.diffusion.prediction,
                    cfg.diffusion.loss_weight, cfg.diffusion.min_snr_gamma)


def guidance_interval(node: Any) -> tuple[float, float] | None:
    return None if node is None else (float(node[0]), float(node[1]))


def build_module(cfg: DictConfig, choices: dict[str, str] | None = None) -> DiffusionModule:
    """The LightningModule of a composed training config (groups model, schedule, diffusion, guidance, sampler, optim);
    ``choices``: the group options it was composed from, recorded in its checkpoints (``recorded_choices``)."""
    return DiffusionModule(
        denoiser=build_denoiser(cfg),
        sampler=instantiate(cfg.sampler),
        optimizer=instantiate(cfg.optim.optimizer),
        warmup_steps=cfg.optim.warmup_steps,
        ema_decay=cfg.ema.decay,
        ema_warmup=cfg.ema.get("warmup", False),
        power_ema_sigma_rels=tuple(cfg.ema.get("sigma_rels") or ()),
        p_uncond=cfg.guidance.p_uncond if cfg.guidance.conditional else 0.0,
        guidance_scale=cfg.guidance.scale,
        guidance_rescale=cfg.guidance.get("rescale", 0.0),
        guidance_interval=guidance_interval(cfg.guidance.get("interval")),
        config=OmegaConf.to_container(cfg, resolve=True),
        compile_net=bool(cfg.model.get("compile", False)),
        choices=choices,
    )


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild the module from a checkpoint written by ``python -m ddpm.train``, weights and EMA included."""
    checkpoint = load_checkpoint(path, map_location)
    source = f"ckpt_path={str(path)!r}"
    cfg = OmegaConf.create(checkpoint["config"])
    check_checkpoint_config(cfg, source)
    module = build_module(cfg, checkpoint.get("choices"))
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:  # missing or unexpected keys, other shapes
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"{source}: its weights do not fit the model its config describes ({reason})") from None
    module.checkpoint_step = checkpoint.get("global_step")  # recorded in evaluation protocols
    return module


def instantiate_loggers(node) -> list | bool:
    """One logger (a node with ``_target_``), several (a node of such nodes, e.g. logger=wandb_csv), or none."""
    if not node:
        return False
    if "_target_" in node:
        return [instantiate(node)]
    return [instantiate(each) for each in node.values() if each]
