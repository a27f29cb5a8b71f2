"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with timestep respacing (Nichol & Dhariwal 2021)."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ddpm.core.diffusion import DDPMProcess, extract, respace
from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn, clip_x0, randn_like, sampling_timesteps

VARIANCES = ("beta", "posterior")


def ddpm_step(
    spaced: DDPMProcess, i: int, x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None,
    variance: str = "beta", x0_clip: str = "clip", percentile: float = 0.995,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step x_t -> x_{t-1} of the (respaced) process ``spaced`` at its index ``i``; returns (x_{t-1}, x0_pred).

    The mean is the posterior mean (eq. 7) at the predicted x_0; for an eps model, where x_0 = (x_t - sqrt(1 -
    alpha_bar) eps) / sqrt(alpha_bar), it equals Algorithm 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps).
    sigma_t^2 is beta_t or the posterior beta-tilde_t (the paper's two choices, sec. 3.2).
    """
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    x0 = clip_x0(x0, x0_clip, percentile)
    mean, posterior_variance = spaced.q_posterior(x0, x, t)
    if i == 0 or noise is None:
        return mean, x0
    sigma2 = extract(spaced.betas, t, x) if variance == "beta" else posterior_variance
    return mean + sigma2.sqrt() * noise, x0


def sample_ddpm(
    model_fn: ModelFn, process: DDPMProcess, noise: torch.Tensor, *, steps: int | None = None,
    variance: str = "beta", x0_clip: str = "clip", percentile: float = 0.995, generator: torch.Generator | None = None,
    callback: Callable | None = None, progress: bool = False,
) -> torch.Tensor:
    """Algorithm 2 over ``steps`` evenly spaced timesteps (all T when None); one model evaluation per step."""
    if variance not in VARIANCES:
        raise ConfigError(f"sampler.variance={variance!r}: must be one of {list(VARIANCES)}")
    timesteps = sampling_timesteps(process.alphas_cumprod, steps or process.num_timesteps).to(noise.device)
    spaced = respace(process, timesteps)
    x = noise
    for i in tqdm(reversed(range(len(timesteps))), total=len(timesteps), disable=not progress, desc="ddpm", leave=False):
        x0, _ = model_fn(x, timesteps[i].expand(x.shape[0]))
        z = randn_like(x, generator) if i > 0 else None
        x, x0 = ddpm_step(spaced, i, x, x0, z, variance, x0_clip, percentile)
        if callback is not None:
            callback(i, x, x0)
    return x


sample_ddpm.discrete_only = True  # Algorithm 2 walks the discrete process's steps (ddpm.core.samplers.check_process)
