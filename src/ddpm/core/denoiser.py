"""The one place between the network and everything else: it turns the network's raw output into (x_0, eps).

Samplers and guidance see only a ``model_fn(x_t, t) -> (x_0, eps)``; training sees ``Denoiser.loss``. A new
prediction target is one branch in ``ddpm/core/prediction.py``, nothing more.
"""

from __future__ import annotations

import torch
from torch import nn

from ddpm.core.backbone import check_backbone
from ddpm.core.diffusion import DDPMProcess, extract
from ddpm.core.prediction import check_min_snr_gamma, check_prediction, check_terminal_snr, loss_weight, to_x0_eps


class Denoiser:
    """A network of a given prediction target on a given process: ``denoiser(x_t, t, labels) -> (x_0, eps)``.

    A plain object holding references: the LightningModule owns ``net`` and ``process`` as submodules, and
    ``with_net`` gives the same denoiser over other weights (the EMA copy) without copying anything."""

    def __init__(self, net: nn.Module, process: DDPMProcess, prediction: str = "eps",
                 loss_weight: str = "uniform", min_snr_gamma: float = 5.0):
        check_backbone(net)
        check_prediction(prediction)
        check_terminal_snr(prediction, float(process.alphas_cumprod[-1]))
        _weight(loss_weight, prediction, min_snr_gamma)  # on a dummy SNR: a typo fails now, not at the first step
        self.net, self.process, self.prediction = net, process, prediction
        self.loss_weight, self.min_snr_gamma = loss_weight, min_snr_gamma

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same target, process and loss over other weights (e.g. the EMA copy of the network)."""
        return Denoiser(net, self.process, self.prediction, self.loss_weight, self.min_snr_gamma)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = sqrt(alpha_bar_t) and sigma_t = sqrt(1 - alpha_bar_t), shaped to broadcast over ``like``."""
        return extract(self.process.sqrt_alphas_cumprod, t, like), extract(self.process.sqrt_one_minus_alphas_cumprod, t, like)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = self.alpha_sigma(t, x_t)
        return to_x0_eps(self.prediction, self.net(x_t, t, labels), x_t, alpha, sigma)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps consistent with ``x0`` at x_t (x_t = alpha x_0 + sigma eps)."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma

    def loss(self, x0: torch.Tensor, labels: torch.Tensor | None = None, net: nn.Module | None = None) -> torch.Tensor:
        """The training loss (Ho et al. Algorithm 1, in this target and weighting): t ~ U{1..T}, eps ~ N(0, I),
        mean over the batch of weight(t) ||target - net(x_t, t)||^2 / d. ``net``: the same weights run differently
        (e.g. torch.compile'd); default ``self.net``."""
        return self.process.training_loss(self.net if net is None else net, x0, self.prediction,
                                            lambda snr: _weight(self.loss_weight, self.prediction, self.min_snr_gamma, snr),
                                            labels=labels)


def _weight(kind: str, prediction: str, gamma: float, snr: torch.Tensor | None = None) -> torch.Tensor:
    check_min_snr_gamma(gamma)
    return loss_weight(kind, prediction, torch.ones(1, dtype=torch.float64) if snr is None else snr, gamma)
