"""Samplers: one module each, one shared signature (after k-diffusion)::

    sample(model_fn, diffusion, noise, *, generator=None, callback=None, progress=False, **options) -> x_0

``model_fn(x_t, t) -> eps`` is the (possibly guided) network, ``t`` the timestep index 0..T-1;
``noise`` is x_T; ``generator`` draws any further noise, so a seeded generator makes the output
reproducible; ``callback(i, x_t, x0_pred)`` sees every step. Hydra builds them as partials
(``conf/sampler/*.yaml``), so the options live in config and the call site stays the same.
"""

from __future__ import annotations

import torch


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device so a seed gives the same
    numbers whatever device ``x`` lives on."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


X0_CLIPS = ("clip", "dynamic", "none")


def clip_x0(x0: torch.Tensor, mode: str = "clip", percentile: float = 0.995) -> torch.Tensor:
    """Keep the predicted x_0 in the data range [-1, 1]: ``clip`` clamps; ``dynamic`` is the dynamic
    thresholding of Saharia et al. 2022 (Imagen, sec. 2.3): s = max(1, percentile of |x_0| per sample),
    x_0 <- clamp(x_0, -s, s) / s; ``none`` leaves it alone."""
    if mode == "clip":
        return x0.clamp(-1, 1)
    if mode == "dynamic":
        s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1).to(x0.dtype)
        s = s.view(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s
    if mode == "none":
        return x0
    raise ValueError(f"sampler.x0_clip={mode!r}: must be one of {list(X0_CLIPS)}")
