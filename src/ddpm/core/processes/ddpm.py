"""The discrete DDPM process (Ho et al. 2020): q(x_t | x_0), its posterior q(x_{t-1} | x_t, x_0) and the
``Process`` interface (``ddpm/core/processes``) over its T steps. Pure PyTorch: no network, no schedule choice (the
betas come built). The training loss is the denoiser's (``ddpm/core/denoiser.py``), as for every process.

Index convention: tensors are indexed by ``i = t - 1``, so ``i = 0`` is the paper's t = 1 and
``i = T - 1`` is t = T. The network receives ``i`` as its timestep (c_noise(i) = i).
"""

from __future__ import annotations

import torch

from ddpm.core.errors import ConfigError
from ddpm.core.processes import Process


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


class DDPMProcess(Process):
    """The discrete DDPM process of a schedule (Ho et al. 2020): its derived quantities, computed once in float64
    and held as buffers (not saved: a checkpoint rebuilds them from its schedule)."""

    name = "ddpm"
    discrete = True
    predictions = ("eps", "x0", "v")

    def __init__(self, betas: torch.Tensor, sigma_data: float = 1.0):
        super().__init__(sigma_data)
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

    # --- the Process interface (t: indices 0..T-1) ---------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t)."""
        return self.sqrt_alphas_cumprod.to(t.device)[t], self.sqrt_one_minus_alphas_cumprod.to(t.device)[t]

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.snr(t).log()

    def t_of_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The index whose log-SNR is nearest to each ``lam`` (the rounding ``sampling_timesteps`` uses)."""
        from ddpm.core.samplers import nearest_index

        return nearest_index(self.log_snr(torch.arange(self.num_timesteps, device=self.betas.device)).cpu(), lam.cpu())

    def sample_t(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """t ~ U{1..T} (Ho et al. Algorithm 1), as indices."""
        return torch.randint(0, self.num_timesteps, (n,), device=device)

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def t_max(self) -> int:
        return self.num_timesteps - 1

    def sampling_times(self, steps: int, spacing: str = "time", lambda_min: float | None = None,
                       rho: float = 7.0) -> torch.Tensor:
        from ddpm.core.samplers import sampling_timesteps

        return sampling_timesteps(self.alphas_cumprod, steps, spacing, lambda_min, rho)

    def same_path(self, other: Process) -> bool:
        a, b = self.alphas_cumprod, getattr(other, "alphas_cumprod", None)
        return (type(other) is type(self) and a.shape == b.shape and other.sigma_data == self.sigma_data
                and torch.allclose(a.cpu(), b.cpu(), rtol=0, atol=1e-12))


def respace(process: DDPMProcess, timesteps: torch.Tensor) -> DDPMProcess:
    """The process restricted to ``timesteps`` (Nichol & Dhariwal 2021, sec. 4):
    alpha_bar is kept at those steps and beta_i = 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}."""
    alphas_cumprod = process.alphas_cumprod.cpu()[timesteps.cpu()]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return DDPMProcess(1.0 - alphas_cumprod / previous).to(process.betas.device)
