"""Classifier-free guidance (Ho & Salimans 2022, eq. 6): x0 = (1 + w) x0_cond - w x0_uncond, the same for eps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ddpm.core.guidance.common import GuidanceMethod


@dataclass(frozen=True)
class CFG(GuidanceMethod):
    name: ClassVar[str] = "cfg"
    order: ClassVar[int] = 0

    def combine(self, w, cond, other, x, t, denoiser, state):
        (x0_c, eps_c), (x0_u, eps_u) = cond, other
        return (1 + w) * x0_c - w * x0_u, (1 + w) * eps_c - w * eps_u
