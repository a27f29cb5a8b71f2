"""The reverse step's variance Sigma_theta(x_t, t) = sigma_t^2 I of discrete DDPM: the option ``diffusion.variance``.

* ``fixed_small``: beta-tilde_t, the posterior's variance (Ho et al. 2020 sec. 3.2, their sigma_t^2 = beta-tilde_t);
* ``fixed_large``: beta_t (their other choice);
* ``learned_range``: Nichol & Dhariwal 2021, eq. 15: the network outputs a second set of channels v and
  Sigma_theta = exp(v' log beta_t + (1 - v') log beta-tilde_t) with v' = (v + 1) / 2, so v = -1 is fixed_small and
  v = 1 is beta_t. Trained with their hybrid loss (``ddpm.core.objectives.denoising``).

At t = 1, where beta-tilde_1 = 0, every option reads beta-tilde_2 for the small end, as iDDPM's code does (the decoder
needs a width); fixed_large reads beta-tilde_2 there too, while learned_range's large end keeps log beta_1 (iDDPM's
``learned_range`` code, and diffusers'). Ancestral sampling adds no noise at t = 1, so that end matters only to the
bound's decoder term. Indices follow ``ddpm.core.processes.ddpm``: i = t - 1.
"""

from __future__ import annotations

import torch

from ddpm.core.errors import ConfigError
from ddpm.core.processes.ddpm import DDPMProcess, extract

VARIANCES = ("fixed_small", "fixed_large", "learned_range")
FIXED = ("fixed_small", "fixed_large")


def check_variance(variance: str, key: str = "diffusion.variance") -> None:
    if variance not in VARIANCES:
        raise ConfigError(f"{key}={variance!r}: must be one of {list(VARIANCES)}")


def clipped_posterior_log_variance(process: DDPMProcess) -> torch.Tensor:
    """log beta-tilde_t per index with beta-tilde_2 at t = 1 (float64): the small end."""
    tilde = process.posterior_variance
    if len(tilde) < 2:
        raise ConfigError("a reverse-step variance needs a process of at least 2 steps")
    return torch.cat([tilde[1:2], tilde[1:]]).log()


def fixed_log_variance(process: DDPMProcess, variance: str) -> torch.Tensor:
    """log sigma_t^2 per index of a fixed variance (float64): ``fixed_small`` beta-tilde_t, ``fixed_large`` beta_t,
    both beta-tilde_2 at t = 1."""
    if variance not in FIXED:
        raise ConfigError(f"variance={variance!r}: a fixed variance is one of {list(FIXED)}")
    small = clipped_posterior_log_variance(process)
    return small if variance == "fixed_small" else torch.cat([small[:1], process.betas[1:].log()])


def learned_range_log_variance(process: DDPMProcess, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """iDDPM eq. 15: log Sigma = v' log beta_t + (1 - v') log beta-tilde_t, v' = (v + 1) / 2, per element of the
    network's variance output ``v`` at the process indices ``index``; in v's dtype."""
    small = extract(clipped_posterior_log_variance(process), index, v)
    large = extract(process.betas.log(), index, v)
    fraction = (v + 1) / 2
    return fraction * large + (1 - fraction) * small


def model_log_variance(process: DDPMProcess, variance: str, index: torch.Tensor, like: torch.Tensor,
                       v: torch.Tensor | None = None) -> torch.Tensor:
    """log Sigma_theta at ``index``, shaped like ``like``: a fixed variance's, or the learned one from ``v``."""
    if variance == "learned_range":
        if v is None:
            raise ConfigError("variance=learned_range: the model's variance output v is needed (a network with twice the "
                              "data's channels, trained with diffusion.variance=learned_range)")
        return learned_range_log_variance(process, v, index)
    return extract(fixed_log_variance(process, variance), index, like).expand_as(like)
