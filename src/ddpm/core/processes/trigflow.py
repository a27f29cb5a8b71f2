"""TrigFlow (Lu & Song 2024): the cosine path in continuous time, x_t = cos(pi t / 2) x_0 + sin(pi t / 2) eps,
t in [0, 1]; variance preserving (alpha^2 + sigma^2 = 1), so Salimans & Ho's v = alpha eps - sigma x_0 is its velocity
up to the factor pi / 2. Added as the fourth process to measure what a new one touches: this file and
conf/process/trigflow.yaml.

Lu & Song write x_t = cos(s) x_0 + sin(s) sigma_d z, s in [0, pi / 2], for data of std sigma_d. Here s = pi t / 2 and
sigma_d = 1 whatever ``process.sigma_data`` says (which only ``diffusion.loss_weight=edm`` reads): their path with
sigma_d = 1, or theirs on data scaled by 1 / sigma_d. Their network predicts their velocity dx/ds = cos(s) sigma_d z -
sin(s) x_0, which at sigma_d = 1 is our ``v`` target; our t is their s times 2 / pi."""

from __future__ import annotations

import math

import torch

from ddpm.core.processes.flow import FlowProcess


class TrigFlowProcess(FlowProcess):
    """Flow's settings (time distribution, t_min, c_noise scale) on the trigonometric path."""

    name = "trigflow"
    predictions = ("v", "x0")  # eps is undefined at t = 1, where alpha = 0

    def alpha_sigma(self, t):
        """cos and sin of pi t / 2, with alpha(1) = 0 exactly (cos(pi / 2) in float64 is 6.1e-17, which would make
        t = 1 a finite level, log-SNR -74.7, that samplers step from as if it were data plus noise)."""
        t = t.double()
        angle = t * (math.pi / 2)
        return torch.where(t == 1, 0.0, angle.cos()), torch.where(t == 1, 1.0, angle.sin())

    def t_of_log_snr(self, lam):
        """cot(pi t / 2) = exp(lambda / 2), so t = (2 / pi) atan(exp(-lambda / 2))."""
        return torch.atan(torch.exp(-lam.double() / 2)) * (2 / math.pi)

    def d_alpha_sigma(self, t):
        """(pi / 2) (-sin, cos) of pi t / 2: the path's velocity is (pi / 2) v, Salimans & Ho's v."""
        angle = t.double() * (math.pi / 2)
        return -(math.pi / 2) * angle.sin(), (math.pi / 2) * angle.cos()
