"""The denoising objective, the default: every process's diffusion loss in one form (Ho et al. 2020 Algorithm 1,
Lipman et al. 2023 eq. 23, Karras et al. 2022 eq. 2). Its settings are the denoiser's: the prediction target and the
weighting over noise levels (``diffusion.prediction``, ``diffusion.loss_weight``: ``ddpm/core/prediction.py``), and,
for a learned reverse variance (``diffusion.variance=learned_range``), the weight lambda of iDDPM's hybrid loss
(``diffusion.vlb_weight``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ddpm.core.denoiser import per_sample
from ddpm.core.likelihood import step_term
from ddpm.core.objectives import Objective, at_least_float32, mean_per_sample
from ddpm.core.prediction import loss_weight, network_target, to_x0_eps
from ddpm.core.variance import learned_range_log_variance


@dataclass(frozen=True)
class Denoising(Objective):
    """E_t,eps [ weight(t) ||F(alpha_t x_0 + sigma_t eps, t) - target(x_0, eps, t)||^2 / d ], t from the process;
    with a learned variance, iDDPM's L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, eq. 16)."""

    name: ClassVar[str] = "denoising"
    order: ClassVar[int] = 0
    learns_variance: ClassVar[bool] = True

    def __call__(self, denoiser, x0, labels=None, *, net=None, ema=None, step=0):
        t = denoiser.process.sample_t(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        return self.loss(denoiser, x0, labels, t, eps, net)

    def loss(self, denoiser, x0, labels, t, eps, net=None) -> torch.Tensor:
        alpha, sigma = denoiser.process.alpha_sigma(t)
        a, s = per_sample(alpha, x0), per_sample(sigma, x0)
        target = network_target(denoiser.prediction, x0, eps, a, s, denoiser.process.sigma_data)
        x_t = a * x0 + s * eps
        output, v = denoiser.output(x_t, t, labels, net, with_variance=True)
        error = mean_per_sample(output.float() - target.float())
        if denoiser.loss_weight == "uniform":
            simple = error.mean()
        else:
            weight = loss_weight(denoiser.loss_weight, denoiser.prediction, alpha, sigma, denoiser.min_snr_gamma,
                                 denoiser.process.sigma_data)
            simple = (weight.to(error) * error).mean()
        if v is None:
            return simple
        return simple + denoiser.vlb_weight * denoiser.process.num_timesteps * self.vlb_bits(denoiser, x0, x_t, t, a, s,
                                                                                           output, v).mean()

    @staticmethod
    def vlb_bits(denoiser, x0, x_t, t, a, s, output, v) -> torch.Tensor:
        """L_{t-1} per image in bits per dimension with the mean held fixed (stop-gradient on the prediction): iDDPM's
        L_vlb trains only the variance, L_simple the mean (their sec. 3.1). T L_t at a uniform t is an unbiased
        estimate of L_vlb = L_0 + ... + L_{T-1}, so lambda T L_t is their code's term (vb * T / 1000 at lambda = 0.001)."""
        x0, x_t, a, s = at_least_float32(x0), at_least_float32(x_t), at_least_float32(a), at_least_float32(s)
        x0_hat, _ = to_x0_eps(denoiser.prediction, at_least_float32(output.detach()), x_t, a, s, denoiser.process.sigma_data)
        log_variance = learned_range_log_variance(denoiser.process, at_least_float32(v), t)
        return step_term(denoiser.process, x0, x_t, t, x0_hat, log_variance) / (x0[0].numel() * math.log(2.0))
