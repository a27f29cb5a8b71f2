"""The contract a network meets to be trained and sampled here, checked where it is built (``ddpm.builders.build_net``).

A backbone is an ``nn.Module`` with ``in_channels``, ``image_size``, ``num_classes`` (None: unconditional, labels
ignored) and ``null_label`` (the label classifier-free guidance's dropout writes, usually ``num_classes``), whose
``forward(x, c_noise, labels)`` maps images (B, in_channels, image_size, image_size), the process's noise input c_noise(t)
(the timestep index 0..T-1 for DDPM, a float in about the same range for the others) and class labels to one tensor
shaped like the images (``out_channels``, if it has one, equals ``in_channels``; twice it for a model that learns
its reverse variance, ``diffusion.variance=learned_range``, which builds it with ``out_channels=2 * in_channels``):
whatever the prediction target is, the network does not know. An objective that needs a
second time r (``second_time``: MeanFlow) builds the network with ``second_time=True``; it then takes
``c_noise_r=c_noise(r)`` by keyword (absent: r = t) and says ``second_time`` is true.
"""

from __future__ import annotations

import inspect

from ddpm.core.errors import ConfigError

ATTRIBUTES = ("in_channels", "image_size", "num_classes", "null_label")


def check_backbone(net: object, source: str = "model", second_time: bool = False, output_channels: int | None = None) -> None:
    """ConfigError naming what ``net`` lacks, if it does not meet the contract above; ``output_channels``: the
    outputs per data channel a denoiser reads (1, or 2 with a learned variance; None: not checked here)."""
    net = getattr(net, "_orig_mod", net)  # a torch.compile'd network: check the network it wraps
    missing = [name for name in ATTRIBUTES if not hasattr(net, name)]
    forward = getattr(net, "forward", None)
    if forward is None or len(inspect.signature(forward).parameters) < 3:
        missing.append("forward(x, c_noise, labels)")
    if second_time and not getattr(net, "second_time", False):
        missing.append("second_time (a second time r, by keyword c_noise_r)")
    if missing:
        raise ConfigError(f"{source}: {type(net).__name__} is not a backbone: it lacks {missing}. A network needs "
                          f"{list(ATTRIBUTES)} and forward(x, c_noise, labels) (ddpm/core/backbone.py)")
    out_channels = getattr(net, "out_channels", net.in_channels)
    if output_channels is not None and out_channels != output_channels * net.in_channels:
        if output_channels == 1:
            raise ConfigError(f"model: the network outputs {out_channels} channels for {net.in_channels} (a learned "
                              "variance's second half, DiT's learn_sigma): set diffusion.variance=learned_range to train "
                              "it, or model.learn_sigma=false")
        raise ConfigError(f"diffusion.variance=learned_range: the network outputs {out_channels} channels, and a learned "
                          f"variance needs {output_channels * net.in_channels} (twice data.channels): build it with "
                          f"out_channels={output_channels * net.in_channels}")
