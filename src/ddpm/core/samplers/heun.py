"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, EDM, Algorithm 1 without churn),
over the discrete model's own noise levels.

In EDM's coordinates x~ = x_t / alpha_t and sigma = sigma_t / alpha_t the ODE is dx~/dsigma = (x~ - D(x~; sigma)) / sigma,
with D the predicted x_0, so a model trained on any VP schedule is solved without retraining. Each step takes an
Euler step to the next level and corrects it with the slope there (2 evaluations); the last step, to sigma = 0, is
Euler's alone. An Euler step alone is exactly DDIM (eta = 0).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ddpm.core.diffusion import DDPMProcess
from ddpm.core.samplers import ModelFn, clip_x0, sampling_timesteps


def noise_levels(steps: int) -> int:
    """How many noise levels a budget of ``steps`` model evaluations buys: N levels cost 2N - 1 evaluations."""
    return max(1, (steps + 1) // 2)


def sample_heun(
    model_fn: ModelFn, process: DDPMProcess, noise: torch.Tensor, *, steps: int = 19, spacing: str = "karras",
    lambda_min: float | None = -5.1, rho: float = 7.0, x0_clip: str = "clip", percentile: float = 0.995,
    generator: torch.Generator | None = None, callback: Callable | None = None, progress: bool = False,
) -> torch.Tensor:
    """At most ``steps`` model evaluations, as for the other samplers: N = (steps + 1) // 2 noise levels, 2N - 1
    evaluations (10 -> 9, 20 -> 19). The levels are the model's timesteps chosen by ``spacing`` (``karras``: EDM's
    rho = 7 spacing of sigma; see ``sampling_timesteps``). Deterministic: ``generator`` is unused."""
    timesteps = sampling_timesteps(process.alphas_cumprod, noise_levels(steps), spacing, lambda_min, rho).flip(0)
    alphas_cumprod = process.alphas_cumprod[timesteps.to(process.alphas_cumprod.device)].tolist()
    alpha = [math.sqrt(a) for a in alphas_cumprod]
    sigma = [math.sqrt((1 - a) / a) if a > 0 else math.inf for a in alphas_cumprod] + [0.0]  # EDM sigma, then 0
    timesteps = timesteps.to(noise.device)

    def denoise(x_tilde: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, slope) at level i; the model sees x_t = alpha x~."""
        x0, eps = model_fn(alpha[i] * x_tilde if math.isfinite(sigma[i]) else x_tilde, timesteps[i].expand(x_tilde.shape[0]))
        x0 = clip_x0(x0, x0_clip, percentile)
        return x0, (x_tilde - x0) / sigma[i] if math.isfinite(sigma[i]) else eps

    # x~ = x_t / alpha_t; at zero terminal SNR (alpha_T = 0) x~ is infinite, so the first step is taken in x_t itself:
    # from sigma = inf the only step is Euler's (= DDIM), x~_next = x0 + sigma_next eps, with eps = x_T there.
    x = noise / alpha[0] if math.isfinite(sigma[0]) else noise
    for i in tqdm(range(len(timesteps)), disable=not progress, desc="heun", leave=False):
        x0, slope = denoise(x, i)
        if not math.isfinite(sigma[i]):
            x = x0 + sigma[i + 1] * slope
        else:
            x_euler = x + (sigma[i + 1] - sigma[i]) * slope
            if sigma[i + 1] > 0:
                _, slope_next = denoise(x_euler, i + 1)
                x = x + (sigma[i + 1] - sigma[i]) * 0.5 * (slope + slope_next)
            else:
                x = x_euler  # = x0: the last step lands on the prediction
        if callback is not None:
            callback(len(timesteps) - 1 - i, x * (alpha[i + 1] if i + 1 < len(alpha) else 1.0), x0)
    return x
