"""The DDPM forward process q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0) and the training loss
(Ho et al. 2020). Pure PyTorch: no Lightning, no network, no schedule choice.

Index convention: tensors are indexed by ``i = t - 1``, so ``i = 0`` is the paper's t = 1 and
``i = T - 1`` is t = T. The network receives ``i`` as its timestep.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

EpsModel = Callable[..., torch.Tensor]


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] in the dtype of ``like``, shaped (B, 1, 1, ...) to broadcast over an image batch."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """The schedule's derived quantities, computed once in float64 and held as buffers."""

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("schedule: betas must be a non-empty 1-D tensor with values in (0, 1)")
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

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert eq. 4: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (xt - extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / extract(self.sqrt_alphas_cumprod, t, xt)

    def training_loss(self, eps_model: EpsModel, x0: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """L_simple of Ho et al. eq. 14 (Algorithm 1): ||eps - eps_theta(x_t, t)||^2 with t ~ U{1..T}."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        eps = eps_model(self.q_sample(x0, t, noise), t, **model_kwargs)
        return torch.nn.functional.mse_loss(eps.float(), noise.float())


def spaced_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` indices evenly spread over 0..T-1, both ends included (Nichol & Dhariwal 2021, sec. 4)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampler.steps={steps}: must be between 1 and schedule.timesteps={num_timesteps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.round(torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64)).long().unique()


def logsnr_spaced_timesteps(alphas_cumprod: torch.Tensor, steps: int, lambda_min: float | None = None) -> torch.Tensor:
    """About ``steps`` indices whose log-SNR lambda_t = log(alpha_t / sigma_t) is evenly spread from t = 1 down to the
    last t whose lambda is at least ``lambda_min`` (None: down to t = T); Lu et al. 2022 recommend log-SNR spacing for
    low-resolution pixel-space models. Each index is the one nearest its target; near-duplicates collapse, so the
    result can be a little shorter than ``steps``.

    Why a floor: the cosine schedule's betas are clipped at 0.999, so its log-SNR falls from -6.5 to -9.9 in the
    last step alone; spaced down to -9.9, a quarter of 20 steps land on t >= 990 and several collapse (17 distinct,
    5 of them there). DPM-Solver implementations clip lambda_min for this (diffusers' ``lambda_min_clipped``, -5.1
    for cosine schedules); the linear schedule's lambda_T = -5.06 is above that floor and keeps t = T."""
    num_timesteps = len(alphas_cumprod)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampler.steps={steps}: must be between 1 and schedule.timesteps={num_timesteps}")
    lam = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod)).cpu()
    last = num_timesteps - 1 if lambda_min is None else max(int((lam >= lambda_min).sum()) - 1, 0)  # lam decreases
    targets = torch.linspace(lam[0].item(), lam[last].item(), steps, dtype=torch.float64)
    return (lam[None, : last + 1] - targets[:, None]).abs().argmin(dim=1).unique()


def respace(diffusion: GaussianDiffusion, timesteps: torch.Tensor) -> GaussianDiffusion:
    """The process restricted to ``timesteps`` (Nichol & Dhariwal 2021, sec. 4):
    alpha_bar is kept at those steps and beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
    alphas_cumprod = diffusion.alphas_cumprod.cpu()[timesteps.cpu()]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return GaussianDiffusion(1.0 - alphas_cumprod / previous).to(diffusion.betas.device)
