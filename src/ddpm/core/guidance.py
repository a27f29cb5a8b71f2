"""Guidance at sampling time, and the label dropout classifier-free guidance needs at training (Ho & Salimans 2022).

Methods (``guidance.method``): ``cfg``, classifier-free guidance; ``apg``, adaptive projected guidance (Sadat et al.
2024), CFG's update with its part parallel to the conditional prediction scaled down; ``cfgpp``, CFG++ (Chung et al.
2024), DDIM from x0_u + lambda (x0_c - x0_u) renoised with the unconditional eps, lambda = w in [0, 1];
``autoguidance`` (Karras et al. 2024), guiding with a weaker version of the model itself instead of the unconditional
branch. On top of any of them:
rescaled CFG (Lin et al. 2024, sec. 3.4) and a guidance interval (Kynkaanniemi et al. 2024).

Convention: ``guidance_scale`` is the paper's w,
    x0_guided = (1 + w) * x0(x_t, y) - w * x0(x_t, null)     (and the same for eps),
so w = 0 is the purely conditional model, for cfg, apg and autoguidance. HuggingFace diffusers writes the same rule
as eps_u + s * (eps_c - eps_u) with s = 1 + w: our w = 2 is their guidance_scale = 3. Guiding x_0 or eps is the same
thing (at a fixed x_t they are affine in each other, with weights that sum to 1), so it does not depend on what the
network predicts. CFG++'s scale is its own lambda in [0, 1] (Chung et al. 2024): x0 = x0_u + lambda (x0_c - x0_u),
renoised with eps_u, continuous in lambda, so lambda = 0 is the unconditional model (and no lambda is the conditional
one: that renoises with eps_c).

APG, as here and in the paper's code, adds w times its update to the conditional x_0: x0_c + w * update. diffusers'
``AdaptiveProjectedGuidance`` applies it to the pipeline's raw prediction (eps, or the flow velocity) as
pred_c + (s - 1) * update with s its guidance_scale: the same rule with s = 1 + w on a different parameterisation, so
their numbers match ours for an x0-predicting model only.
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


GUIDANCE_METHODS = ("cfg", "apg", "cfgpp", "autoguidance")
CFGPP_SAMPLERS = ("ddim",)  # CFG++ is defined for the DDIM (Euler) update, with eta = 0


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance's settings (Sadat et al. 2024, Algorithm 1; the defaults of their code)."""

    momentum: float = -0.75      # beta: each update is added to beta times the previous ones (negative: against them)
    norm_threshold: float = 2.5  # r: the update's norm per sample is capped at r (0: no cap)
    eta: float = 0.0             # weight of the update's part parallel to the conditional prediction (1: CFG's)


def apg_update(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, settings: APG, history: list) -> torch.Tensor:
    """APG's guidance direction (Sadat et al. 2024, eq. 7-12): Delta = D_cond - D_uncond, plus beta times the running
    average kept in ``history`` (one entry, updated in place), capped at norm r, then split into its parts parallel and
    orthogonal to D_cond and recombined as Delta_orth + eta Delta_par. The guided prediction is D_cond + w * this."""
    delta = x0_cond - x0_uncond
    if settings.momentum != 0:
        if history:
            delta = delta + settings.momentum * history[0]
        history[:] = [delta]
    shape = (-1, *([1] * (delta.ndim - 1)))
    if settings.norm_threshold > 0:
        norm = delta.flatten(1).norm(dim=1).view(shape)
        delta = delta * (settings.norm_threshold / norm).clamp(max=1)  # a zero update (norm 0) is kept as it is
    d, c = delta.double(), x0_cond.double()
    unit = c / c.flatten(1).norm(dim=1).clamp(min=torch.finfo(torch.float64).tiny).view(shape)
    parallel = (d * unit).flatten(1).sum(1).view(shape) * unit
    return ((d - parallel) + settings.eta * parallel).to(delta.dtype)


def check_guide(denoiser: Denoiser, guide: Denoiser) -> None:
    """Autoguidance's guide must be a model of the same data and process: ConfigError, one line, naming what differs."""
    mine, theirs = denoiser.net, guide.net
    for name in ("in_channels", "image_size", "num_classes"):
        if getattr(mine, name, None) != getattr(theirs, name, None):
            raise ConfigError(f"guidance.guide: its {name} is {getattr(theirs, name, None)}, the model's "
                              f"{getattr(mine, name, None)}: a guide must be a model of the same data")
    if not denoiser.process.same_path(guide.process):
        raise ConfigError(f"guidance.guide: its process ({guide.process.name}, {guide.process.settings()}) differs from "
                          f"the model's ({denoiser.process.name}, {denoiser.process.settings()}; for ddpm: its schedule): "
                          "a guide must share it")


def guided(denoiser: Denoiser, labels: torch.Tensor | None, guidance_scale: float = 0.0, rescale: float = 0.0,
           interval: tuple[float, float] | None = None, method: str = "cfg", apg: "APG" = APG(),
           guide: Denoiser | None = None) -> ModelFn:
    """The denoiser as model_fn(x_t, t) -> (x_0, eps), the one function every sampler calls.

    ``method``: cfg (x0 = (1 + w) x0_cond - w x0_uncond), apg (x0 = x0_cond + w ``apg_update``; its momentum
    history lives in this model_fn, so one per sampling run), cfgpp (x0 = x0_uncond + w (x0_cond - x0_uncond) with
    eps = eps_uncond, which DDIM renoises with: the model_fn is marked ``renoise_with_eps``; w is CFG++'s lambda, and
    w = 0 its unconditional model) or autoguidance (x0 = (1 + w) x0_main - w x0_guide, both conditional; ``guide`` is
    the weaker model). w = 0 is the conditional model for cfg, apg and autoguidance. ``rescale``: phi of rescaled
    CFG. ``interval``: (sigma_lo,
    sigma_hi); guidance only where the noise level sigma = sigma_t / alpha_t (EDM's) is in (sigma_lo, sigma_hi], the
    plain conditional prediction elsewhere (Kynkaanniemi et al. 2024). For cfg and apg the conditional and
    unconditional halves run as one batched forward pass (skipped when no sample of the batch is inside the interval).
    An unconditional network ignores labels, and w unless guided by a guide.
    """
    check_method(method)
    net = denoiser.net
    conditional = getattr(net, "num_classes", None) is not None
    if method == "autoguidance":
        if guide is None:
            raise ConfigError("guidance.method=autoguidance needs a guide (guidance.guide): a weaker model of the same run")
        check_guide(denoiser, guide)
    if conditional and labels is None:
        raise ConfigError("a class-conditional model needs labels to sample")
    labels = labels if conditional else None
    if (guidance_scale == 0 and method != "cfgpp") or (not conditional and method != "autoguidance"):
        return lambda x, t: denoiser(x, t, labels)

    both_labels = None if labels is None else torch.cat([labels, torch.full_like(labels, net.null_label)])
    w, history = guidance_scale, []

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inside = None
        if interval is not None:
            alpha_t, sigma_t = denoiser.process.alpha_sigma(t)
            sigma = sigma_t / alpha_t  # float64; inf at alpha = 0
            inside = (sigma > interval[0]) & (sigma <= interval[1])
            if not inside.any():
                return denoiser(x, t, labels)
        if method == "autoguidance":  # two different networks: two forward passes
            (x0_c, eps_c), (x0_g, eps_g) = denoiser(x, t, labels), guide(x, t, labels)
            x0, eps = (1 + w) * x0_c - w * x0_g, (1 + w) * eps_c - w * eps_g
        else:
            x0_both, eps_both = denoiser(torch.cat([x, x]), torch.cat([t, t]), both_labels)
            (x0_c, x0_u), (eps_c, eps_u) = x0_both.chunk(2), eps_both.chunk(2)
            if method == "cfg":
                x0, eps = (1 + w) * x0_c - w * x0_u, (1 + w) * eps_c - w * eps_u
            elif method == "cfgpp":  # Chung et al. 2024, Algorithm 1: x0 at lambda = w, the unconditional eps
                x0, eps = x0_u + w * (x0_c - x0_u), eps_u
            else:
                x0 = x0_c + w * apg_update(x0_c, x0_u, apg, history)
                eps = denoiser.eps_from_x0(x, t, x0)
        if rescale > 0:
            x0 = rescale_guidance(x0, x0_c, rescale)
            eps = eps if method == "cfgpp" else denoiser.eps_from_x0(x, t, x0)
        if inside is not None:
            keep = inside.view(-1, *([1] * (x.ndim - 1)))
            x0, eps = torch.where(keep, x0, x0_c), torch.where(keep, eps, eps_c)
        return x0, eps

    model_fn.renoise_with_eps = method == "cfgpp"
    return model_fn


def check_method(method: str) -> None:
    """The one rule of ``guidance.method``."""
    if method not in GUIDANCE_METHODS:
        raise ConfigError(f"guidance.method={method!r}: must be one of {list(GUIDANCE_METHODS)}")


def check_scale(scale: float, method: str = "cfg") -> None:
    """The one rule of ``guidance.scale``: w >= 0, and CFG++'s lambda at most 1."""
    if not (_number(scale) and scale >= 0):
        raise ConfigError(f"guidance.scale={scale}: must be >= 0 (0 = purely conditional)")
    if method == "cfgpp" and scale > 1:
        raise ConfigError(f"guidance.scale={scale} with guidance.method=cfgpp: CFG++'s lambda must be in [0, 1] "
                          "(Chung et al. 2024)")


def check_sampler_for(method: str, sampler: str, eta: float = 0.0) -> None:
    """CFG++ is defined for the DDIM update at eta = 0: ConfigError, one line, for any other sampler."""
    if method == "cfgpp" and (sampler not in CFGPP_SAMPLERS or eta != 0):
        raise ConfigError(f"guidance.method=cfgpp with sampler={sampler}" + (f" (eta={eta})" if eta else "") +
                          f": CFG++ is defined for {list(CFGPP_SAMPLERS)} with sampler.eta=0 only (its renoising step)")


def check_apg(settings: APG) -> None:
    """The rules of APG's settings: momentum in (-1, 1) (a running average that cannot grow without bound), r >= 0,
    eta in [0, 1]."""
    if not (_number(settings.momentum) and -1 < settings.momentum < 1):
        raise ConfigError(f"guidance.apg.momentum={settings.momentum}: must be in (-1, 1) (Sadat et al. use -0.75; 0: off)")
    if not (_number(settings.norm_threshold) and settings.norm_threshold >= 0):
        raise ConfigError(f"guidance.apg.norm_threshold={settings.norm_threshold}: must be >= 0 (0: no cap)")
    if not (_number(settings.eta) and 0 <= settings.eta <= 1):
        raise ConfigError(f"guidance.apg.eta={settings.eta}: must be in [0, 1] (0: orthogonal part only; 1: CFG's update)")


def guidance_usable(p_uncond: float, guidance_scale: float, conditional: bool = True, method: str = "cfg") -> bool:
    """The rule, written once: guiding with the unconditional branch (cfg, apg at w > 0; cfgpp at every lambda) needs a
    model trained with label dropout (p_uncond > 0); otherwise its unconditional prediction never saw the null label
    and is untrained. Autoguidance needs no unconditional branch."""
    uses_unconditional = guidance_scale > 0 or method == "cfgpp"
    return method == "autoguidance" or not (conditional and uses_unconditional and p_uncond <= 0)


def check_guidance(p_uncond: float, guidance_scale: float, conditional: bool = True, rescale: float = 0.0,
                   interval: tuple[float, float] | None = None, method: str = "cfg", apg: APG = APG()) -> None:
    """ConfigError, one line per problem, for sampling settings that cannot work."""
    check_method(method)
    check_apg(apg)
    check_scale(guidance_scale, method)
    if not guidance_usable(p_uncond, guidance_scale, conditional, method):
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
    """How to guide at sampling time: w (``scale``), rescaled CFG's phi (``rescale``), the sigma ``interval``, the
    ``method`` with its settings (``apg``) and, for autoguidance, the ``guide`` denoiser."""

    scale: float = 0.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    method: str = "cfg"
    apg: APG = APG()
    guide: Denoiser | None = None

    def check(self, p_uncond: float, conditional: bool = True) -> None:
        """ConfigError, one line, when this guidance cannot work on a model trained with ``p_uncond``."""
        check_guidance(p_uncond, self.scale, conditional, self.rescale, self.interval, self.method, self.apg)
        if self.method == "autoguidance" and self.guide is None and self.scale > 0:
            raise ConfigError("guidance.method=autoguidance needs a guide (guidance.guide): a weaker model of the same run")

    def model_fn(self, denoiser: Denoiser, labels: torch.Tensor | None) -> ModelFn:
        """``guided(denoiser, labels, ...)`` with these settings."""
        return guided(denoiser, labels, self.scale, self.rescale, self.interval, self.method, self.apg, self.guide)
