"""The denoising objective, the default: every process's diffusion loss in one form (Ho et al. 2020 Algorithm 1,
Lipman et al. 2023 eq. 23, Karras et al. 2022 eq. 2). Its settings are the denoiser's: the prediction target and the
weighting over noise levels (``diffusion.prediction``, ``diffusion.loss_weight``: ``ddpm/core/prediction.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddpm.core.denoiser import per_sample
from ddpm.core.objectives import Objective, mean_per_sample
from ddpm.core.prediction import loss_weight, network_target


@dataclass(frozen=True)
class Denoising(Objective):
    """E_t,eps [ weight(t) ||F(alpha_t x_0 + sigma_t eps, t) - target(x_0, eps, t)||^2 / d ], t from the process."""

    name: ClassVar[str] = "denoising"
    order: ClassVar[int] = 0

    def __call__(self, denoiser, x0, labels=None, *, net=None, ema=None, step=0):
        t = denoiser.process.sample_t(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        return self.loss(denoiser, x0, labels, t, eps, net)

    def loss(self, denoiser, x0, labels, t, eps, net=None) -> torch.Tensor:
        alpha, sigma = denoiser.process.alpha_sigma(t)
        a, s = per_sample(alpha, x0), per_sample(sigma, x0)
        target = network_target(denoiser.prediction, x0, eps, a, s, denoiser.process.sigma_data)
        error = mean_per_sample(denoiser.output(a * x0 + s * eps, t, labels, net).float() - target.float())
        if denoiser.loss_weight == "uniform":
            return error.mean()
        weight = loss_weight(denoiser.loss_weight, denoiser.prediction, alpha, sigma, denoiser.min_snr_gamma,
                             denoiser.process.sigma_data)
        return (weight.to(error) * error).mean()
