"""EDM (Karras et al. 2022): x = x_0 + sigma eps with t = sigma in [sigma_min, sigma_max], the preconditioning of its
Table 1 (c_in here, c_skip and c_out in the ``edm`` target of ``ddpm/core/prediction.py``, c_noise below) and
ln sigma ~ N(P_mean, P_std^2) for training."""

from __future__ import annotations

import math

import torch

from ddpm.core.errors import ConfigError
from ddpm.core.processes import Process, check_choice, check_positive
from ddpm.core.settings import number

SIGMA_DISTRIBUTIONS = ("log_normal", "uniform_lambda")


class EDMProcess(Process):
    name = "edm"
    predictions = ("edm", "eps", "x0")

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_distribution: str = "log_normal", P_mean: float = -1.2, P_std: float = 1.2,
                 c_noise_scale: float = 1000.0):
        super().__init__(sigma_data)
        check_positive("process.sigma_min", sigma_min)
        check_positive("process.P_std", P_std)
        check_positive("process.c_noise_scale", c_noise_scale)
        check_choice("process.sigma_distribution", sigma_distribution, SIGMA_DISTRIBUTIONS)
        if not (number(sigma_max) and sigma_max > sigma_min):
            raise ConfigError(f"process.sigma_max={sigma_max!r}: must be a number > process.sigma_min={sigma_min}")
        if not number(P_mean):
            raise ConfigError(f"process.P_mean={P_mean!r}: must be a number (Karras et al.: -1.2)")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.sigma_distribution, self.P_mean, self.P_std = sigma_distribution, float(P_mean), float(P_std)
        self.c_noise_scale = float(c_noise_scale)

    @property
    def sigma_min(self) -> float:
        return self.t_min

    @property
    def sigma_max(self) -> float:
        return self.t_max

    def alpha_sigma(self, t):
        t = t.double()
        return torch.ones_like(t), t

    def d_alpha_sigma(self, t):
        t = t.double()
        return torch.zeros_like(t), torch.ones_like(t)

    def t_of_log_snr(self, lam):
        """lambda = -2 ln sigma."""
        return torch.exp(-lam.double() / 2)

    def sample_t(self, n, device="cpu"):
        """log_normal: ln sigma ~ N(P_mean, P_std^2) (Karras et al., Table 1); uniform_lambda: lambda = -2 ln sigma
        uniform over the sampling range [sigma_min, sigma_max]."""
        if self.sigma_distribution == "log_normal":
            return torch.exp(self.P_mean + self.P_std * torch.randn(n, device=device, dtype=torch.float64))
        lo, hi = math.log(self.t_min), math.log(self.t_max)
        return torch.exp(lo + (hi - lo) * torch.rand(n, device=device, dtype=torch.float64))

    def scale_input(self, x_t, t):
        """c_in = 1 / sqrt(sigma^2 + sigma_data^2): unit-variance network input."""
        c_in = (t.double() ** 2 + self.sigma_data**2).rsqrt().to(x_t.dtype)
        return x_t * c_in.view(-1, *([1] * (x_t.ndim - 1)))

    def c_noise(self, t):
        """EDM's c_noise = ln(sigma) / 4, times ``c_noise_scale`` (1000): their sinusoidal embedding is the one of
        DDPM's indices 0..999, which would barely tell ln(sigma) / 4 in [-1.6, 1.1] apart."""
        return self.c_noise_scale * t.double().log() / 4

    def path_settings(self):
        return {**super().path_settings(), "c_noise_scale": self.c_noise_scale}
