"""Prediction targets and loss weightings: what the network outputs, and how its error is weighted over noise levels.

At x_t = alpha_t x_0 + sigma_t eps every target is a linear combination a x_0 + b eps (``target_coefficients``):
    eps        a = 0,  b = 1                        (Ho et al. 2020)
    x0         a = 1,  b = 0                        (the clean image)
    v          a = -sigma, b = alpha                (Salimans & Ho 2022: v = alpha eps - sigma x_0; VP processes)
    velocity   a = -1, b = 1                        (flow matching's u = eps - x_0 = dx_t/dt on x_t = (1 - t) x_0 + t eps)
    edm        F = (x_0 - c_skip x~) / c_out        (Karras et al. 2022, eq. 7 and Table 1, at sigma~ = sigma_t / alpha_t,
                                                     x~ = x_t / alpha_t: c_skip = sd^2 / (sigma~^2 + sd^2),
                                                     c_out = sigma~ sd / sqrt(sigma~^2 + sd^2), sd = sigma_data)
So a target and x_t give (x_0, eps) by one 2x2 solve (``to_x0_eps``), which is all a sampler needs, and the squared
error of any target is (det / sigma)^2 times that of x_0 at a fixed x_t, det = alpha b - sigma a: a weighting written
once on the x_0 error (a function of the log-SNR) applies to every target and every process (``loss_weight``).
Which targets a process allows is the process's (``predictions``); this module does not know processes.
"""

from __future__ import annotations

import torch

from ddpm.core.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v", "velocity", "edm")
LOSS_WEIGHTS = ("uniform", "min_snr", "edm")
# The targets a zero-terminal-SNR schedule can be sampled with: at alpha_T = 0, eps gives x_0 = (x_T - eps) / 0.
ZERO_TERMINAL_SNR_PREDICTIONS = ("x0", "v")


def check_prediction(prediction: str, allowed: tuple[str, ...] = PREDICTIONS, process: str | None = None) -> None:
    """The one rule of ``diffusion.prediction``: a target ``allowed`` (by the process, when named)."""
    if prediction not in allowed:
        where = f" with process={process}" if process else ""
        raise ConfigError(f"diffusion.prediction={prediction!r}{where}: must be one of {list(allowed)}")


def check_loss_weight(kind: str) -> None:
    """The one rule of ``diffusion.loss_weight``."""
    if kind not in LOSS_WEIGHTS:
        raise ConfigError(f"diffusion.loss_weight={kind!r}: must be one of {list(LOSS_WEIGHTS)}")


def check_min_snr_gamma(gamma: float) -> None:
    """The one rule of ``diffusion.min_snr_gamma``: a number > 0 (Hang et al. use 5)."""
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma <= 0:
        raise ConfigError(f"diffusion.min_snr_gamma={gamma!r}: must be a number > 0 (Hang et al. use 5)")


def check_terminal_snr(prediction: str, alpha_bar_T: float) -> None:
    """The one rule of targets at zero terminal SNR: at alpha_bar_T = 0, eps gives x_0 = (x_T - eps) / 0."""
    if prediction not in ZERO_TERMINAL_SNR_PREDICTIONS and alpha_bar_T == 0:
        raise ConfigError(f"diffusion.prediction={prediction!r}: must be one of {list(ZERO_TERMINAL_SNR_PREDICTIONS)} with "
                          f"schedule.zero_terminal_snr=true (diffusion.prediction={prediction} with a zero-terminal-SNR "
                          "schedule: at t = T, x_0 = (x_T - eps) / alpha_T divides by alpha_T = 0, so an eps model cannot be "
                          "sampled from there. Use diffusion.prediction=v (Lin et al. 2024) or x0, or "
                          "schedule.zero_terminal_snr=false)")


def target_coefficients(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor,
                        sigma_data: float = 1.0) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(a, b) with target = a x_0 + b eps at noise level (alpha, sigma): the table in this module's docstring."""
    if prediction == "eps":
        return 0.0, 1.0
    if prediction == "x0":
        return 1.0, 0.0
    if prediction == "v":
        return -sigma, alpha
    if prediction == "velocity":
        return -1.0, 1.0
    check_prediction(prediction)
    s = sigma / alpha  # edm: F = (x_0 - c_skip x~) / c_out with x~ = x_0 + s eps
    c_skip, c_out = sigma_data**2 / (s**2 + sigma_data**2), s * sigma_data / (s**2 + sigma_data**2).sqrt()
    return (1 - c_skip) / c_out, -c_skip * s / c_out


def network_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                   sigma_data: float = 1.0) -> torch.Tensor:
    """What the network is trained to output for the pair (x_0, eps) at noise level (alpha, sigma)."""
    if prediction in ("eps", "x0"):  # no arithmetic: the target is the tensor itself
        return eps if prediction == "eps" else x0
    a, b = target_coefficients(prediction, alpha, sigma, sigma_data)
    return a * x0 + b * eps


def to_x0_eps(prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              sigma_data: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) from the network's ``output`` F at x_t: the solution of x_t = alpha x_0 + sigma eps,
    F = a x_0 + b eps, namely x_0 = (b x_t - sigma F) / det and eps = (alpha F - a x_t) / det, det = alpha b - sigma a.
    eps and x0 skip the terms that vanish (one division less: the same numbers as before targets were general)."""
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    a, b = target_coefficients(prediction, alpha, sigma, sigma_data)
    det = alpha * b - sigma * a
    return (b * x_t - sigma * output) / det, (alpha * output - a * x_t) / det


def loss_weight(kind: str, prediction: str, alpha: torch.Tensor, sigma: torch.Tensor, gamma: float = 5.0,
                sigma_data: float = 1.0) -> torch.Tensor:
    """The weight of the squared error of ``prediction`` at noise level (alpha, sigma) (float64, like them).

    uniform: 1, Ho et al.'s L_simple in whatever the target is.
    min_snr: Min-SNR-gamma (Hang et al. 2023, eq. 7): min(SNR, gamma) on the x_0 error, whatever the target.
    edm:     EDM's lambda(sigma) = (sigma~^2 + sd^2) / (sigma~ sd)^2 = SNR + 1 / sd^2 on the x_0 error (Karras et al.
             2022, eq. 8 and Table 1), SNR = (alpha / sigma)^2; it is 1 on the edm target (lambda c_out^2 = 1).
    The x_0 error is (sigma / det)^2 times the target's (module docstring): for eps min(SNR, gamma) / SNR, for v
    min(SNR, gamma) / (SNR + 1) (Hang et al.'s three forms), for velocity min(SNR, gamma) / (1 + sqrt(SNR))^2."""
    if kind == "uniform":
        return torch.ones_like(alpha)
    check_loss_weight(kind)
    snr = (alpha / sigma) ** 2
    on_x0 = snr.clamp(max=gamma) if kind == "min_snr" else snr + 1 / sigma_data**2
    if prediction == "x0":
        return on_x0
    a, b = target_coefficients(prediction, alpha, sigma, sigma_data)
    return on_x0 * (sigma / (alpha * b - sigma * a)) ** 2


def boundary_skip(alpha: torch.Tensor, sigma: torch.Tensor, alpha_min: torch.Tensor, sigma_min: torch.Tensor,
                  sigma_data: float = 1.0) -> torch.Tensor:
    """The skip weight b of a consistency function f(x, t) = b x / alpha + (1 - b) x_0(x, t): Song et al. 2023's
    c_skip (Appendix C) at the EDM level s = sigma / alpha, shifted to the least noisy level s_min = sigma_min /
    alpha_min: b = sd^2 / ((s - s_min)^2 + sd^2), 1 exactly at s = s_min (the boundary condition f(x, t_min) =
    x / alpha(t_min), which is x on EDM) and about 0 at high noise (f is then the denoiser)."""
    s, s_min = sigma / alpha, sigma_min / alpha_min
    return sigma_data**2 / ((s - s_min) ** 2 + sigma_data**2)
