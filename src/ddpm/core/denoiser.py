"""The one place between the network and everything else: the one call of the network, for training and sampling.

``Denoiser.output`` feeds the network the process's preconditioned input (c_in x_t, c_noise(t)); ``__call__`` turns
its raw output into (x_0, eps) for the samplers and guidance, which see only a ``model_fn(x_t, t) -> (x_0, eps)``;
``loss`` is the training objective. A new prediction target is its coefficient pair (target = a x_0 + b eps) in
``ddpm/core/prediction.py``'s ``target_coefficients``, a new process one module in ``ddpm/core/processes``.
"""

from __future__ import annotations

import torch
from torch import nn

from ddpm.core.backbone import check_backbone
from ddpm.core.prediction import (check_loss_weight, check_min_snr_gamma, check_prediction, check_terminal_snr, loss_weight,
                                  network_target, to_x0_eps)
from ddpm.core.processes import Process


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) vector in the dtype and on the device of ``like``, shaped (B, 1, 1, ...) to broadcast over a batch."""
    return values.to(like.device).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class Denoiser:
    """A network of a given prediction target on a given process: ``denoiser(x_t, t, labels) -> (x_0, eps)``.

    A plain object holding references: the LightningModule owns ``net`` and ``process`` as submodules, and
    ``with_net`` gives the same denoiser over other weights (the EMA copy) without copying anything."""

    def __init__(self, net: nn.Module, process: Process, prediction: str | None = None,
                 loss_weight: str = "uniform", min_snr_gamma: float = 5.0):
        check_backbone(net)
        prediction = process.predictions[0] if prediction is None else prediction
        check_prediction(prediction, process.predictions, process.name)
        if process.discrete:
            check_terminal_snr(prediction, float(process.alphas_cumprod[-1]))
        check_loss_weight(loss_weight)
        check_min_snr_gamma(min_snr_gamma)
        self.net, self.process, self.prediction = net, process, prediction
        self.loss_weight, self.min_snr_gamma = loss_weight, min_snr_gamma

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same target, process and loss over other weights (e.g. the EMA copy of the network)."""
        return Denoiser(net, self.process, self.prediction, self.loss_weight, self.min_snr_gamma)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t of the process, shaped to broadcast over ``like``."""
        alpha, sigma = self.process.alpha_sigma(t)
        return per_sample(alpha, like), per_sample(sigma, like)

    def output(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
               net: nn.Module | None = None) -> torch.Tensor:
        """The network's raw output F(c_in x_t, c_noise(t), labels): the one place the network is called."""
        return (self.net if net is None else net)(self.process.scale_input(x_t, t), self.process.c_noise(t), labels)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return to_x0_eps(self.prediction, self.output(x_t, t, labels), x_t, alpha, sigma, self.process.sigma_data)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps consistent with ``x0`` at x_t (x_t = alpha x_0 + sigma eps)."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None = None, net: nn.Module | None = None) -> torch.Tensor:
        """The training loss, one form for every process (Ho et al. Algorithm 1, Lipman et al. eq. 23, Karras et al.
        eq. 2 with their lambda as ``diffusion.loss_weight=edm``): t from the process's distribution, eps ~ N(0, I),
        x_t = alpha_t x_0 + sigma_t eps, and the mean over the batch of weight(t) ||target - F||^2 / d. ``net``: the same
        weights run differently (e.g. torch.compile'd); default ``self.net``."""
        t = self.process.sample_t(x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        alpha, sigma = self.process.alpha_sigma(t)
        a, s = per_sample(alpha, x0), per_sample(sigma, x0)
        target = network_target(self.prediction, x0, eps, a, s, self.process.sigma_data)
        error = (self.output(a * x0 + s * eps, t, labels, net).float() - target.float()).square().flatten(1).mean(1)
        if self.loss_weight == "uniform":
            return error.mean()
        weight = loss_weight(self.loss_weight, self.prediction, alpha, sigma, self.min_snr_gamma, self.process.sigma_data)
        return (weight.to(error) * error).mean()
