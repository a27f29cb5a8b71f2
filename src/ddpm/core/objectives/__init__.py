"""Training objectives: one module each, one small class each, one shared call (after EDM's loss classes)::

    objective = MeanFlow(ratio_r_neq_t=0.25)            # its settings, checked as it is made (conf/objective/meanflow.yaml)
    loss = objective(denoiser, x0, labels, net=None, ema=None, step=0)

An objective is a frozen dataclass (``Objective``): its fields are its config keys, ``name`` its option in
``conf/objective/``, ``check(denoiser)`` refuses in one line a process or prediction target it has no meaning for.
``__call__`` draws what the paper draws (times, noise) and hands them to ``loss``, which is the paper's equation on
given inputs, so a test (or two DDP ranks) can hold the draws fixed. What an objective gets: the preconditioned model
(``ddpm/core/denoiser.py``: ``output`` is the raw network F, ``denoiser(x_t, t, labels, r=...)`` its (x_0, eps)), x_0
and labels (already dropped to the null label at ``p_uncond``), ``net`` (the same weights run differently, e.g.
torch.compile'd), ``ema`` (the EMA network, for objectives with a teacher or target network) and ``step`` (the
optimizer step, for schedules over training). What it tells the rest: ``second_time`` (the network also embeds a
second time r, built in and zero-initialised by the backbone), ``boundary`` (the denoiser is read as a consistency
function). A new objective is one module here and one YAML file in ``conf/objective/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ddpm.core.errors import ConfigError
from ddpm.core.settings import Registry, settings_of

OBJECTIVES = Registry("objective")


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it is (a loss is summed in float32 even when the network ran in bf16)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mean_per_sample(error: torch.Tensor) -> torch.Tensor:
    """||error||^2 / d for each sample of a batch, in float32 at least."""
    return at_least_float32(error).square().flatten(1).mean(1)


@dataclass(frozen=True)
class Objective:
    """A training objective (see the module docstring)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    second_time: ClassVar[bool] = False   # the network embeds a second time r (MeanFlow's average velocity u(z, r, t))
    boundary: ClassVar[bool] = False      # the denoiser is a consistency function f(x, t) with f(x, t_min) = x
    continuous_only: ClassVar[bool] = False
    predictions: ClassVar[tuple[str, ...] | None] = None  # the prediction targets it reads the network as; None: any
    learns_variance: ClassVar[bool] = False  # trains a learned reverse variance (diffusion.variance=learned_range)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            OBJECTIVES.add(cls)

    def settings(self) -> dict:
        return settings_of(self)

    def check(self, process, prediction: str) -> None:
        """ConfigError, one line naming both keys, for a process or prediction target this objective has no meaning for."""
        if self.continuous_only and process.discrete:
            raise ConfigError(f"objective={self.name} with process={process.name}: {self.name} draws continuous times "
                              "t and r, which the discrete process's T indices cannot hold; use process=edm, flow or "
                              "trigflow")
        if self.predictions is not None and not set(self.predictions) & set(process.predictions):
            raise ConfigError(f"objective={self.name} with process={process.name}: {self.name} reads the network as the "
                              f"{' or '.join(self.predictions)} target, which process={process.name} does not define (it "
                              f"allows {list(process.predictions)}); use process=flow")
        if self.predictions is not None and prediction not in self.predictions:
            raise ConfigError(f"objective={self.name} with diffusion.prediction={prediction}: {self.name} reads the "
                              f"network as {' or '.join(self.predictions)}; set diffusion.prediction={self.predictions[0]}")

    def check_variance(self, variance: str) -> None:
        """ConfigError, one line, for a learned reverse variance this objective does not train."""
        if variance == "learned_range" and not self.learns_variance:
            from ddpm.core.objectives import OBJECTIVES

            which = "|".join(name for name, option in OBJECTIVES.items() if option.learns_variance)
            raise ConfigError(f"diffusion.variance=learned_range with objective={self.name}: {self.name} does not train a "
                              f"variance (iDDPM's hybrid loss is objective={which}'s); set diffusion.variance=fixed_small")

    def __call__(self, denoiser, x0: torch.Tensor, labels: torch.Tensor | None = None, *, net: nn.Module | None = None,
                 ema: nn.Module | None = None, step: int = 0) -> torch.Tensor:
        raise NotImplementedError


def as_objective(objective) -> Objective:
    """An objective given by name (its default settings) or as an instance."""
    return objective if isinstance(objective, Objective) else OBJECTIVES.get_option(objective)()


OBJECTIVES.load(__name__)  # every objective module here registers its class
