"""Noise schedules of the discrete DDPM process: each function returns the betas beta_1..beta_T as a float64 tensor,
and checks its own settings (ConfigError naming the ``schedule.<key>``).

The ``schedule`` group names these functions (``_target_``) and ``ddpm.builders`` calls them with the option's keys,
so adding a schedule is adding one function here and one YAML file in ``conf/schedule/``.
"""

from __future__ import annotations

import math

import torch

from ddpm.core.settings import integer, number, require


def _check_timesteps(timesteps) -> None:
    require(integer(timesteps) and timesteps > 0, "schedule.timesteps", timesteps, "an integer > 0")


def _check_max_beta(max_beta) -> None:
    require(number(max_beta) and 0 < max_beta <= 1, "schedule.max_beta", max_beta, "a number in (0, 1]")


def linear_betas(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of Ho et al. 2020 (section 4): beta_t evenly spaced from beta_start to beta_end."""
    _check_timesteps(timesteps)
    require(number(beta_start) and 0 < beta_start < 1, "schedule.beta_start", beta_start, "a number in (0, 1)")
    require(number(beta_end) and beta_start < beta_end < 1, "schedule.beta_end", beta_end, "a number in (schedule.beta_start, 1)")
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), clipped at max_beta."""
    _check_timesteps(timesteps)
    require(number(s) and s > 0, "schedule.s", s, "a number > 0")
    _check_max_beta(max_beta)
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def sigmoid_betas(timesteps: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> torch.Tensor:
    """Sigmoid schedule of Chen 2023 (Algorithm 1) and Jabri et al. 2023: alpha_bar(t) = (s(end/tau) -
    s((t (end - start) + start)/tau)) / (s(end/tau) - s(start/tau)) for t in [0, 1], s the logistic sigmoid, normalised
    so alpha_bar(0) = 1; betas from its ratios, clipped at max_beta. A smaller tau moves the noise towards the middle."""
    _check_timesteps(timesteps)
    require(number(start), "schedule.start", start, "a number")
    require(number(end) and end > start, "schedule.end", end, "a number > schedule.start")
    require(number(tau) and tau > 0, "schedule.tau", tau, "a number > 0")
    _check_max_beta(max_beta)
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64)), torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alphas_cumprod = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar_t) so it is 0 at t = T (zero terminal SNR: x_T is
    pure noise, as at sampling time) and unchanged at t = 1; returns the betas of that alpha_bar (beta_T = 1)."""
    sqrt_alphas_cumprod = torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0).sqrt()
    first, last = sqrt_alphas_cumprod[0].clone(), sqrt_alphas_cumprod[-1].clone()
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas
