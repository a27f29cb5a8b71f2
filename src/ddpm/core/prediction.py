"""Prediction targets and loss weightings: what the network outputs, and how its error is weighted over t.

With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and x_t = alpha_t x_0 + sigma_t eps, the network
predicts one of (Salimans & Ho 2022, sec. 4 and appendix D):
    eps                                  (Ho et al. 2020)
    x0                                   (the clean image)
    v = alpha_t eps - sigma_t x_0        (velocity)
Each determines the other two given x_t, so a model of any target yields (x_0, eps), which is all a sampler needs.
"""

from __future__ import annotations

import torch

from ddpm.core.errors import ConfigError

PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTS = ("uniform", "min_snr")
# The targets a zero-terminal-SNR schedule can be sampled with: at alpha_T = 0, eps gives x_0 = (x_T - eps) / 0.
ZERO_TERMINAL_SNR_PREDICTIONS = ("x0", "v")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"diffusion.prediction={prediction!r}: must be one of {list(PREDICTIONS)}")


def check_min_snr_gamma(gamma: float) -> None:
    """The one rule of ``diffusion.min_snr_gamma``: a number > 0 (Hang et al. use 5)."""
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma <= 0:
        raise ConfigError(f"diffusion.min_snr_gamma={gamma!r}: must be a number > 0 (Hang et al. use 5)")


def check_terminal_snr(prediction: str, alpha_bar_T: float) -> None:
    """The one rule of targets at zero terminal SNR: at alpha_bar_T = 0, eps gives x_0 = (x_T - eps) / 0."""
    if prediction not in ZERO_TERMINAL_SNR_PREDICTIONS and alpha_bar_T == 0:
        raise ConfigError(f"diffusion.prediction={prediction} with a zero-terminal-SNR schedule: at t = T, x_0 = (x_T - eps) / "
                          "alpha_T divides by alpha_T = 0, so an eps model cannot be sampled from there. Use "
                          "diffusion.prediction=v (Lin et al. 2024) or x0, or schedule.zero_terminal_snr=false")


def network_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output for the pair (x_0, eps) at noise level (alpha, sigma)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    check_prediction(prediction)
    return alpha * eps - sigma * x0  # v


def to_x0_eps(prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
              sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) from the network's ``output`` at x_t: invert x_t = alpha x_0 + sigma eps (and, for v, the rotation
    x_0 = alpha x_t - sigma v, eps = sigma x_t + alpha v, which uses alpha^2 + sigma^2 = 1)."""
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    check_prediction(prediction)
    return alpha * x_t - sigma * output, sigma * x_t + alpha * output


def loss_weight(kind: str, prediction: str, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """The per-timestep weight of the squared error of ``prediction``, for an SNR alpha^2 / sigma^2.

    uniform: 1, Ho et al.'s L_simple in whatever the target is.
    min_snr: Min-SNR-gamma (Hang et al. 2023, eq. 7): the loss becomes min(SNR, gamma) ||x_0 - x_0_hat||^2 whatever the
    target, since ||eps - eps_hat||^2 = SNR ||x_0 - x_0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x_0 - x_0_hat||^2 at a
    fixed x_t. So the weight is min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v.
    """
    if kind == "uniform":
        return torch.ones_like(snr)
    if kind != "min_snr":
        raise ConfigError(f"diffusion.loss_weight={kind!r}: must be one of {list(LOSS_WEIGHTS)}")
    clipped = snr.clamp(max=gamma)
    if prediction == "eps":
        return clipped / snr
    if prediction == "x0":
        return clipped
    check_prediction(prediction)
    return clipped / (snr + 1)
