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
