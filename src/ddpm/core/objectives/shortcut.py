"""Shortcut models (Frans et al. 2025, "One Step Diffusion via Shortcut Models", sec. 3): one network conditioned on
the step size d learns to jump, and a jump of 2d is trained to equal two jumps of d (eq. 5).

In this project's terms the shortcut s(x_t, t, d) is the average velocity u(z_t, r = t - d, t) of MeanFlow's network
(time runs from data at 0 to noise at 1, so a jump is z_{t-d} = z_t - d u), so it shares MeanFlow's second time and
samplers (``sampler=meanflow``: ``steps`` jumps of d = 1 / steps). The loss (eq. 6), on one batch split in two:
    flow matching, d = 0:       ||u(z_t, t, t) - (eps - x_0)||^2                   t from the process (flow: logit-normal)
    self-consistency, d > 0:    ||u(z_t, t - 2h, t) - sg((u_1 + u_2) / 2)||^2      u_1 = u(z_t, t - h, t),
                                                                                   u_2 = u(z_t - h u_1, t - 2h, t - h)
with 2h = 2^-k, k uniform in {0, ..., log2 M}, t uniform on the grid of 2h (t - 2h >= 0), and the half step of the
smallest jump (2h = 1 / M) taken with d = 0, the flow velocity (their code). The targets come from the online network
(the default: on digits an EMA target trails the network and the large jumps stay unlearned at these budgets) or the
EMA one (``target_network=ema``, theirs), without gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddpm.core.denoiser import per_sample
from ddpm.core.objectives import Objective, mean_per_sample
from ddpm.core.settings import integer, number, one_of, require


@dataclass(frozen=True)
class Shortcut(Objective):
    """Shortcut models' loss (module docstring): ``base_steps`` M (the finest jump 1 / M, a power of 2),
    ``bootstrap_share`` (the share of each batch trained for self-consistency; theirs: 1/4)."""

    name: ClassVar[str] = "shortcut"
    order: ClassVar[int] = 30
    second_time: ClassVar[bool] = True
    continuous_only: ClassVar[bool] = True
    predictions: ClassVar[tuple[str, ...]] = ("velocity",)
    base_steps: int = 128
    bootstrap_share: float = 0.25
    target_network: str = "online"

    def __post_init__(self) -> None:
        require(integer(self.base_steps) and self.base_steps >= 2 and self.base_steps & (self.base_steps - 1) == 0,
                "objective.base_steps", self.base_steps, "a power of 2 >= 2 (Frans et al.: 128)")
        require(number(self.bootstrap_share) and 0 <= self.bootstrap_share <= 1, "objective.bootstrap_share",
                self.bootstrap_share, "a share in [0, 1] (Frans et al.: 0.25)")
        one_of("objective.target_network", self.target_network, ("ema", "online"))

    def draw_jumps(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, 2h) for the self-consistency samples: 2h = 2^-k, t a multiple of 2h in (0, 1]."""
        k = torch.randint(0, int(math.log2(self.base_steps)) + 1, (n,), device=device)
        jump = 2.0 ** -k.double()
        return torch.floor(torch.rand(n, device=device, dtype=torch.float64) * 2.0**k + 1) * jump, jump

    def __call__(self, denoiser, x0, labels=None, *, net=None, ema=None, step=0):
        n = x0.shape[0]
        bootstrap = round(n * self.bootstrap_share)
        t_flow = denoiser.process.sample_t(n - bootstrap, x0.device)
        t_jump, jump = self.draw_jumps(bootstrap, x0.device)
        target_net = ema if (self.target_network == "ema" and ema is not None) else net
        return self.loss(denoiser, x0, labels, torch.cat([t_flow, t_jump]), torch.cat([torch.zeros_like(t_flow), jump]),
                         torch.randn_like(x0), net, target_net)

    def loss(self, denoiser, x0, labels, t, jump, eps, net=None, target_net=None) -> torch.Tensor:
        """Mean squared error of u(z_t, t - jump, t) against eps - x_0 where jump = 0, against the two half jumps'
        mean where jump > 0."""
        process = denoiser.process
        alpha, sigma = process.alpha_sigma(t)
        z = per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * eps
        target = process.velocity(x0, eps, t)
        jumping = jump > 0
        if jumping.any():
            z_j, t_j, half = z[jumping], t[jumping], jump[jumping] / 2
            label_j = None if labels is None else labels[jumping]
            finest = jump[jumping] <= 1 / self.base_steps  # their half steps are the flow velocity (d = 0)
            with torch.no_grad():
                u_1 = denoiser.output(z_j, t_j, label_j, target_net, torch.where(finest, t_j, t_j - half))
                z_mid = z_j - per_sample(half, z_j) * u_1
                u_2 = denoiser.output(z_mid, t_j - half, label_j, target_net, torch.where(finest, t_j - half, t_j - 2 * half))
            target = target.clone()
            target[jumping] = ((u_1 + u_2) / 2).to(target.dtype)
        return mean_per_sample(denoiser.output(z, t, labels, net, t - jump) - target).mean()
