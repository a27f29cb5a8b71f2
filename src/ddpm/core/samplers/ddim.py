"""DDIM sampling (Song et al. 2021, eq. 12) on any process: deterministic at eta = 0, where it is the Euler step of the
probability-flow ODE (for ``process=flow`` the plain Euler sampler of flow matching; for EDM, Karras et al.'s Euler
step), and ancestral at eta = 1 (the DDPM posterior's variance)."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn, clip_x0, initial_x, levels, randn_like


def ddim_step(
    alpha: torch.Tensor, sigma: torch.Tensor, alpha_prev: torch.Tensor, sigma_prev: torch.Tensor, x: torch.Tensor,
    x0: torch.Tensor, noise: torch.Tensor | None, eta: float = 0.0, x0_clip: str = "none", percentile: float = 0.995,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_prev = alpha_prev x0 + sqrt(sigma_prev^2 - s^2) eps + s z, s = eta sigma_prev sqrt(1 - SNR_t / SNR_prev)
    (for a VP process Song et al.'s sigma_t(eta)), eps the noise consistent with the (clipped) predicted x0 at x_t, or
    the ``eps`` given (CFG++ renoises with the unconditional one, Chung et al. 2024). Returns (x_prev, x0_pred).
    The coefficients broadcast against ``x``."""
    x0 = clip_x0(x0, x0_clip, percentile)
    if eps is None:
        eps = (x - alpha * x0) / sigma
    s = eta * sigma_prev * (1 - (alpha * sigma_prev) ** 2 / (alpha_prev * sigma) ** 2).clamp(min=0).sqrt()
    x_prev = alpha_prev * x0 + (sigma_prev**2 - s**2).clamp(min=0).sqrt() * eps
    if noise is not None and eta > 0:
        x_prev = x_prev + s * noise
    return x_prev, x0


def check_eta(eta: float) -> None:
    """The one rule of ``sampler.eta``: a number >= 0 (0 deterministic DDIM, 1 the DDPM posterior's variance)."""
    if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0):
        raise ConfigError(f"sampler.eta={eta}: must be >= 0 (0 = deterministic, 1 = DDPM)")


def sample_ddim(
    model_fn: ModelFn, process, noise: torch.Tensor, *, steps: int = 50, eta: float = 0.0, spacing: str = "time",
    lambda_min: float | None = None, rho: float = 7.0, x0_clip: str = "clip", percentile: float = 0.995, generator: torch.Generator | None = None,
    callback: Callable | None = None, progress: bool = False,
) -> torch.Tensor:
    """DDIM over ``steps`` levels (``process.sampling_times``: evenly in time by default, which for EDM, whose time is
    sigma, is linear in sigma: use ``spacing=karras`` there); one model evaluation per step."""
    check_eta(eta)
    renoise = getattr(model_fn, "renoise_with_eps", False)  # CFG++'s model_fn: renoise with its eps, not x0's
    times, alpha, sigma = levels(process, noise, steps, spacing, lambda_min, rho)
    x = initial_x(process, noise, sigma[-1].item())
    for i in tqdm(reversed(range(len(times))), total=len(times), disable=not progress, desc="ddim", leave=False):
        z = randn_like(x, generator) if eta > 0 and i > 0 else None
        x0, eps = model_fn(x, times[i].expand(x.shape[0]))
        x, x0 = ddim_step(alpha[i + 1], sigma[i + 1], alpha[i], sigma[i], x, x0, z, eta, x0_clip, percentile,
                          eps if renoise else None)
        if callback is not None:
            callback(i, x, x0)
    return x
