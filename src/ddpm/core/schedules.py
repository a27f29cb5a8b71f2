"""Noise schedules: each function returns the betas beta_1..beta_T as a float64 tensor.

Hydra builds the `schedule` group straight from these functions (`_target_`), so adding a
schedule is adding one function here and one YAML file in `conf/schedule/`.
"""

from __future__ import annotations

import math

import torch


def linear_betas(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of Ho et al. 2020 (section 4): beta_t evenly spaced from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at max_beta."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)
