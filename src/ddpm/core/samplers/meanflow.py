"""MeanFlow sampling (Geng et al. 2025, Algorithm 2): z_r = z_t - (t - r) u(z_t, r, t) over ``steps`` intervals of
equal length from t = 1 to 0; one network evaluation per step, so ``steps=1`` is one-step generation. Every objective
whose network takes a second time samples so (meanflow; shortcut, whose jump of d is u(z, t - d, t)).

The network's average velocity u is read through the denoiser as a velocity at (z_t, t), whose (x_0, eps) are
x_0 = z_t - t u and eps = z_t + (1 - t) u on the flow path; DDIM's deterministic step to r, alpha_r x_0 + sigma_r eps,
is then exactly z_t - (t - r) u, so guidance (which combines (x_0, eps) linearly, as CFG does u) applies unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from tqdm.auto import tqdm

from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn, Sampler, clip_x0, functional, initial_x, levels


@dataclass(frozen=True)
class MeanFlowSampler(Sampler):
    """``steps`` jumps of MeanFlow's average velocity, evenly in time (t_i = i / steps). ``x0_clip``: none by default,
    since clipping the x_0 of a jump changes the jump."""

    name: ClassVar[str] = "meanflow"
    second_time: ClassVar[bool] = True
    steps: int = 1
    x0_clip: str = "none"

    def check_process(self, process) -> None:
        super().check_process(process)
        if process.discrete:
            raise ConfigError(f"sampler={self.name} with process={process.name}: MeanFlow jumps between continuous "
                              "times; use process=flow")

    def __call__(self, model_fn: ModelFn, process, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
        times, alpha, sigma = levels(process, noise, self.steps, "time")
        x = initial_x(process, noise, sigma[-1].item())
        for i in tqdm(reversed(range(len(times))), total=len(times), disable=not progress, desc="meanflow", leave=False):
            t = times[i].expand(x.shape[0])
            r = (times[i - 1] if i > 0 else torch.zeros_like(times[i])).expand(x.shape[0])
            x0, eps = model_fn(x, t, r=r)
            x0 = clip_x0(x0, self.x0_clip, self.percentile)
            x = (alpha[i].to(x) * x0 + sigma[i].to(x) * eps) if i > 0 else x0
            if callback is not None:
                callback(i, x, x0)
        return x


sample_meanflow = functional(MeanFlowSampler)
