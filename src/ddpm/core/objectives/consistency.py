"""Consistency training, the easy way: ECT (Geng et al. 2024, "Consistency Models Made Easy", sec. 3-4).

The network is read as a consistency function f(x_t, t) (``Denoiser(boundary=True)``: f(x, t_min) = x / alpha(t_min)
exactly, by the skip weight of ``ddpm.core.prediction.boundary_skip``) and trained so that two points of one noise
direction agree: L = E[ w(t, r) d(f(x_t, t), sg f(x_r, r)) ], x_t = x_0 + t eps and x_r = x_0 + r eps sharing eps,
d the pseudo-Huber distance sqrt(||.||^2 + c^2) - c, w = 1 / (t - r). Levels t, r are EDM's sigma (sigma / alpha on
any continuous process, which is x_t / alpha = x_0 + sigma eps), ln t ~ N(P_mean, P_std^2), and r is ECT's mapping
r = t (1 - q^-(stage + 1) n(t)), n(t) = 1 + k sigmoid(-b t), stage = step // stage_steps: at stage 0 (q = 2, k = 8,
b = 1) r is 0 below t = ln 7 (a denoising loss on x_0 there) and about t / 2 far above, then t - r halves every stage,
so training moves from diffusion towards consistency.
Where r reaches the least noisy level the target is x_0 itself. From scratch, or tuned from a denoising checkpoint of
the same network (``init_from=``; ECT's tuning)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddpm.core.denoiser import per_sample
from ddpm.core.objectives import Objective, at_least_float32
from ddpm.core.settings import integer, number, require


def time_of_level(process, level: torch.Tensor) -> torch.Tensor:
    """The process's time at EDM level sigma / alpha = ``level`` (log-SNR -2 ln level)."""
    return process.t_of_log_snr(-2 * level.double().log())


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||difference||^2 + c^2) - c per sample (Song & Dhariwal 2023, sec. 3.3); the L2 norm at c = 0."""
    squared = at_least_float32(difference).square().flatten(1).sum(1)
    return (squared + c**2).sqrt() - c


@dataclass(frozen=True)
class Consistency(Objective):
    """ECT's loss (module docstring); ``huber_c`` None: 0.00054 sqrt(d) (Song & Dhariwal's c for d dimensions)."""

    name: ClassVar[str] = "consistency"
    order: ClassVar[int] = 10
    boundary: ClassVar[bool] = True
    continuous_only: ClassVar[bool] = True
    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 2.0
    stage_steps: int = 250
    k: float = 8.0
    b: float = 1.0
    huber_c: float | None = None
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        require(number(self.P_mean), "objective.P_mean", self.P_mean, "a number (ECT: -1.1)")
        for key in ("P_std", "sigma_max", "b"):
            require(number(getattr(self, key)) and getattr(self, key) > 0, f"objective.{key}", getattr(self, key), "a number > 0")
        require(number(self.q) and self.q > 1, "objective.q", self.q, "a number > 1 (ECT: 2; t - r shrinks by q each stage)")
        require(number(self.k) and self.k >= 0, "objective.k", self.k, "a number >= 0 (ECT: 8)")
        require(integer(self.stage_steps) and self.stage_steps > 0, "objective.stage_steps", self.stage_steps,
                "an integer > 0 (optimizer steps per stage)")
        require(self.huber_c is None or (number(self.huber_c) and self.huber_c >= 0), "objective.huber_c", self.huber_c,
                "null (0.00054 sqrt(d)) or a number >= 0")

    def r_of(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """ECT's r(t) at optimizer step ``step``: t (1 - q^-(stage + 1) (1 + k sigmoid(-b t))), at least 0."""
        stage = step // self.stage_steps
        shrink = self.q ** -(stage + 1) * (1 + self.k * torch.sigmoid(-self.b * t))
        return (t * (1 - shrink)).clamp(min=0)

    def c_of(self, x0: torch.Tensor) -> float:
        return 0.00054 * math.sqrt(x0[0].numel()) if self.huber_c is None else float(self.huber_c)

    def __call__(self, denoiser, x0, labels=None, *, net=None, ema=None, step=0):
        level_min = self.level_min(denoiser.process)
        t = torch.exp(self.P_mean + self.P_std * torch.randn(x0.shape[0], device=x0.device, dtype=torch.float64))
        t = t.clamp(level_min, self.sigma_max)
        return self.loss(denoiser, x0, labels, t, self.r_of(t, step), torch.randn_like(x0), net)

    @staticmethod
    def level_min(process) -> float:
        alpha, sigma = process.alpha_sigma(torch.tensor([process.t_min], dtype=torch.float64))
        return (sigma / alpha).item()

    def loss(self, denoiser, x0, labels, t, r, eps, net=None) -> torch.Tensor:
        """E[ d(f(x_t, t), sg f(x_r, r)) / (t - r) ] at the given levels t > r (EDM sigmas) and shared noise eps."""
        process = denoiser.process
        f_t = self.f(denoiser, x0, eps, t, labels, net)
        above = r > self.level_min(process)
        with torch.no_grad():
            f_r = self.f(denoiser, x0, eps, torch.where(above, r, t), labels, net)
        target = torch.where(per_sample(above, x0).bool(), f_r, x0)
        return (pseudo_huber(f_t - target, self.c_of(x0)) / (t - r).to(f_t.dtype)).mean()

    @staticmethod
    def f(denoiser, x0, eps, level, labels, net):
        """f(x, t) at the process's time of EDM level ``level``, x = alpha (x_0 + level eps)."""
        time = time_of_level(denoiser.process, level)
        alpha, _ = denoiser.process.alpha_sigma(time)
        x = per_sample(alpha, x0) * (x0 + per_sample(level, x0) * eps)
        return denoiser(x, time.to(x0.device), labels, net=net)[0]
