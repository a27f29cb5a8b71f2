"""What every guidance method shares (the package docstring says what guidance is here): label dropout, rescaled CFG,
the ``GuidanceMethod`` base and its registry ``METHODS``, and ``Guidance``, which makes the model function every
sampler calls."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from ddpm.core.denoiser import Denoiser
from ddpm.core.errors import ConfigError
from ddpm.core.samplers import ModelFn
from ddpm.core.settings import Registry, number, require, settings_of

METHODS = Registry("guidance.method")


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


@dataclass(frozen=True)
class GuidanceMethod:
    """A guidance method (see the module docstring): ``combine`` turns the conditional prediction and the second one into
    the guided (x_0, eps). Class attributes say what it needs: ``unconditional`` (the second prediction is the network's
    at the null label, so the model must have been trained with label dropout), ``zero_is_conditional`` (w = 0 is the
    conditional model), ``renoise_with_eps`` (DDIM renoises with the method's eps, not the one of its x_0) and
    ``samplers`` (the samplers it is defined for; None: every one)."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    unconditional: ClassVar[bool] = True
    zero_is_conditional: ClassVar[bool] = True
    renoise_with_eps: ClassVar[bool] = False
    samplers: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            METHODS.add(cls)

    def settings(self) -> dict:
        return settings_of(self)

    def check_scale(self, scale: float) -> None:
        """The rule of w for this method beyond w >= 0 (none but CFG++'s)."""

    def check_sampler(self, sampler: str, eta: float = 0.0) -> None:
        if self.samplers is not None and (sampler not in self.samplers or eta != 0):
            raise ConfigError(f"guidance.method={self.name} with sampler={sampler}" + (f" (eta={eta})" if eta else "") +
                              f": {self.name} is defined for {list(self.samplers)} with sampler.eta=0 only")

    def start(self) -> Any:
        """The state of one sampling run (APG's running average); None for a method without one."""
        return None

    def combine(self, w: float, cond: tuple, other: tuple, x: torch.Tensor, t: torch.Tensor, denoiser: Denoiser,
                state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def method_of(method: GuidanceMethod | str) -> GuidanceMethod:
    """A method given by name (its default settings) or as an instance."""
    return method if isinstance(method, GuidanceMethod) else METHODS.get_option(method)()


@dataclass(frozen=True)
class Guidance:
    """How to guide at sampling time: w (``scale``), rescaled CFG's phi (``rescale``), the sigma ``interval``, the
    ``method`` (a name, or an instance with its settings) and, for autoguidance, the ``guide`` denoiser (or a loaded
    model). Checked as it is made (each value in one line naming its key)."""

    scale: float = 0.0
    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    method: GuidanceMethod | str = "cfg"
    guide: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", method_of(self.method))
        require(number(self.scale) and self.scale >= 0, "guidance.scale", self.scale, "a number >= 0 (0 = purely conditional)")
        self.method.check_scale(self.scale)
        require(number(self.rescale) and 0 <= self.rescale <= 1, "guidance.rescale", self.rescale,
                "a number in [0, 1] (0: off; Lin et al. use 0.7)")
        interval = self.interval
        ok = interval is None or (isinstance(interval, (list, tuple)) and len(interval) == 2
                                  and all(number(v) for v in interval) and 0 <= interval[0] < interval[1])
        require(ok, "guidance.interval", interval, "null or [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (EDM noise "
                "levels sigma_t / alpha_t, e.g. [0.28, 5.42])")
        if interval is not None:
            object.__setattr__(self, "interval", (float(interval[0]), float(interval[1])))

    def usable(self, p_uncond: float, conditional: bool = True) -> bool:
        """Whether a model trained with ``p_uncond`` can be guided so: the unconditional branch (cfg, apg at w > 0;
        cfgpp at every lambda) needs label dropout, else the null label was never seen."""
        uses_unconditional = self.method.unconditional and (self.scale > 0 or not self.method.zero_is_conditional)
        return not (conditional and uses_unconditional and p_uncond <= 0)

    def check(self, p_uncond: float, conditional: bool = True) -> None:
        """ConfigError, one line, when this guidance cannot work on a model trained with ``p_uncond``."""
        if not self.usable(p_uncond, conditional):
            raise ConfigError(f"guidance.scale={self.scale}: must be 0 when guidance.p_uncond=0 (guidance.scale={self.scale} "
                              "needs a model trained with guidance.p_uncond > 0; with p_uncond=0 it never saw the null label). "
                              "Set guidance.scale=0 or train with e.g. guidance.p_uncond=0.1")
        if not self.method.unconditional and self.guide is None and self.scale > 0:
            raise ConfigError(f"guidance.method={self.method.name} needs a guide (guidance.guide): a weaker model of the same run")

    def check_sampler(self, sampler: str, eta: float = 0.0) -> None:
        self.method.check_sampler(sampler, eta)

    def protocol(self) -> dict:
        """What an evaluation records of it: w, rescale, interval, the method's name and its settings."""
        settings = self.method.settings()
        return {"guidance_scale": float(self.scale), "guidance_rescale": float(self.rescale),
                "guidance_interval": None if self.interval is None else list(self.interval),
                "guidance_method": self.method.name, **({self.method.name: settings} if settings else {})}

    def model_fn(self, denoiser: Denoiser, labels: torch.Tensor | None) -> ModelFn:
        """The denoiser as model_fn(x_t, t, **cond) -> (x_0, eps), the one function every sampler calls (``cond``: a
        second time r, for the samplers of MeanFlow's average velocity). Its ``learned_variance`` says whether the model
        learned its reverse variance; then ``model_fn(x_t, t, with_variance=True)`` returns (x_0, eps, v), v the
        conditional model's variance output (ancestral DDPM reads it: ``ddpm.core.samplers.ddpm``).

        An unconditional network ignores labels (and w, unless a guide guides it). For the methods whose second
        prediction is the unconditional one, both halves run as one batched forward pass, skipped when no sample of the
        batch is inside the interval (sigma_t / alpha_t in (sigma_lo, sigma_hi]; the plain conditional prediction
        outside it). The method's state (APG's running average) lives in this model_fn: one per sampling run."""
        method, w, rescale, interval = self.method, self.scale, self.rescale, self.interval
        net = denoiser.net
        conditional = getattr(net, "num_classes", None) is not None
        guide = getattr(self.guide, "denoiser", self.guide)  # a loaded model or a denoiser
        if not method.unconditional:
            if guide is None:
                raise ConfigError(f"guidance.method={method.name} needs a guide (guidance.guide): a weaker model of the same run")
            method.check_guide(denoiser, guide)
        if conditional and labels is None:
            raise ConfigError("a class-conditional model needs labels to sample")
        labels = labels if conditional else None
        if (w == 0 and method.zero_is_conditional) or (not conditional and method.unconditional):
            def plain(x: torch.Tensor, t: torch.Tensor, **cond):
                return denoiser(x, t, labels, **cond)
            plain.learned_variance = denoiser.learns_variance
            return plain

        both_labels = None if labels is None else torch.cat([labels, torch.full_like(labels, net.null_label)])
        state = method.start()

        def model_fn(x: torch.Tensor, t: torch.Tensor, with_variance: bool = False, **cond):
            inside = None
            if interval is not None:
                alpha_t, sigma_t = denoiser.process.alpha_sigma(t)
                sigma = sigma_t / alpha_t  # float64; inf at alpha = 0
                inside = (sigma > interval[0]) & (sigma <= interval[1])
                if not inside.any():
                    return denoiser(x, t, labels, with_variance=with_variance, **cond)
            if method.unconditional:  # one network at two labels: one batched forward pass
                both = {key: torch.cat([value, value]) for key, value in cond.items()}
                x0_both, eps_both, v_both = denoiser(torch.cat([x, x]), torch.cat([t, t]), both_labels, with_variance=True,
                                                     **both)
                (x0_c, x0_o), (eps_c, eps_o) = x0_both.chunk(2), eps_both.chunk(2)
                v_c = None if v_both is None else v_both.chunk(2)[0]
            else:  # two networks: two forward passes
                x0_c, eps_c, v_c = denoiser(x, t, labels, with_variance=True, **cond)
                x0_o, eps_o = guide(x, t, labels, **cond)
            x0, eps = method.combine(w, (x0_c, eps_c), (x0_o, eps_o), x, t, denoiser, state)
            if rescale > 0:
                x0 = rescale_guidance(x0, x0_c, rescale)
                eps = eps if method.renoise_with_eps else denoiser.eps_from_x0(x, t, x0)
            if inside is not None:
                keep = inside.view(-1, *([1] * (x.ndim - 1)))
                x0, eps = torch.where(keep, x0, x0_c), torch.where(keep, eps, eps_c)
            # a learned variance is the conditional model's, guided or not (GLIDE's sampling code does the same)
            return (x0, eps, v_c) if with_variance else (x0, eps)

        model_fn.renoise_with_eps = method.renoise_with_eps
        model_fn.learned_variance = denoiser.learns_variance
        return model_fn


# --- functions over the same objects, as scripts and the tests call them ------------------------------------------
def guided(denoiser: Denoiser, labels: torch.Tensor | None, guidance_scale: float = 0.0, rescale: float = 0.0,
           interval: tuple[float, float] | None = None, method: str | GuidanceMethod = "cfg",
           apg: GuidanceMethod | None = None, guide: Denoiser | None = None) -> ModelFn:
    """``Guidance(guidance_scale, rescale, interval, method, guide).model_fn(denoiser, labels)``; ``apg``: APG's settings
    (an ``APG``), when ``method="apg"``."""
    chosen = apg if (method == "apg" and apg is not None) else method
    return Guidance(guidance_scale, rescale, interval, chosen, guide).model_fn(denoiser, labels)


def check_guidance(p_uncond: float, guidance_scale: float, conditional: bool = True, rescale: float = 0.0,
                   interval: tuple[float, float] | None = None, method: str | GuidanceMethod = "cfg",
                   apg: GuidanceMethod | None = None) -> None:
    """ConfigError, one line, for sampling settings that cannot work on a model trained with ``p_uncond``."""
    chosen = apg if (method == "apg" and apg is not None) else method
    guidance = Guidance(guidance_scale, rescale, interval, chosen)
    if guidance.method.unconditional:
        guidance.check(p_uncond, conditional)


def check_sampler_for(method: str | GuidanceMethod, sampler: str, eta: float = 0.0) -> None:
    """The rule between a guidance method and a sampler (CFG++ is defined for DDIM at eta = 0)."""
    method_of(method).check_sampler(sampler, eta)


def guidance_usable(p_uncond: float, guidance_scale: float, conditional: bool = True, method: str = "cfg") -> bool:
    """``Guidance.usable``, for a method by name."""
    return Guidance(guidance_scale, method=method).usable(p_uncond, conditional)
