"""The process interface: a Gaussian path x_t = alpha(t) x_0 + sigma(t) eps, and what training and sampling need of it.

A process says (all float64, for a tensor of times ``t``):
    alpha_sigma(t)        alpha(t) and sigma(t)
    d_alpha_sigma(t)      their derivatives d alpha/dt and d sigma/dt, so the velocity dx_t/dt = alpha' x_0 +
                          sigma' eps is defined on every continuous path (MeanFlow's target reads it)
    log_snr(t)            lambda(t) = log(alpha^2 / sigma^2), decreasing in t
    t_of_log_snr(lam)     its inverse, so a sampler can space levels in lambda or in sigma = sigma/alpha for any process
    sample_t(n)           the training distribution of t
    c_noise(t)            what the network receives as its noise input (scaled to the range of DDPM's indices,
                          0..1000, which the U-Net's sinusoidal embedding resolves)
    scale_input(x_t, t)   c_in x_t, what the network receives as its image (1 but for EDM)
    sampling_times(...)   the levels a sampler evaluates the network at, ascending
and the prediction targets it defines (``predictions``, the first its default). A process is an option (``core/settings.py``):
its constructor's keyword arguments are its config keys (conf/process/<name>.yaml), checked as it is made, and
``settings()`` gives them back. Processes, one module each: ``ddpm.py`` (discrete DDPM, ``discrete = True``),
``flow.py``, ``edm.py`` and ``trigflow.py``; a new one is one module here and one YAML file in ``conf/process/`` (the
package imports its modules; each class registers itself in ``PROCESSES``). The network knows nothing of any of this.

Conventions: samplers (``sampler.lambda_min``) use DPM-Solver's half log-SNR log(alpha/sigma) = lambda/2, as
diffusers does; this interface speaks lambda itself. Every continuous process here ends at t = 0 (clean data).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddpm.core.errors import ConfigError
from ddpm.core.settings import Registry, number, one_of, require, settings_of

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
PROCESSES = Registry("process")


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    one_of(key, value, allowed)


def check_positive(key: str, value) -> None:
    require(number(value) and value > 0, key, value, "a number > 0")


def check_between(key: str, value, lo: float, hi: float) -> None:
    """``value`` in the open interval (lo, hi)."""
    require(number(value) and lo < value < hi, key, value, f"a number in ({lo}, {hi})")


class Process(nn.Module):
    """A Gaussian path; subclasses give ``alpha_sigma``, ``t_of_log_snr``, ``sample_t`` and ``c_noise``.

    An ``nn.Module`` so that ``.to(device)`` moves the discrete process's tables; continuous ones hold none."""

    name = "process"
    discrete = False           # True: t is an integer index 0..T-1 (the DDPM samplers need one)
    predictions: tuple[str, ...] = ()
    t_max = 1.0                # the noisiest level a sampler starts from
    t_min = 0.0                # the least noisy level a sampler evaluates (set by each continuous process)
    num_timesteps: int | None = None  # T of a discrete process; None: any number of sampling steps

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            PROCESSES.add(cls)

    def __init__(self, sigma_data: float = 1.0):
        super().__init__()
        check_positive("process.sigma_data", sigma_data)
        self.sigma_data = float(sigma_data)

    # --- the path -----------------------------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def d_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d alpha/dt and d sigma/dt; the discrete process's t is an index, where no derivative is defined."""
        raise ConfigError(f"process={self.name}: its time is a discrete index, so the velocity dx_t/dt is undefined; "
                          "use a continuous process (flow, edm, trigflow)")

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The conditional velocity dx_t/dt = alpha'(t) x_0 + sigma'(t) eps at x_t = alpha x_0 + sigma eps."""
        d_alpha, d_sigma = self.d_alpha_sigma(t)
        shape = (-1, *([1] * (x0.ndim - 1)))
        return d_alpha.to(x0).view(shape) * x0 + d_sigma.to(x0).view(shape) * eps

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(alpha^2 / sigma^2) (+inf at sigma = 0, -inf at alpha = 0)."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (alpha.log() - sigma.log())

    def t_of_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- training -----------------------------------------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError

    # --- the network's inputs -----------------------------------------------------------------------------------
    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """c_in x_t; 1 unless a process preconditions (EDM)."""
        return x_t

    # --- sampling -----------------------------------------------------------------------------------------------
    def sampling_times(self, steps: int, spacing: str = "time", lambda_min: float | None = None,
                       rho: float = 7.0) -> torch.Tensor:
        """``steps`` levels, ascending, that a sampler walks from the last down to clean data at t = 0.

        time:   evenly in t from the start to 0, 0 excluded: t_max (N - i) / N, the plain Euler grid of flow matching.
        logsnr: evenly in lambda from the start to t_min, both included.
        karras: EDM's rho-spacing of sigma/alpha from the start to t_min (Karras et al. 2022, eq. 5).
        The start is t_max, or the level whose half log-SNR is ``lambda_min`` when t_max is noisier than that."""
        from ddpm.core.samplers import SPACINGS, check_lambda_min, check_steps

        check_steps(steps, None)
        check_lambda_min(lambda_min)
        check_choice("sampler.spacing", spacing, SPACINGS)
        t_max = torch.tensor([self.t_max], dtype=torch.float64)
        start = t_max
        if lambda_min is not None and self.log_snr(t_max).item() < 2 * lambda_min:
            start = self.t_of_log_snr(torch.tensor([2.0 * lambda_min], dtype=torch.float64))
        if spacing == "time":
            return (start * torch.arange(1, steps + 1, dtype=torch.float64) / steps)
        if not math.isfinite(self.log_snr(start).item()):
            raise ConfigError(f"sampler.lambda_min=null with process={self.name} and sampler.spacing={spacing}: its "
                              f"noisiest level t={self.t_max} has log-SNR -inf, which cannot be spaced; set "
                              "sampler.lambda_min (e.g. -5.1) or sampler.spacing=time")
        if steps == 1:
            return start
        t_min = torch.tensor([self.t_min], dtype=torch.float64)
        lo, hi = self.log_snr(start).item(), self.log_snr(t_min).item()  # lambda at the start (noisiest), at t_min
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        if spacing == "logsnr":
            lam = hi + ramp * (lo - hi)
        else:  # sigma/alpha = exp(-lambda/2), rho-spaced
            s_min, s_max = math.exp(-hi / 2), math.exp(-lo / 2)
            lam = -2 * ((s_min ** (1 / rho) + ramp * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho).log()
        times = self.t_of_log_snr(lam)
        times[0], times[-1] = self.t_min, start.item()  # exact ends, not the inverse's rounding
        return times

    # --- identity -----------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """Its config keys and values (tensors left out: a discrete process's betas are its schedule's)."""
        return {k: v for k, v in settings_of(self).items() if not isinstance(v, torch.Tensor)}

    def path_settings(self) -> dict:
        """What defines the path and its preconditioning (two models share a process when these are equal)."""
        return {"name": self.name, "sigma_data": self.sigma_data}

    def same_path(self, other: "Process") -> bool:
        return type(self) is type(other) and self.path_settings() == other.path_settings()


def draw_time(distribution: str, n: int, device, logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """t in (0, 1) for the training loss: ``uniform``, or ``logit_normal``: t = sigmoid(u), u ~ N(logit_mean,
    logit_std^2) (Esser et al. 2024, eq. 19: m = 0, s = 1 put most weight at mid noise)."""
    if distribution == "uniform":
        return torch.rand(n, device=device, dtype=torch.float64)
    check_choice("process.time_distribution", distribution, TIME_DISTRIBUTIONS)
    return torch.sigmoid(logit_mean + logit_std * torch.randn(n, device=device, dtype=torch.float64))


PROCESSES.load(__name__)  # every process module here registers its class
