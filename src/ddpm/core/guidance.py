"""Classifier-free guidance (Ho & Salimans 2022): label dropout at training, the guided prediction at sampling,
with two variants: rescaled CFG (Lin et al. 2024, sec. 3.4) and a guidance interval (Kynkaanniemi et al. 2024).

Convention: ``guidance_scale`` is the paper's w,
    x0_guided = (1 + w) * x0(x_t, y) - w * x0(x_t, null)     (and the same for eps),
so w = 0 is the purely conditional model. HuggingFace diffusers writes the same rule as
eps_u + s * (eps_c - eps_u) with s = 1 + w: our w = 2 is their guidance_scale = 3. Guiding x_0 or eps is the same
thing (at a fixed x_t they are affine in each other, with weights that sum to 1), so it does not depend on what the
network predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm.core.denoiser import Denoiser
from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``p_uncond`` (Ho & Salimans 2022, Algorithm 1)."""
    if p_uncond <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def rescale_guidance(x0_guided: torch.Tensor, x0_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Rescaled CFG, Lin et al. 2024 eq. 15-16: scale the guided prediction so its std (per sample) is the conditional
    one's, then mix: phi * x_rescaled + (1 - phi) * x_guided. Applied to x_0, whatever the network predicts (diffusers
    applies it to the raw output); phi = 0 leaves guidance unchanged, Lin et al. use 0.7."""
    dims = tuple(range(1, x0_guided.ndim))
    ratio = x0_cond.std(dim=dims, keepdim=True) / x0_guided.std(dim=dims, keepdim=True)
    return phi * x0_guided * ratio + (1 - phi) * x0_guided


def guided(denoiser: Denoiser, labels: torch.Tensor | None, guidance_scale: float = 0.0, rescale: float = 0.0,
           interval: tuple[float, float] | None = None) -> ModelFn:
    """The denoiser as model_fn(x_t, t) -> (x_0, eps), the one function every sampler calls.

    ``rescale``: phi of rescaled CFG. ``interval``: (sigma_lo, sigma_hi); guidance only where the noise level
    sigma = sigma_t / alpha_t (EDM's) is in (sigma_lo, sigma_hi], the plain conditional prediction elsewhere
    (Kynkaanniemi et al. 2024). For w > 0 the conditional and unconditional halves run as one batched forward pass
    (skipped when no sample of the batch is inside the interval). An unconditional network ignores labels and w.
    """
    net = denoiser.net
    if getattr(net, "num_classes", None) is None:
        return lambda x, t: denoiser(x, t)
    if labels is None:
        raise ConfigError("a class-conditional model needs labels to sample")
    if guidance_scale == 0:
        return lambda x, t: denoiser(x, t, labels)

    null = torch.full_like(labels, net.null_label)
    both_labels = torch.cat([labels, null])
    sigmas = (1 - denoiser.process.alphas_cumprod) / denoiser.process.alphas_cumprod  # sigma^2, float64
    w = guidance_scale

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inside = None
        if interval is not None:
            sigma = sigmas.to(t.device)[t].sqrt()
            inside = (sigma > interval[0]) & (sigma <= interval[1])
            if not inside.any():
                return denoiser(x, t, labels)
        x0_both, eps_both = denoiser(torch.cat([x, x]), torch.cat([t, t]), both_labels)
        (x0_c, x0_u), (eps_c, eps_u) = x0_both.chunk(2), eps_both.chunk(2)
        x0, eps = (1 + w) * x0_c - w * x0_u, (1 + w) * eps_c - w * eps_u
        if rescale > 0:
            x0 = rescale_guidance(x0, x0_c, rescale)
            eps = denoiser.eps_from_x0(x, t, x0)
        if inside is not None:
            keep = inside.view(-1, *([1] * (x.ndim - 1)))
            x0, eps = torch.where(keep, x0, x0_c), torch.where(keep, eps, eps_c)
        return x0, eps

    return model_fn


def guidance_usable(p_uncond: float, guidance_scale: float, conditional: bool = True) -> bool:
    """The rule, written once: guided sampling (w > 0) needs a model trained with label dropout (p_uncond > 0);
    otherwise its unconditional prediction never saw the null label and is untrained."""
    return not (conditional and guidance_scale > 0 and p_uncond <= 0)


def check_guidance(p_uncond: float, guidance_scale: float, conditional: bool = True, rescale: float = 0.0,
                   interval: tuple[float, float] | None = None) -> None:
    """ConfigError, one line per problem, for sampling settings that cannot work."""
    if guidance_scale < 0:
        raise ConfigError(f"guidance.scale={guidance_scale}: must be >= 0 (0 = purely conditional)")
    if not guidance_usable(p_uncond, guidance_scale, conditional):
        raise ConfigError(
            f"guidance.scale={guidance_scale} needs a model trained with guidance.p_uncond > 0; with p_uncond=0 "
            "it never saw the null label. Set guidance.scale=0 or train with e.g. guidance.p_uncond=0.1"
        )
    check_rescale(rescale)
    check_interval(interval)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_rescale(rescale: float) -> None:
    """The one rule of rescaled CFG's phi (``guidance.rescale``): a number in [0, 1]."""
    if not (_number(rescale) and 0 <= rescale <= 1):
        raise ConfigError(f"guidance.rescale={rescale}: must be in [0, 1] (0: off; Lin et al. use 0.7)")


def check_interval(interval) -> None:
    """The one rule of the guidance interval (``guidance.interval``): null, or [sigma_lo, sigma_hi] with
    0 <= sigma_lo < sigma_hi."""
    ok = interval is None or (isinstance(interval, (list, tuple)) and len(interval) == 2 and all(_number(v) for v in interval)
                              and 0 <= interval[0] < interval[1])
    if not ok:
        raise ConfigError(f"guidance.interval={interval}: must be null or [sigma_lo, sigma_hi] with "
                          "0 <= sigma_lo < sigma_hi (EDM noise levels sigma_t / alpha_t, e.g. [0.28, 5.42])")


@dataclass(frozen=True)
class Guidance:
    """How to guide at sampling time: w (``scale``), rescaled CFG's phi (``rescale``) and the sigma ``interval``."""

    scale: float = 0.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def check(self, p_uncond: float, conditional: bool = True) -> None:
        """ConfigError, one line, when this guidance cannot work on a model trained with ``p_uncond``."""
        check_guidance(p_uncond, self.scale, conditional, self.rescale, self.interval)
