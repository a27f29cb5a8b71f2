"""The DDPM forward process q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0) and the training loss
(Ho et al. 2020). Pure PyTorch: no Lightning, no network, no schedule choice. The prediction target and the loss
weighting are ``ddpm/core/prediction.py``'s; ``ddpm/core/denoiser.py`` puts them together with a network.

Index convention: tensors are indexed by ``i = t - 1``, so ``i = 0`` is the paper's t = 1 and
``i = T - 1`` is t = T. The network receives ``i`` as its timestep.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddpm.core.errors import ConfigError
from ddpm.core.prediction import network_target

Network = Callable[..., torch.Tensor]


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] in the dtype of ``like``, shaped (B, 1, 1, ...) to broadcast over an image batch."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


def check_betas(betas: torch.Tensor) -> None:
    """The one rule for a schedule: a non-empty 1-D tensor of betas in (0, 1), except beta_T = 1 (zero terminal SNR,
    alpha_bar_T = 0, Lin et al. 2024). ConfigError naming the first bad beta (a schedule's settings can give NaN)."""
    in_unit_interval = (betas > 0) & (betas < 1)
    if betas.ndim == 1 and len(betas) > 0 and betas[-1] == 1:
        in_unit_interval[-1] = True
    if betas.ndim != 1 or len(betas) == 0:
        raise ConfigError("schedule: its betas must be a non-empty 1-D tensor")
    if not in_unit_interval.all():
        t = int((~in_unit_interval).nonzero()[0]) + 1
        raise ConfigError(f"schedule: its settings give betas outside (0, 1), first beta_{t} = {betas[t - 1].item():.4g} "
                          "(only beta_T may be 1, at zero terminal SNR): change the schedule's settings")


class DDPMProcess(nn.Module):
    """The discrete DDPM process of a schedule (Ho et al. 2020): its derived quantities, computed once in float64
    and held as buffers (not saved: a checkpoint rebuilds them from its schedule)."""

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        check_betas(betas)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Ho et al. eq. 7: posterior variance beta-tilde_t and the two coefficients of its mean.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        register = lambda name, value: self.register_buffer(name, value, persistent=False)  # noqa: E731
        register("betas", betas)
        register("alphas", alphas)
        register("alphas_cumprod", alphas_cumprod)
        register("alphas_cumprod_prev", alphas_cumprod_prev)
        register("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        register("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt())
        register("posterior_variance", posterior_variance)
        register("posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod))
        register("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Ho et al. eq. 4."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = extract(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        return mean, variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A draw from q(x_t | x_0) given the standard normal ``noise``."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7."""
        mean = extract(self.posterior_mean_coef1, t, xt) * x0 + extract(self.posterior_mean_coef2, t, xt) * xt
        return mean, extract(self.posterior_variance, t, xt).expand_as(xt)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t / (1 - alpha_bar_t), the signal-to-noise ratio at t (float64)."""
        alphas_cumprod = self.alphas_cumprod[t]
        return alphas_cumprod / (1 - alphas_cumprod)

    def training_loss(self, net: Network, x0: torch.Tensor, prediction: str = "eps",
                      weight: Callable[[torch.Tensor], torch.Tensor] | None = None, **model_kwargs) -> torch.Tensor:
        """Ho et al. Algorithm 1 with t ~ U{1..T}: the mean of weight(SNR_t) ||target - net(x_t, t)||^2 / d, where the
        target is eps (eq. 14, L_simple with weight 1), x0 or v (``ddpm/core/prediction.py``)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        output = net(self.q_sample(x0, t, noise), t, **model_kwargs)
        target = network_target(prediction, x0, noise, extract(self.sqrt_alphas_cumprod, t, x0),
                                extract(self.sqrt_one_minus_alphas_cumprod, t, x0))
        error = (output.float() - target.float()).square().flatten(1).mean(1)
        if weight is None:
            return error.mean()
        return (weight(self.snr(t)).to(error) * error).mean()


def respace(process: DDPMProcess, timesteps: torch.Tensor) -> DDPMProcess:
    """The process restricted to ``timesteps`` (Nichol & Dhariwal 2021, sec. 4):
    alpha_bar is kept at those steps and beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
    alphas_cumprod = process.alphas_cumprod.cpu()[timesteps.cpu()]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return DDPMProcess(1.0 - alphas_cumprod / previous).to(process.betas.device)
