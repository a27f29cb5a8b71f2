"""DDIM sampling (Song et al. 2021, eq. 12): deterministic at eta = 0, ancestral DDPM at eta = 1."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ddpm.core.diffusion import DDPMProcess, extract
from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn, clip_x0, randn_like, sampling_timesteps


def ddim_step(
    alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
    noise: torch.Tensor | None, eta: float = 0.0, x0_clip: str = "none", percentile: float = 0.995,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t_prev} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev) and eps the noise consistent with the
    (clipped) predicted x0 at x_t, or the ``eps`` given (CFG++ renoises with the unconditional one, Chung et al. 2024).
    Returns (x_prev, x0_pred). ``alpha_bar`` and ``alpha_bar_prev`` broadcast against ``x``."""
    x0 = clip_x0(x0, x0_clip, percentile)
    if eps is None:
        eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if noise is not None and eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def check_eta(eta: float) -> None:
    """The one rule of ``sampler.eta``: a number >= 0 (0 deterministic DDIM, 1 the DDPM posterior's variance)."""
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0):
        raise ConfigError(f"sampler.eta={eta}: must be >= 0 (0 = deterministic, 1 = DDPM)")


def sample_ddim(
    model_fn: ModelFn, process: DDPMProcess, noise: torch.Tensor, *, steps: int = 50, eta: float = 0.0,
    x0_clip: str = "clip", percentile: float = 0.995, generator: torch.Generator | None = None,
    callback: Callable | None = None, progress: bool = False,
) -> torch.Tensor:
    """DDIM over ``steps`` evenly spaced timesteps; one model evaluation per step."""
    check_eta(eta)
    renoise = getattr(model_fn, "renoise_with_eps", False)  # CFG++'s model_fn: renoise with its eps, not x0's
    timesteps = sampling_timesteps(process.alphas_cumprod, steps).to(noise.device)
    ones = torch.ones(1, dtype=torch.float64, device=process.alphas_cumprod.device)
    alphas_cumprod = torch.cat([ones, process.alphas_cumprod[timesteps.to(ones.device)]])  # [1, abar_t0, ...]
    x = noise
    for i in tqdm(reversed(range(len(timesteps))), total=len(timesteps), disable=not progress, desc="ddim", leave=False):
        t = timesteps[i].expand(x.shape[0])
        index = torch.full((x.shape[0],), i + 1, device=x.device)
        alpha_bar, alpha_bar_prev = extract(alphas_cumprod, index, x), extract(alphas_cumprod, index - 1, x)
        z = randn_like(x, generator) if eta > 0 and i > 0 else None
        x0, eps = model_fn(x, t)
        x, x0 = ddim_step(alpha_bar, alpha_bar_prev, x, x0, z, eta, x0_clip, percentile, eps if renoise else None)
        if callback is not None:
            callback(i, x, x0)
    return x
