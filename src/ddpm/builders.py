"""A run's config, as plain data, into the core's objects: the network, the process, the denoiser and the sampler.

No Hydra: training (``ddpm.build``, from the composed config) and the Python API (``ddpm.load``, from a checkpoint's
rebuilt config) build through these same functions. ``build`` only calls the callables that this project's option
files name (``ddpm.options.shipped_targets``); which one a node names was settled by ``ddpm.checkpoints`` for a file.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

from torch import nn

from ddpm.core.backbone import check_backbone
from ddpm.core.denoiser import Denoiser
from ddpm.core.diffusion import DDPMProcess
from ddpm.core.processes import Process
from ddpm.core.errors import ConfigError
from ddpm.core.guidance import APG, Guidance
from ddpm.core.schedules import rescale_zero_terminal_snr
from ddpm.options import shipped_targets

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
    return functools.partial(target, **arguments) if node.get("_partial_") else target(**arguments)


def build_net(model: dict, **kwargs) -> nn.Module:
    """The network of the ``model`` group, checked against the backbone contract; ``model.compile`` is a training
    option, not a network argument."""
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


def build_denoiser(config: dict) -> Denoiser:
    """The denoiser of a run's config (its model, schedule, diffusion, guidance and data nodes)."""
    conditional = config["guidance"]["conditional"]
    num_classes = config["data"]["num_classes"] if conditional else None
    diffusion = config.get("diffusion", {})
    return Denoiser(build_net(config["model"], num_classes=num_classes), build_process(config),
                    diffusion.get("prediction", "eps"), diffusion.get("loss_weight", "uniform"),
                    diffusion.get("min_snr_gamma", 5.0))


def build_sampler(node: dict) -> Callable:
    """A sampler of the ``sampler`` group as a partial (``sampler(model_fn, diffusion, noise, ...)``)."""
    return build(node, "sampler")


# The `guidance` node holds two things: how the model is trained (label dropout) and how its run samples by default.
def label_dropout(guidance: dict) -> float:
    """Training: p_uncond, the probability a label becomes the null label (0 for an unconditional model)."""
    return float(guidance.get("p_uncond", 0.0)) if guidance.get("conditional") else 0.0


def build_guidance(guidance: dict) -> Guidance:
    """Sampling: the run's guidance (w, rescale, interval), what its grids, quality curve and final evaluation use and
    what ``ddpm.load``'s model and ``ddpm.sample`` use unless told otherwise."""
    interval, apg = guidance.get("interval"), guidance.get("apg") or {}
    return Guidance(float(guidance.get("scale", 0.0)), float(guidance.get("rescale", 0.0)),
                    None if interval is None else (float(interval[0]), float(interval[1])),
                    method=guidance.get("method", "cfg"), apg=APG(**{k: float(v) for k, v in apg.items()}))
