"""Consistency sampling (Song et al. 2023, Algorithm 1): x_0 = f(x_T, T), then for each further level re-noise
x = alpha x_0 + sigma z and denoise again; ``steps`` network evaluations, ``steps=1`` one-step generation.

The levels are EDM's sigma = sigma_t / alpha_t: ``sigma_max`` first (80, as consistency models are trained: the
objective's own ``sigma_max``), then ``sigmas`` when given (ECT's two-step sampler re-noises at 0.821), else the
karras spacing (rho) between sigma_max and the process's least noisy level, that level left out (where f is the
identity). The model is the denoiser read as a consistency function (``objective=consistency``); any denoiser can be
sampled so, as denoise-and-renoise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from tqdm.auto import tqdm

from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn, Sampler, clip_x0, functional, randn_like
from ddpm.core.settings import number, require


@dataclass(frozen=True)
class ConsistencySampler(Sampler):
    """Multistep consistency sampling (module docstring)."""

    name: ClassVar[str] = "consistency"
    steps: int = 1
    sigma_max: float = 80.0
    sigmas: tuple[float, ...] | None = field(default=None)
    rho: float = 7.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(number(self.sigma_max) and self.sigma_max > 0, "sampler.sigma_max", self.sigma_max, "a number > 0 (80)")
        require(number(self.rho) and self.rho > 0, "sampler.rho", self.rho, "a number > 0 (EDM: 7)")
        if self.sigmas is not None:
            sigmas = list(self.sigmas) if isinstance(self.sigmas, (list, tuple)) else None
            ok = (sigmas is not None and len(sigmas) == self.steps - 1 and all(number(s) and s > 0 for s in sigmas)
                  and all(a > b for a, b in zip([self.sigma_max, *sigmas], sigmas)))
            require(ok, "sampler.sigmas", self.sigmas, f"null or {self.steps - 1} EDM levels, decreasing, below "
                    f"sampler.sigma_max={self.sigma_max} (one per step after the first)")
            object.__setattr__(self, "sigmas", tuple(float(s) for s in sigmas))

    def check_process(self, process) -> None:
        super().check_process(process)
        if process.discrete:
            raise ConfigError(f"sampler={self.name} with process={process.name}: consistency sampling re-noises to "
                              "continuous levels; use process=edm, flow or trigflow")

    def level_times(self, process) -> torch.Tensor:
        """The process's times of the levels, noisiest first."""
        if self.sigmas is not None or self.steps == 1:
            levels = torch.tensor([self.sigma_max, *(self.sigmas or ())], dtype=torch.float64)
        else:
            alpha, sigma = process.alpha_sigma(torch.tensor([process.t_min], dtype=torch.float64))
            lo, hi = (sigma / alpha).item() ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
            ramp = torch.linspace(1, 0, self.steps + 1, dtype=torch.float64)[:-1]
            levels = (lo + ramp * (hi - lo)) ** self.rho
        times = process.t_of_log_snr(-2 * levels.log())
        if not torch.isfinite(times).all() or math.isnan(times.sum().item()):
            raise ConfigError(f"sampler.sigma_max={self.sigma_max}: outside process={process.name}'s levels")
        return times

    def __call__(self, model_fn: ModelFn, process, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
        times = self.level_times(process)
        alpha, sigma = process.alpha_sigma(times)
        x = noise * sigma[0].item()  # x_T: the data's share alpha x_0 is negligible at sigma_max
        x0 = x
        for i in tqdm(range(len(times)), total=len(times), disable=not progress, desc="consistency", leave=False):
            if i > 0:
                x = alpha[i].item() * x0 + sigma[i].item() * randn_like(x0, generator)
            x0, _ = model_fn(x, times[i].to(x.device).expand(x.shape[0]))
            x0 = clip_x0(x0, self.x0_clip, self.percentile)
            if callback is not None:
                callback(len(times) - 1 - i, x, x0)
        return x0


sample_consistency = functional(ConsistencySampler)
