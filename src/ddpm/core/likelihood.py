"""Likelihood of images under a trained model, in bits per dimension: DDPM's variational bound and, for the continuous
processes, the probability-flow ODE's exact likelihood.

Both take ``denoise(x_t, t) -> (x0, eps)``, the model's predictions at noisy images (``ddpm.core.denoiser.Denoiser``
with its labels bound), and data ``x0`` in [-1, 1] that came from 8-bit images.

* ``vlb_terms`` (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 2): the prior term KL(q(x_T|x_0) || N(0, I)),
  for each t >= 2 KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)), and at t = 1 the discretized Gaussian decoder
  -log p(x_0|x_1) of the 8-bit data. Their sum, in nats, bounds -log P(x_0) of the 8-bit image; over all T steps, or
  over a respaced process's (iDDPM's strided bound: ``ddpm.core.processes.ddpm.respace``).
* ``ode_log_likelihood`` (Song et al. 2021, sec. 4.3 and app. D.2; Chen et al. 2018): log p_0(x) = log p_T(x_T) +
  int_0^T div v(x_t, t) dt along the probability-flow ODE dx/dt = v = alpha'(t) x0_hat + sigma'(t) eps_hat, solved with
  scipy's adaptive Runge-Kutta (``solve_ivp``: already a dependency, float64, error control by rtol/atol; no new
  library earns a place for this), the divergence exact (D backward passes: small images) or by Hutchinson's estimator
  with Rademacher probes drawn once per image and held along the trajectory (Grathwohl et al. 2019).
* ``dequantize`` and ``ode_bits_per_dim``: the density of a continuous model bounds the probability of the 8-bit
  image only after uniform dequantization, and the offset for data scaled to [-1, 1] is written once, here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddpm.core.errors import ConfigError
from ddpm.core.processes import Process
from ddpm.core.settings import integer, number, one_of, require
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.variance import VARIANCES, model_log_variance

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LEVELS = 256  # 8-bit data


# --- Gaussians, in nats ------------------------------------------------------------------------------------------
def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element: (logvar2 - logvar1 + (e^logvar1 + (mean1 -
    mean2)^2) e^-logvar2 - 1) / 2."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for 8-bit data x in [-1, 1] (x = 2k/255 - 1) under N(mean, e^(2 log_scale)) integrated
    over each value's bin of width 2/255 (Ho et al. 2020, eq. 13), the outer bins reaching to -inf and +inf."""
    half_bin = 1.0 / (LEVELS - 1)
    inv_std = torch.exp(-log_scale)
    cdf_plus = standard_normal_cdf(inv_std * (x - mean + half_bin))
    cdf_minus = standard_normal_cdf(inv_std * (x - mean - half_bin))
    tiny = torch.finfo(x.dtype).tiny
    log_cdf_plus = cdf_plus.clamp(min=tiny).log()                   # the lowest bin: P(X <= -1 + half bin)
    log_one_minus_cdf_minus = (1.0 - cdf_minus).clamp(min=tiny).log()  # the highest: P(X > 1 - half bin)
    log_middle = (cdf_plus - cdf_minus).clamp(min=tiny).log()
    return torch.where(x < -1 + half_bin / 2, log_cdf_plus,
                       torch.where(x > 1 - half_bin / 2, log_one_minus_cdf_minus, log_middle))


# --- DDPM's variational bound ------------------------------------------------------------------------------------
@dataclass
class Bound:
    """The terms of the bound per image, in nats: ``prior`` (B,), ``terms`` (B, T: index 0 is the decoder at t = 1,
    index i the KL at t = i + 1) and their sum ``total``; ``dims``: values per image."""

    prior: torch.Tensor
    terms: torch.Tensor
    dims: int

    @property
    def total(self) -> torch.Tensor:
        return self.prior + self.terms.sum(1)

    @property
    def bits_per_dim(self) -> torch.Tensor:
        """total / (D ln 2): the decoder's probabilities are already those of the 8-bit values, so no offset."""
        return self.total / (self.dims * math.log(2.0))


def prior_kl(process: DDPMProcess, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) per image, in nats (L_T of Ho et al. eq. 5)."""
    last = torch.full((len(x0),), process.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean, variance = process.q_mean_variance(x0, last)
    return normal_kl(mean, variance.log(), torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).sum(1)


def step_term(process: DDPMProcess, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor, x0_hat: torch.Tensor,
              log_variance: torch.Tensor) -> torch.Tensor:
    """L_{t-1} per image, in nats, of a reverse step with mean mu~(x_t, x0_hat) (eq. 7) and log-variance
    ``log_variance``: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for index >= 1, the decoder's -log p(x_0 | x_1) of
    the 8-bit data for index 0. The bound's terms and iDDPM's hybrid loss (its L_vlb) are both this."""
    true_mean, true_variance = process.q_posterior(x0, x_t, index)
    model_mean, _ = process.q_posterior(x0_hat, x_t, index)
    kl = normal_kl(true_mean, true_variance.clamp(min=torch.finfo(true_variance.dtype).tiny).log(), model_mean,
                   log_variance).flatten(1).sum(1)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_variance).flatten(1).sum(1)
    return torch.where(index == 0, decoder, kl)


X0_CLIPS = ("clip", "none")


def vlb_term(process: DDPMProcess, denoise: Denoise, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor,
             variance: str = "fixed_small", x0_clip: str = "clip") -> torch.Tensor:
    """L_{t-1} per image at the process index ``index`` (t = index + 1) for a given x_t ~ q(x_t | x_0), the reverse
    step's variance ``variance`` (``ddpm.core.variance``; learned_range: ``denoise`` returns (x0, eps, v)).

    ``x0_clip="clip"``: the step's mean at the predicted x_0 clamped to [-1, 1], as the samplers step by default and
    as Nichol & Dhariwal's bound is evaluated (``clip_denoised=True``): the bound of the model as it samples. Unclipped,
    an eps model's x_0 at t = T is its eps error over sqrt(alpha_bar_T), 5e-5 for the cosine schedule, and that last
    term alone can cost bits per dimension (5.3 measured on digits, docs/ablations/likelihood.md)."""
    out = denoise(x_t, index)
    x0_hat, v = out[0], (out[2] if variance == "learned_range" else None)
    if x0_clip == "clip":
        x0_hat = x0_hat.clamp(-1, 1)
    return step_term(process, x0, x_t, index, x0_hat, model_log_variance(process, variance, index, x_t, v))


@torch.no_grad()
def vlb_terms(process: DDPMProcess, denoise: Denoise, x0: torch.Tensor, variance: str = "fixed_small",
              generator: torch.Generator | None = None, x0_clip: str = "clip") -> Bound:
    """Every term of the bound for a batch of 8-bit images ``x0`` (in [-1, 1]): one network evaluation per step and
    image, each at its own draw x_t ~ q(x_t | x_0) (an unbiased estimate of the expectations in eq. 5)."""
    terms = []
    for i in range(process.num_timesteps):
        index = torch.full((len(x0),), i, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        terms.append(vlb_term(process, denoise, x0, process.q_sample(x0, index, noise), index, variance, x0_clip))
    return Bound(prior_kl(process, x0), torch.stack(terms, 1), x0[0].numel())


class NonFiniteLikelihood(ConfigError):
    """A likelihood came out NaN or infinite (a model whose predictions overflow): one line, exit status 2."""


# --- the probability-flow ODE -----------------------------------------------------------------------------------
ESTIMATORS = ("exact", "hutchinson")
SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")  # scipy.integrate.solve_ivp's methods


def check_settings(num_images=0, conditional=False, estimator="hutchinson", num_probes=1, solver="RK45", rtol=1e-5,
                   atol=1e-5, variance=None, x0_clip="clip", seed=0, batch_size=200) -> None:
    """The rules of the ``likelihood`` settings (conf/evaluate.yaml), checked before any compute: one line naming the
    first key that breaks them."""
    require(integer(num_images) and num_images >= 0, "likelihood.num_images", num_images, "an integer >= 0 (0: off)")
    require(isinstance(conditional, bool), "likelihood.conditional", conditional, "true or false")
    one_of("likelihood.estimator", estimator, ESTIMATORS)
    require(integer(num_probes) and num_probes > 0, "likelihood.num_probes", num_probes, "an integer > 0")
    one_of("likelihood.solver", solver, SOLVERS)
    for key, value in (("likelihood.rtol", rtol), ("likelihood.atol", atol)):
        require(number(value) and 0 < value < 1, key, value, "a number in (0, 1)")
    if variance is not None:
        one_of("likelihood.variance", variance, VARIANCES)
    one_of("likelihood.x0_clip", x0_clip, X0_CLIPS)
    require(integer(seed), "likelihood.seed", seed, "an integer")
    require(integer(batch_size) and batch_size > 0, "likelihood.batch_size", batch_size, "an integer > 0")


@dataclass
class ODELikelihood:
    """log p(x) per image (nats, the density of the continuous data at the ODE's first time), the number of network
    evaluations the solver made (each a batch), and the prior's share."""

    log_likelihood: torch.Tensor
    prior_log_likelihood: torch.Tensor
    nfe: int


def prior_log_density(process: Process, x_T: torch.Tensor) -> torch.Tensor:
    """log N(x_T; 0, s^2 I) per image with s^2 = sigma(t_max)^2 + alpha(t_max)^2 sigma_data^2: the marginal at t_max
    of data with std sigma_data (exact for flow and TrigFlow, where alpha(t_max) = 0; EDM's alpha = 1 adds
    sigma_data^2 to sigma_max^2 = 6400)."""
    alpha, sigma = process.alpha_sigma(torch.tensor([float(process.t_max)], dtype=torch.float64))
    variance = (sigma ** 2 + alpha ** 2 * process.sigma_data ** 2).item()
    flat = x_T.flatten(1)
    return -0.5 * (flat ** 2).sum(1) / variance - 0.5 * flat.shape[1] * math.log(2 * math.pi * variance)


def divergence(velocity: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, estimator: str,
               probes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v(x), div_x v(x) per image): exact, one backward pass per dimension, or Hutchinson's estimate
    mean_k z_k^T (dv/dx) z_k over the given Rademacher ``probes`` (K, *x.shape), one backward pass each."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x)
        if estimator == "exact":
            flat = v.flatten(1)
            total = torch.zeros(len(x), dtype=v.dtype, device=v.device)
            for d in range(flat.shape[1]):
                grad, = torch.autograd.grad(flat[:, d].sum(), x, retain_graph=True)
                total = total + grad.flatten(1)[:, d]
            return v.detach(), total
        estimates = []
        for k, z in enumerate(probes):
            grad, = torch.autograd.grad((v * z).sum(), x, retain_graph=k < len(probes) - 1)
            estimates.append((grad * z).flatten(1).sum(1))
        return v.detach(), torch.stack(estimates).mean(0)


def ode_log_likelihood(process: Process, denoise: Denoise, x: torch.Tensor, estimator: str = "hutchinson",
                       num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
                       t_start: float | None = None, generator: torch.Generator | None = None) -> ODELikelihood:
    """log p_{t_start}(x) per image through the probability-flow ODE from t_start (the process's t_min by default:
    the data level its denoiser was trained down to) to t_max, in float64 whatever the network's dtype."""
    from scipy.integrate import solve_ivp

    if estimator not in ESTIMATORS:
        raise ConfigError(f"likelihood.estimator={estimator!r}: must be one of {list(ESTIMATORS)}")
    if getattr(process, "discrete", False):
        raise ConfigError(f"process={process.name}: the probability-flow ODE needs a continuous time; the discrete "
                          "process's likelihood is its variational bound (metrics bpd with likelihood.method=vlb)")
    x = x.double()
    shape, n = x.shape, x.shape[0]
    probes = None
    if estimator == "hutchinson":
        probes = torch.randint(0, 2, (num_probes, *shape), generator=generator).double().mul_(2).sub_(1).to(x.device)
    calls = {"nfe": 0}

    def field(t: float, state):
        calls["nfe"] += 1
        x_t = torch.from_numpy(state[:-n]).view(shape).to(x.device)
        times = torch.full((n,), t, dtype=torch.float64, device=x.device)

        def velocity(y):
            x0_hat, eps_hat = denoise(y, times)
            return process.velocity(x0_hat.double(), eps_hat.double(), times)

        v, div = divergence(velocity, x_t, estimator, probes)
        return torch.cat([v.flatten(), div]).cpu().numpy()

    start = float(process.t_min if t_start is None else t_start)
    state = torch.cat([x.flatten().cpu(), torch.zeros(n, dtype=torch.float64)]).numpy()
    solution = solve_ivp(field, (start, float(process.t_max)), state, method=method, rtol=rtol, atol=atol)
    if not solution.success or not torch.isfinite(torch.from_numpy(solution.y[:, -1])).all():
        raise NonFiniteLikelihood(f"likelihood.solver={method}: the probability-flow ODE did not solve to t_max "
                                  f"({solution.message.rstrip('.')}, after {calls['nfe']} evaluations); the model's velocity "
                                  "is not finite along the path: try likelihood.rtol/atol smaller, or another solver")
    end = torch.from_numpy(solution.y[:, -1])
    x_T, integral = end[:-n].view(shape), end[-n:]
    prior = prior_log_density(process, x_T)
    return ODELikelihood(prior + integral, prior, calls["nfe"])


# --- from 8-bit images to bits per dimension --------------------------------------------------------------------
def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of 8-bit data given in [-1, 1] (x = 2k/255 - 1): y = 2 (k + u) / 256 - 1 with
    u ~ U[0, 1)^D, a continuous variable in [-1, 1) whose density bounds the 8-bit probabilities (``ode_bits_per_dim``)."""
    k = torch.round((x.double() + 1) * (LEVELS - 1) / 2)
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
    return 2 * (k + u) / LEVELS - 1


def ode_bits_per_dim(log_density: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits per dimension of the 8-bit images from log p(y) of their dequantized versions y in [-1, 1]:

        bpd = -log p(y) / (D ln 2) + log2(128) = -log p(y) / (D ln 2) + 7

    since the 8-bit value k has P(k) >= exp(E_u log p_[0,1)((k + u)/256) - D log 256) (Jensen), and on [-1, 1)
    p_[0,1) = 2^D p_[-1,1): -log2 P(k) / D <= -log2 p(y) / D - 1 + 8. The ``7`` is the offset that a density on
    [-1, 1] needs; forgetting it (or using 8, the offset for [0, 1]) is the classic error."""
    return -log_density / (dims * math.log(2.0)) + math.log2(LEVELS / 2)
