"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, EDM, Algorithm 1; with ``S_churn`` > 0
the stochastic sampler of their Algorithm 2), on any process.

In EDM's coordinates x~ = x_t / alpha_t and sigma = sigma_t / alpha_t the ODE is dx~/dsigma = (x~ - D(x~; sigma)) / sigma,
with D the predicted x_0, so a model trained on any process is solved without retraining. Each step takes an Euler
step to the next level and corrects it with the slope there (2 evaluations); the last step, to sigma = 0, is Euler's
alone. An Euler step alone is exactly DDIM (eta = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from tqdm.auto import tqdm

from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn, SpacedSampler, clip_x0, functional, initial_x, levels, randn_like
from ddpm.core.settings import number, require


def noise_levels(steps: int) -> int:
    """How many noise levels a budget of ``steps`` model evaluations buys: N levels cost 2N - 1 evaluations."""
    return max(1, (steps + 1) // 2)


@dataclass(frozen=True)
class Heun(SpacedSampler):
    """At most ``steps`` model evaluations, as for the other samplers: N = (steps + 1) // 2 noise levels, 2N - 1
    evaluations (10 -> 9, 20 -> 19). The levels are the process's ``sampling_times`` chosen by ``spacing``
    (``karras``: EDM's rho = 7 spacing of sigma). Deterministic at S_churn = 0 (``generator`` unused); with churn,
    each level in [S_tmin, S_tmax] (in sigma) is first raised to sigma (1 + gamma), gamma = min(S_churn / N, sqrt 2 - 1),
    by fresh noise of scale S_noise (Algorithm 2, lines 4-6): that needs a continuous process.

    A step from sigma to sigma_next with sigma > ``euler_ratio`` sigma_next is Euler's alone, as the step from an
    infinite level is: the trapezoid's correction multiplies the difference of the two predictions by
    (sigma - sigma_next) / (2 sigma_next), so over a step that spans orders of magnitude (a start at half log-SNR -20
    with time spacing: sigma 4.9e8 to 19) it amplifies their error (by 1e7 on a Gaussian, where Euler's step is within
    1e-2; tests/test_processes.py). At EDM's own spacing each step spans a factor of about 2, so the default changes
    nothing there."""

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 3
    steps: int = 19
    spacing: str = "karras"
    lambda_min: float | None = -5.1
    S_churn: float = 0.0
    S_tmin: float = 0.0
    S_tmax: float = math.inf
    S_noise: float = 1.0
    euler_ratio: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(number(self.S_churn) and self.S_churn >= 0, "sampler.S_churn", self.S_churn,
                "a number >= 0 (0: the deterministic Algorithm 1)")
        real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)  # noqa: E731
        if not (real(self.S_tmin) and real(self.S_tmax) and 0 <= self.S_tmin <= self.S_tmax):
            raise ConfigError(f"sampler.S_tmin={self.S_tmin}, sampler.S_tmax={self.S_tmax}: must be numbers with "
                              "0 <= S_tmin <= S_tmax")
        require(number(self.S_noise) and self.S_noise > 0, "sampler.S_noise", self.S_noise, "a number > 0 (Karras et al.: 1.007)")
        require(real(self.euler_ratio) and self.euler_ratio > 1, "sampler.euler_ratio", self.euler_ratio,
                "a number > 1 (inf: Heun's correction on every step, as EDM)")

    def check_process(self, process) -> None:
        super().check_process(process)
        if self.S_churn and process.discrete:
            raise ConfigError(f"sampler.S_churn={self.S_churn} with process={process.name}: churn raises the noise "
                              "level between the discrete timesteps; use S_churn=0 or a continuous process (flow, edm, trigflow)")

    def __call__(self, model_fn: ModelFn, process, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
        S_tmin, S_tmax, S_noise, x0_clip, percentile = self.S_tmin, self.S_tmax, self.S_noise, self.x0_clip, self.percentile
        times, alpha_all, sigma_all = levels(process, noise, noise_levels(self.steps), self.spacing, self.lambda_min, self.rho)
        n = len(times)
        # noisiest first, then the clean end: alpha[i], sigma[i] (EDM's sigma = sigma_t / alpha_t), t[i] for i < n
        alpha = alpha_all.flip(0).tolist()
        sigma = [s / a if a > 0 else math.inf for a, s in zip(alpha, sigma_all.flip(0).tolist())]
        t = times.flip(0)
        gamma = min(self.S_churn / n, math.sqrt(2) - 1) if self.S_churn > 0 else 0.0

        def denoise(x_tilde: torch.Tensor, level: float, a: float, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(D, slope) at EDM noise level ``level`` (alpha ``a``, the process's ``time``); the model sees x_t = a x~."""
            finite = math.isfinite(level)
            x0, eps = model_fn(a * x_tilde if finite else x_tilde, time.expand(x_tilde.shape[0]))
            x0 = clip_x0(x0, x0_clip, percentile)
            return x0, (x_tilde - x0) / level if finite else eps

        # x~ = x_t / alpha_t; at alpha = 0 (zero terminal SNR, flow at t = 1) x~ is infinite, so the first step is taken in
        # x_t itself: from sigma = inf the only step is Euler's (= DDIM), x~_next = x0 + sigma_next eps, eps = x_T there.
        x_start = initial_x(process, noise, sigma_all[-1].item())
        x = x_start / alpha[0] if math.isfinite(sigma[0]) else x_start
        for i in tqdm(range(n), disable=not progress, desc="heun", leave=False):
            level, a, time = sigma[i], alpha[i], t[i]
            if gamma > 0 and S_tmin <= level <= S_tmax and math.isfinite(level):
                raised = level * (1 + gamma)
                x = x + math.sqrt(raised**2 - level**2) * S_noise * randn_like(x, generator)
                time = _time_of(process, raised)
                level, a, time = raised, float(process.alpha_sigma(time[None])[0]), time.to(t.device)
            x0, slope = denoise(x, level, a, time)
            if not math.isfinite(level):
                x = x0 + sigma[i + 1] * slope
            else:
                x_euler = x + (sigma[i + 1] - level) * slope
                if sigma[i + 1] > 0 and level <= self.euler_ratio * sigma[i + 1]:
                    _, slope_next = denoise(x_euler, sigma[i + 1], alpha[i + 1], t[i + 1])
                    x = x + (sigma[i + 1] - level) * 0.5 * (slope + slope_next)
                else:
                    x = x_euler  # the last step lands on the prediction x0; a step over orders of magnitude is Euler's
            if callback is not None:
                callback(n - 1 - i, x * alpha[i + 1], x0)
        return x


sample_heun = functional(Heun)


def _time_of(process, sigma_edm: float) -> torch.Tensor:
    """The process's time at EDM noise level sigma (lambda = -2 log sigma)."""
    return process.t_of_log_snr(torch.tensor([-2 * math.log(sigma_edm)], dtype=torch.float64))[0]
