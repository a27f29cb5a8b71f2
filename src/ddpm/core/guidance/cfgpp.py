"""CFG++ (Chung et al. 2024, Algorithm 1): DDIM from x0_uncond + lambda (x0_cond - x0_uncond), renoised with the
unconditional eps; lambda = ``guidance.scale`` in [0, 1], continuous (0: the unconditional model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ddpm.core.errors import ConfigError
from ddpm.core.guidance.common import GuidanceMethod


@dataclass(frozen=True)
class CFGPP(GuidanceMethod):
    name: ClassVar[str] = "cfgpp"
    order: ClassVar[int] = 2
    zero_is_conditional: ClassVar[bool] = False
    renoise_with_eps: ClassVar[bool] = True
    samplers: ClassVar[tuple[str, ...]] = ("ddim",)  # defined for the DDIM (Euler) update, at eta = 0

    def check_scale(self, scale: float) -> None:
        if scale > 1:
            raise ConfigError(f"guidance.scale={scale} with guidance.method=cfgpp: CFG++'s lambda must be in [0, 1], so "
                              "guidance.scale at most 1 with guidance.method=cfgpp (Chung et al. 2024)")

    def check_sampler(self, sampler: str, eta: float = 0.0) -> None:
        if sampler not in self.samplers or eta != 0:
            raise ConfigError(f"guidance.method=cfgpp with sampler={sampler}" + (f" (eta={eta})" if eta else "") +
                              f": CFG++ is defined for {list(self.samplers)} with sampler.eta=0 only (its renoising step): "
                              "cfgpp needs sampler=ddim sampler.eta=0")

    def combine(self, w, cond, other, x, t, denoiser, state):
        (x0_c, _), (x0_u, eps_u) = cond, other
        return x0_u + w * (x0_c - x0_u), eps_u
