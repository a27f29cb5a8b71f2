"""The preconditioned model: the one place between the network and everything else, for training and sampling.

``Denoiser.output`` feeds the network the process's preconditioned input (c_in x_t, c_noise(t), and c_noise(r) when a
second time r is asked for); ``__call__`` turns its raw output into (x_0, eps) by the prediction target's c_skip and
c_out (``ddpm/core/prediction.py``), and for a consistency model (``boundary=True``) into the consistency function
whose boundary condition holds exactly. Samplers and guidance see only a ``model_fn(x_t, t, **cond) -> (x_0, eps)``;
the training objectives (``ddpm/core/objectives``) call ``output`` and ``__call__``. A new prediction target is its
coefficient pair (target = a x_0 + b eps) in ``target_coefficients``, a new process one module in
``ddpm/core/processes``, a new objective one module in ``ddpm/core/objectives``.
"""

from __future__ import annotations

import torch
from torch import nn

from ddpm.core.backbone import check_backbone
from ddpm.core.errors import ConfigError
from ddpm.core.prediction import (boundary_skip, check_loss_weight, check_min_snr_gamma, check_prediction,
                                  check_terminal_snr, to_x0_eps)
from ddpm.core.processes import Process
from ddpm.core.settings import number, require
from ddpm.core.variance import check_variance


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) vector in the dtype and on the device of ``like``, shaped (B, 1, 1, ...) to broadcast over a batch."""
    return values.to(like.device).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class Denoiser:
    """A network of a given prediction target on a given process: ``denoiser(x_t, t, labels) -> (x_0, eps)``.

    A plain object holding references: the LightningModule owns ``net`` and ``process`` as submodules, and
    ``with_net`` gives the same denoiser over other weights (the EMA copy) without copying anything. ``boundary``: read
    the output as a consistency function (``boundary_skip``), as the consistency objectives train it. ``variance``: the
    reverse step's (``ddpm/core/variance.py``); with ``learned_range`` the network outputs twice the data's channels,
    the first half read by the prediction target, the second (v) the variance's interpolation (iDDPM eq. 15), trained
    with the hybrid loss's weight ``vlb_weight`` (lambda)."""

    def __init__(self, net: nn.Module, process: Process, prediction: str | None = None,
                 loss_weight: str = "uniform", min_snr_gamma: float = 5.0, boundary: bool = False,
                 variance: str = "fixed_small", vlb_weight: float = 0.001):
        check_variance(variance)
        require(number(vlb_weight) and vlb_weight >= 0, "diffusion.vlb_weight", vlb_weight, "a number >= 0 (iDDPM: 0.001)")
        if variance == "learned_range" and not process.discrete:
            raise ConfigError(f"diffusion.variance=learned_range with process={process.name}: a learned reverse variance "
                              "(iDDPM) is a step variance of the discrete process; use process=ddpm, or diffusion.variance="
                              "fixed_small (the continuous processes sample with their own ODE/SDE)")
        check_backbone(net, output_channels=2 if variance == "learned_range" else 1)
        prediction = process.predictions[0] if prediction is None else prediction
        check_prediction(prediction, process.predictions, process.name)
        if process.discrete:
            check_terminal_snr(prediction, float(process.alphas_cumprod[-1]))
        check_loss_weight(loss_weight)
        check_min_snr_gamma(min_snr_gamma)
        self.net, self.process, self.prediction = net, process, prediction
        self.loss_weight, self.min_snr_gamma, self.boundary = loss_weight, min_snr_gamma, boundary
        self.variance, self.vlb_weight = variance, vlb_weight

    @property
    def learns_variance(self) -> bool:
        return self.variance == "learned_range"

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same target, process and loss over other weights (e.g. the EMA copy of the network)."""
        return Denoiser(net, self.process, self.prediction, self.loss_weight, self.min_snr_gamma, self.boundary,
                        self.variance, self.vlb_weight)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t of the process, shaped to broadcast over ``like``."""
        alpha, sigma = self.process.alpha_sigma(t)
        return per_sample(alpha, like), per_sample(sigma, like)

    def output(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
               net: nn.Module | None = None, r: torch.Tensor | None = None, with_variance: bool = False):
        """The network's raw output F(c_in x_t, c_noise(t), labels[, c_noise(r)]): the one place the network is called.
        ``r``: a second time (MeanFlow's), given to the network by keyword only when asked for, so a denoising
        network is called exactly as before. The prediction target's channels; with ``with_variance=True`` the pair
        (F, v), v the learned variance's channels (None for a fixed variance)."""
        extra = {} if r is None else {"c_noise_r": self.process.c_noise(r)}
        raw = (self.net if net is None else net)(self.process.scale_input(x_t, t), self.process.c_noise(t), labels, **extra)
        v = None
        if self.learns_variance:
            raw, v = raw.chunk(2, dim=1)
        return (raw, v) if with_variance else raw

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                 r: torch.Tensor | None = None, net: nn.Module | None = None, with_variance: bool = False):
        """(x_0, eps) at x_t; with ``with_variance=True`` (x_0, eps, v), v the learned variance's output (None if fixed)."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        raw, v = self.output(x_t, t, labels, net, r, with_variance=True)
        x0, eps = to_x0_eps(self.prediction, raw, x_t, alpha, sigma, self.process.sigma_data)
        if not self.boundary:
            return (x0, eps, v) if with_variance else (x0, eps)
        # f(x, t) = b x / alpha + (1 - b) x_0, b = 1 exactly at t_min (Song et al. 2023, eq. 5's boundary condition)
        t_min = torch.full_like(t, self.process.t_min, dtype=torch.float64)
        b = per_sample(boundary_skip(*self.process.alpha_sigma(t.double()), *self.process.alpha_sigma(t_min),
                                     self.process.sigma_data), x_t)
        x0 = b * (x_t / alpha) + (1 - b) * x0
        eps = (x_t - alpha * x0) / sigma
        return (x0, eps, v) if with_variance else (x0, eps)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps consistent with ``x0`` at x_t (x_t = alpha x_0 + sigma eps)."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma
