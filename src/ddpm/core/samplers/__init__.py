"""Samplers: one module each, one class each, one shared call (after k-diffusion)::

    sampler = DDIM(steps=50, eta=0.0)                     # its settings, checked as it is made (conf/sampler/ddim.yaml)
    x_0 = sampler(model_fn, process, noise, *, generator=None, callback=None, progress=False)

A sampler is a frozen dataclass (``Sampler``): its fields are its config keys with their defaults, ``__post_init__``
refuses a value in one line naming the key, ``name`` is its option in ``conf/sampler/``, ``check_process`` states which
processes it can walk. ``model_fn(x_t, t, **cond) -> (x_0, eps)`` is the (possibly guided) denoiser (``ddpm/core/denoiser.py``;
``cond``: a second time ``r=`` for the samplers of MeanFlow's average velocity, ``second_time``),
``t`` the process's time (an index 0..T-1 for DDPM, a float for the continuous processes), so no sampler knows the
network's prediction target; samplers read the process only through ``sampling_times`` and ``alpha_sigma``
(``ddpm/core/processes``); ``noise`` is x_T; ``generator`` draws any further noise, so a seeded generator makes the
output reproducible; ``callback(i, x_t, x0_pred)`` sees every step. Each module also keeps its function
(``sample_ddim(model_fn, process, noise, **settings)``) for scripts. A new sampler is one module here and one YAML file
in ``conf/sampler/``: the package imports its modules, and each class registers itself in ``SAMPLERS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, ClassVar

import torch

from ddpm.core.errors import ConfigError
from ddpm.core.settings import Registry, number, one_of, require, settings_of

ModelFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (x_t, t, **cond) -> (x_0, eps); cond: r (MeanFlow)
SAMPLERS = Registry("sampler")


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
    raise ConfigError(f"sampler.x0_clip={mode!r}: must be one of {list(X0_CLIPS)}")


SPACINGS = ("time", "logsnr", "karras")

# The range of the (half) log-SNR a sampler may start from (sampler.lambda_min): the first level must be noisy enough
# that pure noise is a fair x_T (alpha_t / sigma_t = e^-2 = 0.14 at the top); and a level noisier than e^-30 = 1e-13
# holds nothing of x_0 even in float64, so null (the process's own noisiest level, pure noise) says it better.
# diffusers clips cosine schedules at -5.1.
MAX_LAMBDA_MIN = -2.0
MIN_LAMBDA_MIN = -30.0


def check_lambda_min(lambda_min: float | None) -> None:
    """The one range check of ``sampler.lambda_min``: null, or a half log-SNR in [MIN_LAMBDA_MIN, MAX_LAMBDA_MIN]."""
    ok = lambda_min is None or (isinstance(lambda_min, (int, float)) and not isinstance(lambda_min, bool)
                                and MIN_LAMBDA_MIN <= lambda_min <= MAX_LAMBDA_MIN)
    if not ok:
        raise ConfigError(f"sampler.lambda_min={lambda_min}: must be null or a log-SNR <= {MAX_LAMBDA_MIN} and >= "
                          f"{MIN_LAMBDA_MIN} (half log-SNR: the first level must be noisy enough for pure noise to start "
                          "from; diffusers uses -5.1; null: the process's noisiest level)")


# The most steps a sampler takes on a continuous process: 100 times EDM's reference (1,000 Euler steps resolve digits
# and CIFAR-10 to within noise); more only adds float rounding, and its levels and wall time grow with the count.
MAX_STEPS = 100_000


def check_steps(steps: int, num_timesteps: int | None, key: str = "sampler.steps") -> None:
    """The one range check of a number of sampling steps: at most the schedule's T (a discrete process), at most
    MAX_STEPS (a continuous one, ``num_timesteps`` None)."""
    most = num_timesteps if num_timesteps is not None else MAX_STEPS
    bound = f"schedule.timesteps={num_timesteps}" if num_timesteps is not None else f"{MAX_STEPS} (a continuous process)"
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= most:
        raise ConfigError(f"{key}={steps}: must be an integer between 1 and {bound}")


@dataclass(frozen=True)
class Sampler:
    """A sampler option (see the module docstring). ``steps``: network evaluations (None: all T, for the discrete
    process's ancestral sampler); ``x0_clip`` and ``percentile``: what each step does to the predicted x_0."""

    name: ClassVar[str] = ""
    discrete_only: ClassVar[bool] = False  # walks the discrete process's own steps (ancestral DDPM)
    second_time: ClassVar[bool] = False    # calls model_fn(x_t, t, r=...) (MeanFlow's average velocity)
    steps: int | None = 50
    x0_clip: str = "clip"
    percentile: float = 0.995

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            SAMPLERS.add(cls)

    def __post_init__(self) -> None:
        if self.steps is not None:
            check_steps(self.steps, None)
        one_of("sampler.x0_clip", self.x0_clip, X0_CLIPS)
        require(number(self.percentile) and 0 < self.percentile <= 1, "sampler.percentile", self.percentile,
                "a number in (0, 1]")

    def settings(self) -> dict:
        return settings_of(self)

    def with_steps(self, steps: int | None) -> "Sampler":
        """The same sampler at another number of steps (None: its own)."""
        return self if steps is None else replace(self, steps=steps)

    def check_process(self, process) -> None:
        """ConfigError, one line, unless this sampler can walk ``process``: its steps at most the discrete process's T;
        ancestral DDPM (``discrete_only``) on the discrete process only."""
        if self.discrete_only and not process.discrete:
            raise ConfigError(f"sampler={self.name} with process={process.name}: ancestral DDPM (Ho et al. Algorithm 2) "
                              "walks the discrete process's own steps; use sampler=ddim (its eta=1 is ancestral on any "
                              "process), heun or dpmpp_2m")
        if self.steps is not None:
            check_steps(self.steps, process.num_timesteps)

    def check_model(self, denoiser) -> None:
        """ConfigError, one line, unless this sampler can sample ``denoiser``'s network (one that takes a second time r
        for the samplers that pass one: ``second_time``)."""
        if self.second_time and not getattr(getattr(denoiser.net, "_orig_mod", denoiser.net), "second_time", False):
            from ddpm.core.objectives import OBJECTIVES

            which = "|".join(name for name, option in OBJECTIVES.items() if option.second_time)
            raise ConfigError(f"sampler={self.name} needs a model trained with objective={which} (its network takes the "
                              "second time r of the average velocity u(z, r, t)); this one was not: use sampler=ddim, "
                              "heun or dpmpp_2m")

    def __call__(self, model_fn: ModelFn, process, noise: torch.Tensor, *, generator: torch.Generator | None = None,
                 callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class SpacedSampler(Sampler):
    """A sampler over the process's ``sampling_times``: ``spacing`` (time | logsnr | karras), the half log-SNR
    ``lambda_min`` it starts from (None: the process's noisiest level) and the karras spacing's ``rho``."""

    spacing: str = "time"
    lambda_min: float | None = None
    rho: float = 7.0

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("sampler.spacing", self.spacing, SPACINGS)
        check_lambda_min(self.lambda_min)
        require(number(self.rho) and self.rho > 0, "sampler.rho", self.rho, "a number > 0 (EDM: 7)")


def as_sampler(sampler) -> Sampler | None:
    """The ``Sampler`` behind ``sampler``: itself, or the class of one of the modules' functions (plain or a partial,
    as scripts call them) made with its keywords; None for a function of your own (it has no settings to check)."""
    if isinstance(sampler, Sampler):
        return sampler
    func, keywords = (sampler.func, sampler.keywords) if isinstance(sampler, partial) else (sampler, {})
    option = getattr(func, "option", None)
    return option(**keywords) if option is not None else None


def sampler_name(sampler) -> str:
    """The name of a sampler's option in conf/sampler/ (a function of your own: its own name)."""
    option = as_sampler(sampler)
    if option is not None:
        return option.name
    func = sampler.func if isinstance(sampler, partial) else sampler
    return getattr(func, "__name__", type(func).__name__)


def check_process(sampler, process) -> None:
    """``Sampler.check_process`` for a sampler given as a class instance or as one of the modules' functions."""
    option = as_sampler(sampler)
    if option is not None:
        option.check_process(process)


def functional(option: type) -> Callable:
    """``sample_<name>(model_fn, process, noise, *, generator, callback, progress, **settings)``: the option as a
    function, for scripts (and ``check_process`` finds its class through it)."""
    def sample(model_fn: ModelFn, process, noise: torch.Tensor, *, generator=None, callback=None, progress=False,
               **settings) -> torch.Tensor:
        return option(**settings)(model_fn, process, noise, generator=generator, callback=callback, progress=progress)

    sample.__name__ = sample.__qualname__ = f"sample_{option.name}"
    sample.__doc__ = f"{option.__name__}(**settings)(model_fn, process, noise, ...): {option.__doc__.splitlines()[0]}"
    sample.option = option
    return sample


def nearest_index(levels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For each target, the index of the nearest of ``levels`` (ties: the first)."""
    return (levels[None, :] - targets[:, None]).abs().argmin(dim=1)


def sampling_timesteps(alphas_cumprod: torch.Tensor, steps: int, spacing: str = "time", lambda_min: float | None = None,
                       rho: float = 7.0) -> torch.Tensor:
    """The timestep indices a sampler visits, ascending (the samplers walk them from the end); every sampler uses this.

    time:   ``steps`` indices evenly spread over 0..T-1, both ends included (Nichol & Dhariwal 2021, sec. 4).
    logsnr: about ``steps`` indices evenly spread in lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022 recommend it
            for low-resolution pixel models).
    karras: EDM's spacing of sigma = sigma_t / alpha_t (Karras et al. 2022, eq. 5 with rho): dense at low noise.
    For logsnr and karras each target level is rounded to the nearest timestep and duplicates collapse, so the result
    can be a little shorter than ``steps``. They start at the last t whose lambda is >= ``lambda_min`` (None: t = T),
    and a single level (steps = 1) is that start, for every spacing.

    Why a floor: the cosine schedule's betas are clipped at 0.999, so its log-SNR falls from -6.5 to -9.9 in the
    last step alone; spaced down to -9.9, a quarter of 20 steps land on t >= 990 and several collapse (17 distinct,
    5 of them there). DPM-Solver implementations clip lambda_min for this (diffusers' ``lambda_min_clipped``, -5.1
    for cosine schedules); the linear schedule's lambda_T = -5.06 is above that floor and keeps t = T. A zero-terminal-
    SNR schedule (lambda_T = -inf) spaces over the finite levels and then adds t = T itself."""
    num_timesteps = len(alphas_cumprod)
    check_steps(steps, num_timesteps)
    check_lambda_min(lambda_min)
    if spacing == "time":
        if steps == 1:
            return torch.tensor([num_timesteps - 1])
        return torch.round(torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64)).long().unique()
    if spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r}: must be one of {list(SPACINGS)}")
    lam = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod)).cpu()  # decreasing in t
    last = num_timesteps - 1 if lambda_min is None else max(int((lam >= lambda_min).sum()) - 1, 0)
    infinite_end = not math.isfinite(lam[last].item())  # zero terminal SNR: no target can be placed at -inf
    finite_last, n = (last - 1, steps - 1) if infinite_end else (last, steps)
    if n < 1:
        return torch.tensor([last])
    if n == 1:  # one level: the start, from which a single step goes to the data
        return torch.tensor([finite_last, last] if infinite_end else [last])
    if spacing == "logsnr":
        targets = torch.linspace(lam[0].item(), lam[finite_last].item(), n, dtype=torch.float64)
    else:  # karras: sigma_i^(1/rho) evenly spaced between sigma_min^(1/rho) and sigma_max^(1/rho); lambda = -log sigma
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        sigma_min, sigma_max = math.exp(-lam[0].item()), math.exp(-lam[finite_last].item())
        sigmas = (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
        targets = -sigmas.log()
    chosen = nearest_index(lam[: finite_last + 1], targets)
    if infinite_end:
        chosen = torch.cat([chosen, torch.tensor([last])])
    return chosen.unique()


def levels(process, like: torch.Tensor, steps: int, spacing: str = "time", lambda_min: float | None = None,
           rho: float = 7.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(times, alpha, sigma): the process's ``sampling_times`` (ascending, on ``like``'s device, as the network gets
    them) and alpha, sigma in float64 with clean data first: alpha[0] = 1, sigma[0] = 0, alpha[i + 1] at times[i]."""
    times = process.sampling_times(steps, spacing, lambda_min, rho)
    alpha, sigma = process.alpha_sigma(times.to(getattr(process, "betas", times).device))
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    return times.to(like.device), torch.cat([one, alpha.cpu()]), torch.cat([zero, sigma.cpu()])


def initial_x(process, noise: torch.Tensor, sigma_start: float) -> torch.Tensor:
    """x at the noisiest level from standard normal ``noise``: the noise itself for the discrete process (Ho et al.
    Algorithm 2, line 1: x_T ~ N(0, I)), ``sigma_start`` times it for the continuous ones (Karras et al. Algorithm 1,
    line 1: x_0 ~ N(0, t_0^2 I)), whose noisiest level need not have unit variance (EDM: sigma = 80)."""
    return noise if process.discrete else noise * sigma_start


SAMPLERS.load(__name__)  # every sampler module here registers its class
