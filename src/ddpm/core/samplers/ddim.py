"""DDIM sampling (Song et al. 2021, eq. 12) on any process: deterministic at eta = 0, where it is the Euler step of the
probability-flow ODE (for ``process=flow`` the plain Euler sampler of flow matching; for EDM, Karras et al.'s Euler
step), and ancestral at eta = 1 (the DDPM posterior's variance)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from tqdm.auto import tqdm

from ddpm.core.samplers import ModelFn, SpacedSampler, clip_x0, functional, initial_x, levels, randn_like
from ddpm.core.settings import number, require


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


@dataclass(frozen=True)
class DDIM(SpacedSampler):
    """DDIM over ``steps`` levels (``process.sampling_times``: evenly in time by default, which for EDM, whose time is
    sigma, is linear in sigma: use ``spacing=karras`` there); one model evaluation per step. ``eta``: 0 deterministic
    (the probability-flow ODE's Euler step), 1 the DDPM posterior's variance."""

    name: ClassVar[str] = "ddim"
    order: ClassVar[int] = 1
    steps: int = 50
    eta: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(number(self.eta) and self.eta >= 0, "sampler.eta", self.eta, ">= 0 (0 = deterministic, 1 = DDPM)")

    def __call__(self, model_fn: ModelFn, process, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
        renoise = getattr(model_fn, "renoise_with_eps", False)  # CFG++'s model_fn: renoise with its eps, not x0's
        times, alpha, sigma = levels(process, noise, self.steps, self.spacing, self.lambda_min, self.rho)
        x = initial_x(process, noise, sigma[-1].item())
        for i in tqdm(reversed(range(len(times))), total=len(times), disable=not progress, desc="ddim", leave=False):
            z = randn_like(x, generator) if self.eta > 0 and i > 0 else None
            x0, eps = model_fn(x, times[i].expand(x.shape[0]))
            x, x0 = ddim_step(alpha[i + 1], sigma[i + 1], alpha[i], sigma[i], x, x0, z, self.eta, self.x0_clip,
                              self.percentile, eps if renoise else None)
            if callback is not None:
                callback(i, x, x0)
        return x


sample_ddim = functional(DDIM)
