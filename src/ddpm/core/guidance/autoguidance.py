"""Autoguidance (Karras et al. 2024, eq. 2): guiding with a weaker version of the model itself instead of the
unconditional branch: x0 = (1 + w) x0_main - w x0_guide, both conditional. The guide is given at sampling time
(``guidance.guide.*`` in ddpm.sample and ddpm.evaluate, or a loaded model from Python)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ddpm.core.denoiser import Denoiser
from ddpm.core.errors import ConfigError
from ddpm.core.guidance.common import GuidanceMethod


@dataclass(frozen=True)
class Autoguidance(GuidanceMethod):
    name: ClassVar[str] = "autoguidance"
    order: ClassVar[int] = 3
    unconditional: ClassVar[bool] = False  # its second prediction is the guide's, conditional: no label dropout needed

    def check_guide(self, denoiser: Denoiser, guide: Denoiser) -> None:
        check_guide(denoiser, guide)

    def combine(self, w, cond, other, x, t, denoiser, state):
        (x0_c, eps_c), (x0_g, eps_g) = cond, other
        return (1 + w) * x0_c - w * x0_g, (1 + w) * eps_c - w * eps_g


def check_guide(denoiser: Denoiser, guide: Denoiser) -> None:
    """Autoguidance's guide must be a model of the same data and process: ConfigError, one line, naming what differs."""
    mine, theirs = denoiser.net, guide.net
    for name in ("in_channels", "image_size", "num_classes"):
        if getattr(mine, name, None) != getattr(theirs, name, None):
            raise ConfigError(f"guidance.guide: its {name} is {getattr(theirs, name, None)}, the model's "
                              f"{getattr(mine, name, None)}: a guide must be a model of the same data")
    if not denoiser.process.same_path(guide.process):
        raise ConfigError(f"guidance.guide: its process ({guide.process.name}, {guide.process.path_settings()}) differs from "
                          f"the model's ({denoiser.process.name}, {denoiser.process.path_settings()}; for ddpm: its schedule): "
                          "a guide must share it")
