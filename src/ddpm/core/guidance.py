"""Classifier-free guidance (Ho & Salimans 2022): label dropout at training, the guided eps at sampling.

Convention: ``guidance_scale`` is the paper's w,
    eps_guided = (1 + w) * eps(x_t, y) - w * eps(x_t, null),
so w = 0 is the purely conditional model. HuggingFace diffusers writes the same rule as
eps_u + s * (eps_c - eps_u) with s = 1 + w: our w = 2 is their guidance_scale = 3.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddpm.core.errors import ConfigError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``p_uncond`` (Ho & Salimans 2022, Algorithm 1)."""
    if p_uncond <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def guided_model_fn(net: nn.Module, labels: torch.Tensor | None, guidance_scale: float = 0.0) -> ModelFn:
    """Wrap the network as model_fn(x_t, t) -> eps, the one function every sampler calls.

    For w > 0 the conditional and unconditional halves run as one batched forward pass.
    An unconditional network (``net.num_classes is None``) ignores labels and w.
    """
    if getattr(net, "num_classes", None) is None:
        return lambda x, t: net(x, t)
    if labels is None:
        raise ValueError("a class-conditional model needs labels to sample")
    if guidance_scale == 0:
        return lambda x, t: net(x, t, labels)

    null = torch.full_like(labels, net.null_label)
    both_labels = torch.cat([labels, null])

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_cond, eps_uncond = net(torch.cat([x, x]), torch.cat([t, t]), both_labels).chunk(2)
        return (1 + guidance_scale) * eps_cond - guidance_scale * eps_uncond

    return model_fn


def check_guidance(p_uncond: float, guidance_scale: float, conditional: bool = True) -> None:
    """Refuse guided sampling from a model that never saw the null label: its eps_uncond is untrained."""
    if guidance_scale < 0:
        raise ConfigError(f"guidance.scale={guidance_scale}: must be >= 0 (0 = purely conditional)")
    if conditional and guidance_scale > 0 and p_uncond <= 0:
        raise ConfigError(
            f"guidance.scale={guidance_scale} needs a model trained with guidance.p_uncond > 0; with p_uncond=0 "
            "it never saw the null label. Set guidance.scale=0 or train with e.g. guidance.p_uncond=0.1"
        )
