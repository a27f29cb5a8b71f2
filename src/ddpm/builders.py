"""A run's config, as plain data, into the core's objects: the network, the process, the denoiser and the sampler.

No Hydra: training (``ddpm.training.assemble``, from the composed config) and the Python API (``ddpm.load``, from a checkpoint's
rebuilt config) build through these same functions. ``build`` only calls the callables that this project's option
files name (``ddpm.options.shipped_targets``); which one a node names was settled by ``ddpm.checkpoints`` for a file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable

from torch import nn

from ddpm.core.backbone import check_backbone
from ddpm.core.denoiser import Denoiser
from ddpm.core.objectives import Objective
from ddpm.core.objectives.denoising import Denoising
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.processes import Process
from ddpm.core.errors import ConfigError
from ddpm.core.guidance import METHODS, Guidance  # noqa: F401  (Guidance: validation builds the defaults)
from ddpm.core.settings import number, require
from ddpm.core.samplers import Sampler
from ddpm.core.schedules import rescale_zero_terminal_snr
from ddpm.core.variance import check_variance
from ddpm.options import FROM_CHECKPOINT, merge, read_option, shipped_targets

# Keys of an option node that are not arguments of its callable.
NOT_ARGUMENTS = {"model": ("compile",), "schedule": ("zero_terminal_snr",), "sampler": ("precision", "compile")}


def resolve_target(target: str) -> Callable:
    """The callable a ``_target_`` names, if one of this project's option files names it."""
    if target not in shipped_targets()["*"]:
        raise ConfigError(f"_target_={target!r}: not one of the callables conf/ names; refusing to import it")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build(node: dict, group: str = "", **kwargs) -> Any:
    """Hydra's ``instantiate`` for a flat option node read as plain data: ``_target_`` called with the node's other
    keys (less ``NOT_ARGUMENTS[group]``) and ``kwargs``; with ``_partial_: true``, a ``functools.partial`` of it."""
    skip = NOT_ARGUMENTS.get(group, ())
    arguments = {k: v for k, v in node.items() if not k.startswith("_") and k not in skip}
    nested = [k for k, v in arguments.items() if isinstance(v, dict) and "_target_" in v]
    if nested or set(k for k in node if k.startswith("_")) - {"_target_", "_partial_"}:
        raise ConfigError(f"{group or 'config'}: ddpm.builders builds flat option nodes only (found {nested or list(node)})")
    target = resolve_target(node["_target_"])
    arguments.update(kwargs)
    if node.get("_partial_"):
        return functools.partial(target, **arguments)
    try:
        return target(**arguments)
    except TypeError as error:  # a key the option does not have (an old checkpoint's, a typo added with +)
        raise ConfigError(f"{group or 'config'}: {str(error).splitlines()[0]}") from None


def build_net(model: dict, device: str | None = None, **kwargs) -> nn.Module:
    """The network of the ``model`` group, checked against the backbone contract; ``model.compile`` is a training
    option, not a network argument. ``device="meta"``: built without memory or compute (its constructor's checks run)."""
    import torch

    with torch.device(device) if device is not None else contextlib.nullcontext():
        net = build(model, "model", **kwargs)
    check_backbone(net, f"model._target_={model['_target_']}")
    return net


def build_process(config: dict) -> Process:
    """The process of a run's config: its ``process`` node (none, in a checkpoint from before processes: DDPM), and for
    the discrete process the betas of its ``schedule`` node, rescaled to zero terminal SNR when
    ``schedule.zero_terminal_snr`` (a rescale of any schedule, so a key of each option, read here rather than passed to
    the schedule function). A schedule with a continuous process is refused: nothing would read it."""
    process, schedule = config.get("process"), config.get("schedule")
    if check_schedule_for(process, schedule):
        betas = build_betas(schedule)
        return DDPMProcess(betas) if process is None else build(process, "process", betas=betas)
    return build(process, "process")


def build_betas(schedule: dict):
    """The betas of a ``schedule`` node, rescaled to zero terminal SNR when ``schedule.zero_terminal_snr``."""
    require(isinstance(schedule.get("zero_terminal_snr", False), bool), "schedule.zero_terminal_snr",
            schedule.get("zero_terminal_snr"), "true or false")
    betas = build(schedule, "schedule")
    return rescale_zero_terminal_snr(betas) if schedule.get("zero_terminal_snr", False) else betas


def check_schedule_for(process: dict | None, schedule: dict | None) -> bool:
    """The one rule between the ``process`` and ``schedule`` groups: the discrete process needs a schedule, the
    continuous ones (their path is their own) refuse one. Returns whether the process is discrete."""
    discrete = process is None or getattr(resolve_target(process["_target_"]), "discrete", False)
    name = "ddpm" if process is None else getattr(resolve_target(process["_target_"]), "name", process["_target_"])
    if discrete and not schedule:
        raise ConfigError(f"process={name} needs a noise schedule: schedule=linear | cosine | sigmoid | cosine_zero_terminal_snr")
    if not discrete and schedule:
        target = str(schedule.get("_target_", "?")).rsplit(".", 1)[-1]
        raise ConfigError(f"schedule ({target}) with process={name}: a {name} process defines its own path, so no "
                          "schedule is read; drop schedule= (or use process=ddpm)")
    return discrete


def build_denoiser(config: dict, device: str | None = None) -> Denoiser:
    """The denoiser of a run's config (its model, schedule, diffusion, objective, guidance and data nodes); the
    network's class embedding covers ``model.num_classes`` labels (the data's, unless set; none for an unconditional
    model), and it embeds a second time when the objective asks for one."""
    num_classes = network_classes(config)
    diffusion = config.get("diffusion", {})
    objective, process, prediction = build_objective(config), build_process(config), diffusion.get("prediction", "eps")
    objective.check(process, prediction)
    variance = diffusion.get("variance", "fixed_small")  # none in a checkpoint from before learned variances
    check_variance(variance)
    objective.check_variance(variance)
    extra = {"second_time": True} if objective.second_time else {}
    if variance == "learned_range":  # iDDPM: the network outputs the variance's interpolation v as a second half
        extra["out_channels"] = 2 * config["model"]["in_channels"]
    net = build_net(config["model"], device=device, num_classes=num_classes, **extra)
    return Denoiser(net, process, prediction, diffusion.get("loss_weight", "uniform"),
                    diffusion.get("min_snr_gamma", 5.0), boundary=objective.boundary, variance=variance,
                    vlb_weight=diffusion.get("vlb_weight", 0.001))


def build_objective(config: dict) -> Objective:
    """The training objective of a run's config (none, in a checkpoint from before objectives: denoising)."""
    node = config.get("objective")
    return Denoising() if not node else build(node, "objective")


def network_classes(config: dict) -> int | None:
    """The labels the network embeds: ``model.num_classes`` as set (the data's by default: conf/model/*.yaml), none for
    an unconditional model (``guidance.conditional=false``)."""
    if not config["guidance"].get("conditional"):
        return None
    return config["model"].get("num_classes", config["data"]["num_classes"])


def build_sampler(node: dict) -> Sampler:
    """A sampler of the ``sampler`` group (``ddpm.core.samplers``): its settings checked as it is made."""
    return build(node, "sampler")


# The `guidance` node holds two things: how the model is trained (label dropout) and how its run samples by default.
def label_dropout(guidance: dict) -> float:
    """Training: p_uncond, the probability a label becomes the null label (0 for an unconditional model)."""
    require(isinstance(guidance.get("conditional", True), bool), "guidance.conditional", guidance.get("conditional"), "true or false")
    p_uncond = guidance.get("p_uncond", 0.0)
    require(number(p_uncond) and 0 <= p_uncond < 1, "guidance.p_uncond", p_uncond, "a probability in [0, 1)")
    return float(p_uncond) if guidance.get("conditional") else 0.0


def build_guidance(guidance: dict) -> Guidance:
    """Sampling: the run's guidance (w, rescale, interval, the method with its settings: ``guidance.<method>.*``), what
    its grids, quality curve and final evaluation use and what ``ddpm.load``'s model and ``ddpm.sample`` use unless told
    otherwise. Each part checks its own values."""
    method = METHODS.get_option(guidance.get("method", "cfg"))
    settings = guidance.get(method.name) or {}
    try:
        chosen = method(**settings)
    except TypeError as error:  # a setting the method does not have
        raise ConfigError(f"guidance.{method.name}: {str(error).splitlines()[0]}") from None
    return Guidance(guidance.get("scale", 0.0), guidance.get("rescale", 0.0), guidance.get("interval"), chosen)


def guidance_node(guidance: Guidance) -> dict:
    """The config node of a ``Guidance`` (``build_guidance`` of it gives it back)."""
    node = {"scale": guidance.scale, "rescale": guidance.rescale,
            "interval": None if guidance.interval is None else list(guidance.interval), "method": guidance.method.name}
    settings = guidance.method.settings()
    return {**node, guidance.method.name: settings} if settings else node


def from_checkpoint(saved: dict, given: dict) -> dict:
    """``given`` (a sampling command's guidance node) over ``saved`` (the checkpoint's): every leaf of ``given`` that is
    FROM_CHECKPOINT takes ``saved``'s value, or conf/guidance/cfg.yaml's default where the checkpoint never chose one
    (the settings of a method it did not use); the rest is ``given``'s."""
    def pick(saved, given):
        if isinstance(given, dict):
            saved = saved if isinstance(saved, dict) else {}
            return {**saved, **{k: pick(saved.get(k), v) for k, v in given.items()}}
        return saved if given == FROM_CHECKPOINT else given

    defaults = {k: v for k, v in read_option("guidance", "cfg").items() if k not in ("conditional", "p_uncond")}
    return pick(merge(defaults, saved), given)
