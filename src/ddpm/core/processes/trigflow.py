"""TrigFlow (Lu & Song 2024): the cosine path in continuous time, x_t = cos(pi t / 2) x_0 + sin(pi t / 2) eps,
t in [0, 1]; variance preserving (alpha^2 + sigma^2 = 1), so Salimans & Ho's v = alpha eps - sigma x_0 is its velocity
up to the factor pi / 2. Added as the fourth process to measure what a new one touches: this file and
conf/process/trigflow.yaml."""

from __future__ import annotations

import math

import torch

from ddpm.core.processes.flow import FlowProcess


class TrigFlowProcess(FlowProcess):
    """Flow's settings (time distribution, t_min, c_noise scale) on the trigonometric path."""

    name = "trigflow"
    predictions = ("v", "x0")  # eps is undefined at t = 1, where alpha = 0

    def alpha_sigma(self, t):
        angle = t.double() * (math.pi / 2)
        return angle.cos(), angle.sin()

    def t_of_log_snr(self, lam):
        """cot(pi t / 2) = exp(lambda / 2), so t = (2 / pi) atan(exp(-lambda / 2))."""
        return torch.atan(torch.exp(-lam.double() / 2)) * (2 / math.pi)
