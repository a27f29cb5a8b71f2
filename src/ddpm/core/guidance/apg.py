"""Adaptive projected guidance (Sadat et al. 2024, Algorithm 1): CFG's update with a momentum over the steps, a norm
cap, and its part parallel to the conditional prediction scaled down; x0 = x0_cond + w * update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ddpm.core.guidance.common import GuidanceMethod
from ddpm.core.settings import number, require


@dataclass(frozen=True)
class APG(GuidanceMethod):
    """Its settings are the defaults of the paper's code (conf/guidance/cfg.yaml, ``guidance.apg.*``)."""

    name: ClassVar[str] = "apg"
    order: ClassVar[int] = 1
    momentum: float = -0.75      # beta: each update is added to beta times the previous ones (negative: against them)
    norm_threshold: float = 2.5  # r: the update's norm per sample is capped at r (0: no cap)
    eta: float = 0.0             # weight of the update's part parallel to the conditional prediction (1: CFG's)

    def __post_init__(self) -> None:
        require(number(self.momentum) and -1 < self.momentum < 1, "guidance.apg.momentum", self.momentum,
                "in (-1, 1) (Sadat et al. use -0.75; 0: off)")
        require(number(self.norm_threshold) and self.norm_threshold >= 0, "guidance.apg.norm_threshold",
                self.norm_threshold, ">= 0 (0: no cap)")
        require(number(self.eta) and 0 <= self.eta <= 1, "guidance.apg.eta", self.eta,
                "in [0, 1] (0: orthogonal part only; 1: CFG's update)")

    def start(self) -> list:
        return []  # the running average of the updates, one entry

    def combine(self, w, cond, other, x, t, denoiser, state):
        x0_c, x0_u = cond[0], other[0]
        x0 = x0_c + w * apg_update(x0_c, x0_u, self, state)
        return x0, denoiser.eps_from_x0(x, t, x0)


def apg_update(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, settings: APG, history: list) -> torch.Tensor:
    """APG's guidance direction (Sadat et al. 2024, eq. 7-12): Delta = D_cond - D_uncond, plus beta times the running
    average kept in ``history`` (one entry, updated in place), capped at norm r, then split into its parts parallel and
    orthogonal to D_cond and recombined as Delta_orth + eta Delta_par. The guided prediction is D_cond + w * this."""
    delta = x0_cond - x0_uncond
    if settings.momentum != 0:
        if history:
            delta = delta + settings.momentum * history[0]
        history[:] = [delta]
    shape = (-1, *([1] * (delta.ndim - 1)))
    if settings.norm_threshold > 0:
        norm = delta.flatten(1).norm(dim=1).view(shape)
        delta = delta * (settings.norm_threshold / norm).clamp(max=1)  # a zero update (norm 0) is kept as it is
    d, c = delta.double(), x0_cond.double()
    unit = c / c.flatten(1).norm(dim=1).clamp(min=torch.finfo(torch.float64).tiny).view(shape)
    parallel = (d * unit).flatten(1).sum(1).view(shape) * unit
    return ((d - parallel) + settings.eta * parallel).to(delta.dtype)
