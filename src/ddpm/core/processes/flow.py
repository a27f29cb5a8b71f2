"""Rectified flow / conditional flow matching (Liu et al. 2023; Lipman et al. 2023): x_t = (1 - t) x_0 + t eps,
t in [0, 1]. Its network predicts the velocity u = dx_t/dt = eps - x_0 (the ``velocity`` target), and the Euler step
of its ODE is DDIM's (``ddpm/core/samplers/ddim.py``). The objective of SD3 and Flux (Esser et al. 2024), with
logit-normal t.

Time runs as in every process here (and in SD3 and diffusers' FlowMatchEulerDiscreteScheduler): t = 0 is data, t = 1
is noise. Lipman et al. and Meta's flow_matching run it the other way (t = 0 noise, t = 1 data, x_t = t x_1 +
(1 - t) x_0 with x_0 the noise): their time is our 1 - t, and their velocity dx/dt is our -u = x_0 - eps, so their
model output is minus ours at the mirrored time (tests/test_processes.py checks the velocity against the path's
derivative)."""

from __future__ import annotations

import torch

from ddpm.core.errors import ConfigError
from ddpm.core.processes import TIME_DISTRIBUTIONS, Process, check_between, check_choice, check_positive, draw_time
from ddpm.core.settings import number


class FlowProcess(Process):
    name = "flow"
    predictions = ("velocity", "x0")  # eps is undefined at t = 1, where alpha = 0: x_0 = (x_t - t eps) / 0

    def __init__(self, time_distribution: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 t_min: float = 0.002, c_noise_scale: float = 1000.0, sigma_data: float = 1.0):
        super().__init__(sigma_data)
        check_choice("process.time_distribution", time_distribution, TIME_DISTRIBUTIONS)
        check_positive("process.logit_std", logit_std)
        check_positive("process.c_noise_scale", c_noise_scale)
        check_between("process.t_min", t_min, 0, 1)
        if not number(logit_mean):
            raise ConfigError(f"process.logit_mean={logit_mean!r}: must be a number (Esser et al.: 0)")
        self.time_distribution, self.logit_mean, self.logit_std = time_distribution, float(logit_mean), float(logit_std)
        self.t_min, self.c_noise_scale = float(t_min), float(c_noise_scale)

    def alpha_sigma(self, t):
        t = t.double()
        return 1 - t, t

    def d_alpha_sigma(self, t):
        t = t.double()
        return -torch.ones_like(t), torch.ones_like(t)

    def t_of_log_snr(self, lam):
        """(1 - t) / t = exp(lambda / 2), so t = sigmoid(-lambda / 2)."""
        return torch.sigmoid(-lam.double() / 2)

    def sample_t(self, n, device="cpu"):
        return draw_time(self.time_distribution, n, device, self.logit_mean, self.logit_std)

    def c_noise(self, t):
        return self.c_noise_scale * t

    def path_settings(self):
        return {**super().path_settings(), "c_noise_scale": self.c_noise_scale}
