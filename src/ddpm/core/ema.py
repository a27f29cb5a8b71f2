"""Exponential moving averages of the weights: the classic constant-decay EMA and the power-function EMA of
Karras et al. 2024 (EDM2, sec. 3 and appendix C), whose length can be chosen after training.

A power-function EMA with exponent gamma averages the weights of steps tau <= t with a profile proportional to
tau^gamma; its width relative to the run, ``sigma_rel`` (the std of that profile over t), is the knob:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
It is updated as theta_ema <- beta_t theta_ema + (1 - beta_t) theta with beta_t = (1 - 1/t)^(gamma + 1), t = 1, 2, ...
Storing snapshots of two such EMAs every N steps lets ``posthoc_coefficients`` rebuild any other sigma_rel by least
squares: the EMA's profile at time t is a linear combination of the snapshots' profiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ddpm.core.settings import integer, number, one_of, require


def ema_warmup_decay(decay: float, step: int) -> float:
    """The classic EMA's decay at update ``step`` (1, 2, ...) with the usual warm-up, min(decay, (1 + t)/(10 + t))
    (diffusers' EMAModel, after TensorFlow's ExponentialMovingAverage num_updates): early averages forget their
    random initial weights fast, so a short run with decay 0.999 does not sample mostly from them."""
    return min(decay, (1 + step) / (10 + step))


MAX_SIGMA_REL = 12 ** -0.5  # the width of gamma = 0 (a uniform average over the run): a power EMA is narrower
SNAPSHOT_DTYPES = ("float32", "float16", "bfloat16")  # ema.snapshot_dtype: how snapshots are stored


def valid_sigma_rel(value) -> bool:
    return number(value) and 0 < value < MAX_SIGMA_REL


@dataclass(frozen=True)
class EMASettings:
    """The ``ema`` node of a training run (train.yaml says what each key does): the classic EMA's ``decay`` (and its
    ``warmup``), the power EMAs tracked (``sigma_rels``) and their snapshots (``snapshot_count`` per run, or
    ``snapshot_every`` N steps, stored in ``snapshot_dtype``). Checked as it is made."""

    decay: float = 0.995
    warmup: bool = False
    sigma_rels: tuple = (0.05, 0.10)
    snapshot_count: int = 40
    snapshot_every: int | None = None
    snapshot_dtype: str = "float16"

    def __post_init__(self) -> None:
        require(number(self.decay) and 0 <= self.decay < 1, "ema.decay", self.decay, "a number in [0, 1)")
        require(isinstance(self.warmup, bool), "ema.warmup", self.warmup, "true or false")
        require(isinstance(self.sigma_rels, (list, tuple)) and all(valid_sigma_rel(s) for s in self.sigma_rels), "ema.sigma_rels",
                self.sigma_rels, f"a list of relative EMA widths in (0, {MAX_SIGMA_REL:.4f}), e.g. [0.05, 0.10] (Karras et al. 2024), or []")
        require(integer(self.snapshot_count) and self.snapshot_count >= 0, "ema.snapshot_count", self.snapshot_count,
                "an integer >= 0 (snapshots per run; 0: none)")
        require(self.snapshot_every is None or (integer(self.snapshot_every) and self.snapshot_every >= 0), "ema.snapshot_every",
                self.snapshot_every, "null (from ema.snapshot_count) or an integer >= 0 (0: no snapshots)")
        one_of("ema.snapshot_dtype", self.snapshot_dtype, SNAPSHOT_DTYPES)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power-function EMA of relative width ``sigma_rel`` (EDM2 eq. 3 solved for gamma: the
    largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"ema.sigma_rel={sigma_rel}: must be in (0, {MAX_SIGMA_REL:.4f})")
    t = sigma_rel ** -2
    roots = torch.linalg.eigvals(torch.tensor([[-7.0, -(16 - t), -(12 - t)], [1, 0, 0], [0, 1, 0]], dtype=torch.float64))
    return max(r.real.item() for r in roots if abs(r.imag.item()) < 1e-9)


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_ema_beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) for update t = 1, 2, ... (beta_1 = 0: the first average is the weights)."""
    return (1 - 1 / step) ** (gamma + 1)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b) -> torch.Tensor:
    """<p_a, p_b> for the normalised power profiles p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]:
    (gamma_a + 1)(gamma_b + 1) min(t_a, t_b)^(gamma_a + gamma_b + 1) / ((gamma_a + gamma_b + 1) t_a^(gamma_a + 1) t_b^(gamma_b + 1)),
    written with the ratio of the times so it stays finite for large t. Broadcasts."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    low, high = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    exponent = torch.where(t_a < t_b, gamma_b, gamma_a)  # the later profile's gamma
    return (gamma_a + 1) * (gamma_b + 1) * (low / high) ** exponent / ((gamma_a + gamma_b + 1) * high)


def posthoc_coefficients(snapshot_steps, snapshot_gammas, step: int, gamma: float) -> torch.Tensor:
    """Least-squares weights x (one per snapshot) with sum_i x_i p_i closest in L2 to the profile of a gamma-EMA at
    ``step`` (EDM2 appendix C.3): solve <p_i, p_j> x = <p_i, p_target>."""
    steps = torch.as_tensor(snapshot_steps, dtype=torch.float64)
    gammas = torch.as_tensor(snapshot_gammas, dtype=torch.float64)
    gram = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = profile_inner_product(steps, gammas, torch.tensor(float(step)), torch.tensor(float(gamma)))
    return torch.linalg.lstsq(gram, target[:, None]).solution[:, 0]


def profile_fit_error(snapshot_steps, snapshot_gammas, step: int, gamma: float, coefficients: torch.Tensor) -> float:
    """How well the snapshots' profiles rebuild the target's: ||sum_i x_i p_i - p||_2 / ||p||_2. It shrinks as
    snapshots get denser (EDM2 keeps many); measured on digits, a fit error of 4-6% left the rebuilt weights 11-14%
    (of the EMA's distance from the raw weights) away from a directly tracked EMA, and one of 1% left 0.13%."""
    steps = torch.as_tensor(snapshot_steps, dtype=torch.float64)
    gammas = torch.as_tensor(snapshot_gammas, dtype=torch.float64)
    gram = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = profile_inner_product(steps, gammas, torch.tensor(float(step)), torch.tensor(float(gamma)))
    norm = profile_inner_product(float(step), gamma, float(step), gamma)
    squared = (norm - 2 * coefficients @ target + coefficients @ gram @ coefficients) / norm
    return float(squared.clamp(min=0).sqrt())


def combine(state_dicts: list[dict[str, torch.Tensor]], coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_i x_i state_i for the floating-point entries (in float64, then float32, or the states' dtype if wider: states
    stored in 16 bits give float32 weights); others from the last state."""
    out = {}
    for key, last in state_dicts[-1].items():
        if last.is_floating_point():
            total = sum(float(x) * sd[key].double() for x, sd in zip(coefficients, state_dicts))
            out[key] = total.to(torch.promote_types(last.dtype, torch.float32))
        else:
            out[key] = last.clone()
    return out


@torch.no_grad()
def lerp_weights_(average: nn.Module, net: nn.Module, weight: float) -> None:
    """average <- average + weight (net - average), parameters and buffers, in one foreach op per dtype (every EMA
    here updates through this: the classic one with weight 1 - decay, each power EMA with 1 - beta_t). Integer
    buffers (BatchNorm's counters, say) follow the network."""
    averaged, current = [*average.parameters(), *average.buffers()], [*net.parameters(), *net.buffers()]
    floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
    for a, c in zip(averaged, current):
        if not a.is_floating_point():
            a.copy_(c)


class PowerEMA(nn.Module):
    """Power-function EMAs of ``net``'s weights, one copy per ``sigma_rel``; ``update(net, step)`` after each optimizer
    step t = 1, 2, .... Buffers (e.g. normalisation statistics) are averaged too. Saved with the module's state."""

    def __init__(self, net: nn.Module, sigma_rels: list[float]):
        super().__init__()
        import copy

        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.averages = nn.ModuleList(copy.deepcopy(net).requires_grad_(False) for _ in self.sigma_rels)

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        for average, gamma in zip(self.averages, self.gammas):
            lerp_weights_(average, net, 1 - power_ema_beta(step, gamma))

    def find(self, sigma_rel: float) -> nn.Module | None:
        """The average tracked at ``sigma_rel`` (to 1e-9), if any."""
        return next((a for s, a in zip(self.sigma_rels, self.averages) if abs(s - sigma_rel) < 1e-9), None)
