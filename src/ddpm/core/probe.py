"""A dry run of sampling before any compute: the configured sampler walks the configured process end to end on a
probe network, so a setting that gives a non-finite level, network input or step is refused in one line at start
rather than found as a black image after hours (``sampler.rho=1e-300`` with EDM overflows its spacing,
``process.c_noise_scale=1e308`` makes the noise input infinite, ``sampler.S_noise=1e308`` the churn).

The probe network stands in for any backbone: it checks that its inputs are finite and returns a smooth function of
them, so every target conversion, guidance method and sampler step runs on finite numbers exactly as it would with a
trained network. It costs one tiny forward per step (a 1 x 8 x 8 image): milliseconds.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable

import torch
from torch import nn

from ddpm.core.errors import ConfigError
from ddpm.core.samplers import as_sampler, sampler_name
from ddpm.core.settings import differing


class NonFiniteInput(ArithmeticError):
    """What the probe network saw (or the sampler made) that is not finite."""


class ProbeNet(nn.Module):
    """A stand-in backbone: ``forward(x, t, labels)`` raises NonFiniteInput on a non-finite image or noise input,
    else returns tanh(x) + 0.1 cos(t): bounded, and varying with both (so guidance's differences and rescaling see
    something to work on)."""

    second_time = True  # takes a second time r too (MeanFlow's samplers), checked like the first

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int | None = 10):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes

    @property
    def null_label(self) -> int | None:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                c_noise_r: torch.Tensor | None = None) -> torch.Tensor:
        if c_noise_r is not None and not torch.isfinite(c_noise_r.float()).all():
            raise NonFiniteInput("the network's second noise input c_noise(r) is beyond float32")
        if not torch.isfinite(t.float()).all():  # a network embeds its noise input in float32 (or lower)
            raise NonFiniteInput(f"the network's noise input c_noise(t) is {t[~torch.isfinite(t.float())][0].item():.4g} "
                                 "(beyond float32)")
        if not torch.isfinite(x).all():
            raise NonFiniteInput("the network's input image c_in x_t is not finite")
        shift = 0.1 * torch.cos(t.double()).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        if labels is not None:
            shift = shift + 0.01 * labels.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x) + shift


def dry_run(sampler: Callable, process, prediction: str, *, guidance=None, what: str = "sampler",
            num_classes: int | None = 10, sigma_data: float | None = None, boundary: bool = False) -> None:
    """Sample two 1 x 8 x 8 images with ``sampler`` on ``process`` through a probe network of target ``prediction`` (and
    ``guidance``, a ``ddpm.core.guidance.Guidance``, when given; ``boundary``: read as a consistency function): ConfigError, one line naming ``what`` and the
    sampler's and process's settings, when a level, a network input or the result is not finite."""
    from ddpm.core.denoiser import Denoiser
    from ddpm.core.guidance import Guidance

    net = ProbeNet(1, 8, num_classes)
    denoiser = Denoiser(net, process, prediction, boundary=boundary)
    guidance = guidance if guidance is not None else Guidance()
    if not guidance.method.unconditional:  # a guide of its own (autoguidance): a probe too
        guidance = replace(guidance, guide=Denoiser(ProbeNet(1, 8, num_classes), process, prediction, boundary=boundary))
    labels = torch.tensor([0, 1]) if num_classes else None
    model_fn = guidance.model_fn(denoiser, labels)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((2, 1, 8, 8), generator=generator)
    option = as_sampler(sampler)
    where = (f"{what}: sampler={sampler_name(sampler)}{_settings(differing(option) if option is not None else {})} on "
             f"process={process.name}{_settings(differing(process))}")
    try:
        with torch.no_grad():
            out = sampler(model_fn, process, noise, generator=generator)
    except NonFiniteInput as error:
        raise ConfigError(f"{where}: {error} at some level; these settings cannot sample") from None
    except (OverflowError, ZeroDivisionError, ValueError, RuntimeError) as error:
        if isinstance(error, ConfigError):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise ConfigError(f"{where}: its levels cannot be computed ({type(error).__name__}: {reason}); these settings "
                          "cannot sample") from None
    if not torch.isfinite(out).all():
        raise ConfigError(f"{where}: the sampler's steps give non-finite images with these settings (a level, a step "
                          "size or its noise overflows)")


def _settings(settings: dict) -> str:
    """``(key=value, ...)``, or nothing for no settings."""
    shown = {k: v for k, v in settings.items() if not callable(v)}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""
