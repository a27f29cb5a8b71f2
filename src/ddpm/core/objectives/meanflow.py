"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the network learns the average velocity
u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds, so that one step z_r = z_t - (t - r) u jumps from t to r.

Training uses the MeanFlow identity (eq. 6) u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t), with the total
derivative d/dt u = v d_z u + d_t u taken as one Jacobian-vector product (eq. 8, ``torch.func.jvp`` with tangent
(v, 1, 0) over (z, t, r)), the conditional velocity v = alpha'(t) x_0 + sigma'(t) eps of the path (``Process.velocity``)
and a stop-gradient on the target (eq. 9): L = sg(w) ||u - sg(u_tgt)||^2, w = 1 / (||u - u_tgt||^2 + c)^p the adaptive
weight (sec. 4.3, sums over pixels as in the paper). (t, r) are two draws of ``time_distribution`` sorted, with r = t
for a share 1 - ``ratio_r_neq_t`` (sec. 4.3: then the loss is flow matching's). ``guidance_omega`` != 1 folds
classifier-free guidance into the target (sec. 4.2, eq. 13-16): v~ = omega v + (1 - omega) u(z_t, t, t | null) for
the samples that kept their label, so one step samples the guided model with no second network evaluation.

The network receives r as a second time (``second_time``: the backbone embeds c_noise(t) - c_noise(r), zero at
r = t, through a zero-initialised layer). The target is computed without gradient (one JVP, about two forward passes),
then u by a plain forward pass through the training network: the gradient flows through an ordinary autograd graph,
so DDP's gradient synchronisation sees every parameter, as for any loss (tests/test_objectives.py checks two ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm.core.denoiser import per_sample
from ddpm.core.objectives import Objective, at_least_float32
from ddpm.core.processes import TIME_DISTRIBUTIONS, draw_time
from ddpm.core.settings import number, one_of, require


@dataclass(frozen=True)
class MeanFlow(Objective):
    """MeanFlow's loss (module docstring); its defaults are the paper's best ImageNet settings (Table 1)."""

    name: ClassVar[str] = "meanflow"
    order: ClassVar[int] = 20
    second_time: ClassVar[bool] = True
    continuous_only: ClassVar[bool] = True
    predictions: ClassVar[tuple[str, ...]] = ("velocity",)
    ratio_r_neq_t: float = 0.25
    time_distribution: str = "logit_normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    guidance_omega: float = 1.0

    def __post_init__(self) -> None:
        require(number(self.ratio_r_neq_t) and 0 <= self.ratio_r_neq_t <= 1, "objective.ratio_r_neq_t",
                self.ratio_r_neq_t, "a share in [0, 1] (MeanFlow: 0.25)")
        one_of("objective.time_distribution", self.time_distribution, TIME_DISTRIBUTIONS)
        require(number(self.logit_mean), "objective.logit_mean", self.logit_mean, "a number (MeanFlow: -0.4)")
        require(number(self.logit_std) and self.logit_std > 0, "objective.logit_std", self.logit_std, "a number > 0")
        require(number(self.adaptive_p) and self.adaptive_p >= 0, "objective.adaptive_p", self.adaptive_p,
                "a number >= 0 (0: plain squared error; MeanFlow: 1)")
        require(number(self.adaptive_c) and self.adaptive_c > 0, "objective.adaptive_c", self.adaptive_c, "a number > 0")
        require(number(self.guidance_omega) and self.guidance_omega >= 1, "objective.guidance_omega",
                self.guidance_omega, "a number >= 1 (1: no guidance in the target; MeanFlow: 2 to 3)")

    def draw_times(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), t >= r: two draws sorted, then r = t for a share 1 - ratio_r_neq_t."""
        pair = draw_time(self.time_distribution, 2 * n, device, self.logit_mean, self.logit_std).view(2, n)
        t, r = pair.max(0).values, pair.min(0).values
        same = torch.rand(n, device=device) >= self.ratio_r_neq_t
        return t, torch.where(same, t, r)

    def __call__(self, denoiser, x0, labels=None, *, net=None, ema=None, step=0):
        t, r = self.draw_times(x0.shape[0], x0.device)
        return self.loss(denoiser, x0, labels, t, r, torch.randn_like(x0), net)

    def target(self, denoiser, z, v, t, r, labels, net=None) -> torch.Tensor:
        """u_tgt = v - (t - r) (v d_z u + d_t u), without gradient (eq. 8-9)."""
        def u(z, t, r):
            return denoiser.output(z, t, labels, net, r)

        # SDPA's fused CPU kernel has no forward-mode derivative; its math backend (the same formula) does
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, du_dt = torch.func.jvp(u, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        return v - per_sample(t - r, z) * du_dt

    def loss(self, denoiser, x0, labels, t, r, eps, net=None) -> torch.Tensor:
        process = denoiser.process
        alpha, sigma = process.alpha_sigma(t)
        z = per_sample(alpha, x0) * x0 + per_sample(sigma, x0) * eps
        v = process.velocity(x0, eps, t)
        if self.guidance_omega != 1 and labels is not None:
            v = self.guided_velocity(denoiser, z, v, t, labels, net)
        u_tgt = self.target(denoiser, z, v, t, r, labels, net)
        squared = at_least_float32(denoiser.output(z, t, labels, net, r) - u_tgt).square().flatten(1).sum(1)
        weight = (squared.detach() + self.adaptive_c) ** -self.adaptive_p
        return (weight * squared).mean()

    def guided_velocity(self, denoiser, z, v, t, labels, net=None) -> torch.Tensor:
        """omega v + (1 - omega) u(z_t, t, t | null) where the label was kept; v where it was dropped (eq. 16)."""
        null = getattr(denoiser.net, "null_label", None)
        with torch.no_grad():
            unconditional = denoiser.output(z, t, torch.full_like(labels, null), net, t).to(v.dtype)
        kept = per_sample(labels != null, v).bool()
        return torch.where(kept, self.guidance_omega * v + (1 - self.guidance_omega) * unconditional, v)
