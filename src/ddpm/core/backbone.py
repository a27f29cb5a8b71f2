"""The contract a network must meet to be trained and sampled here; ``check_backbone`` enforces it where it is built."""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from ddpm.core.errors import ConfigError

ATTRIBUTES = ("in_channels", "image_size", "num_classes", "null_label")


@runtime_checkable
class Backbone(Protocol):
    """A denoising network: images (B, in_channels, image_size, image_size), the process's noise input c_noise(t) (the
    timestep index 0..T-1 for DDPM, a float in about the same range for the others) and class labels in, one tensor shaped like the images out (whatever the prediction target is; the network does not know).
    ``num_classes`` is None for an unconditional network, which ignores labels; ``null_label`` is the label that
    classifier-free guidance's label dropout writes (usually ``num_classes``)."""

    in_channels: int
    image_size: int
    num_classes: int | None
    null_label: int | None

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor: ...


def check_backbone(net: object, source: str = "model") -> None:
    """ConfigError naming what ``net`` lacks, if it does not meet the ``Backbone`` contract."""
    net = getattr(net, "_orig_mod", net)  # a torch.compile'd network: check the network it wraps
    missing = [name for name in ATTRIBUTES if not hasattr(net, name)]
    forward = getattr(net, "forward", None)
    if forward is None or len(inspect.signature(forward).parameters) < 3:
        missing.append("forward(x, t, labels)")
    if missing:
        raise ConfigError(f"{source}: {type(net).__name__} is not a backbone: it lacks {missing}. A network needs "
                          f"{list(ATTRIBUTES)} and forward(x, t, labels) (ddpm/core/backbone.py)")
