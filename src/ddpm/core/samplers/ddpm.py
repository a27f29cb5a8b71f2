"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with timestep respacing (Nichol & Dhariwal 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from tqdm.auto import tqdm

from ddpm.core.processes.ddpm import DDPMProcess, extract, respace
from ddpm.core.samplers import ModelFn, Sampler, clip_x0, functional, randn_like, sampling_timesteps
from ddpm.core.settings import one_of
from ddpm.core.variance import learned_range_log_variance

VARIANCES = ("beta", "posterior")


def ddpm_step(
    spaced: DDPMProcess, i: int, x: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor | None,
    variance: str = "beta", x0_clip: str = "clip", percentile: float = 0.995, v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step x_t -> x_{t-1} of the (respaced) process ``spaced`` at its index ``i``; returns (x_{t-1}, x0_pred).

    The mean is the posterior mean (eq. 7) at the predicted x_0; for an eps model, where x_0 = (x_t - sqrt(1 -
    alpha_bar) eps) / sqrt(alpha_bar), it equals Algorithm 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps).
    sigma_t^2 is beta_t or the posterior beta-tilde_t (the paper's two choices, sec. 3.2), or, given a learned
    variance's output ``v``, iDDPM's eq. 15 between the respaced process's own beta_t and beta-tilde_t (as their
    respaced sampling does).
    """
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    x0 = clip_x0(x0, x0_clip, percentile)
    mean, posterior_variance = spaced.q_posterior(x0, x, t)
    if i == 0 or noise is None:
        return mean, x0
    if v is not None:
        return mean + torch.exp(0.5 * learned_range_log_variance(spaced, v.to(x.dtype), t)) * noise, x0
    sigma2 = extract(spaced.betas, t, x) if variance == "beta" else posterior_variance
    return mean + sigma2.sqrt() * noise, x0


@dataclass(frozen=True)
class DDPMSampler(Sampler):
    """Algorithm 2 over ``steps`` evenly spaced timesteps (all T when None); one model evaluation per step.
    ``variance``: sigma_t^2 = beta_t (``beta``) or the posterior's beta-tilde_t (``posterior``), the paper's two
    choices, for a model of fixed variance; a model that learned its variance (``diffusion.variance=learned_range``,
    its model_fn's ``learned_variance``) samples with the learned one, whatever ``variance`` says (iDDPM)."""

    name: ClassVar[str] = "ddpm"
    order: ClassVar[int] = 0
    discrete_only: ClassVar[bool] = True  # Algorithm 2 walks the discrete process's steps
    steps: int | None = None
    variance: str = "beta"

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("sampler.variance", self.variance, VARIANCES)

    def __call__(self, model_fn: ModelFn, process: DDPMProcess, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
        timesteps = sampling_timesteps(process.alphas_cumprod, self.steps or process.num_timesteps).to(noise.device)
        spaced = respace(process, timesteps)
        x, learned = noise, getattr(model_fn, "learned_variance", False)
        for i in tqdm(reversed(range(len(timesteps))), total=len(timesteps), disable=not progress, desc="ddpm", leave=False):
            t = timesteps[i].expand(x.shape[0])
            x0, _, v = model_fn(x, t, with_variance=True) if learned else (*model_fn(x, t), None)
            z = randn_like(x, generator) if i > 0 else None
            x, x0 = ddpm_step(spaced, i, x, x0, z, self.variance, self.x0_clip, self.percentile, v)
            if callback is not None:
                callback(i, x, x0)
        return x


sample_ddpm = functional(DDPMSampler)
