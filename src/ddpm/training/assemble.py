"""Config -> the training objects: the one place (with the entry points) that calls Hydra's ``instantiate``.

The LightningModule receives its parts built (the lightning-hydra-template habit), so it can be constructed by hand
from plain objects. The network, process and sampler are built by ``ddpm.builders`` from the resolved config, the same
functions ``ddpm.load`` builds a checkpoint's model with; the optimizer, loggers and trainer parts here.
"""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.builders import build_denoiser, build_guidance, build_objective, build_sampler, label_dropout
from ddpm.core.errors import ConfigError
from ddpm.training.module import DiffusionModule


def build_module(cfg: DictConfig, choices: dict[str, str] | None = None) -> DiffusionModule:
    """The LightningModule of a composed training config (groups model, schedule, diffusion, guidance, sampler, optim);
    ``choices``: the group options it was composed from, recorded in its checkpoints (``recorded_choices``)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return DiffusionModule(
        denoiser=build_denoiser(config),
        sampler=build_sampler(config["sampler"]),
        optimizer=instantiate(cfg.optim.optimizer),
        warmup_steps=cfg.optim.warmup_steps,
        ema_decay=cfg.ema.decay,
        ema_warmup=cfg.ema.get("warmup", False),
        power_ema_sigma_rels=tuple(cfg.ema.get("sigma_rels") or ()),
        p_uncond=label_dropout(config["guidance"]),
        guidance=build_guidance(config["guidance"]),
        config=config,
        compile_net=bool(cfg.model.get("compile", False)),
        choices=choices,
        objective=build_objective(config),
    )


def start_from(module: DiffusionModule, path: str) -> None:
    """Start a new run from another checkpoint's weights (``init_from=``: ECT tunes a consistency model from a
    denoising one): that checkpoint's EMA weights, read through ``ddpm.load``'s trust checks, become this run's network
    and every EMA of it; the optimizer starts afresh. The networks must match key for key and shape for shape, but for
    the zero-initialised layers an objective adds (the second time's embedding), which keep their initial zeros."""
    from ddpm.inference import load

    source = f"init_from={str(path)!r}"
    theirs = load(path, ema=True, device="cpu", key="init_from").net.state_dict()
    ours = module.net.state_dict()
    added = {k for k in ours if k.startswith("gap_embed.")} - set(theirs)
    different = sorted((set(ours) - added) ^ set(theirs)) or [k for k in theirs if theirs[k].shape != ours[k].shape]
    if different:
        raise ConfigError(f"{source}: its network differs from this run's at {different[0]!r} (model, data and "
                          "num_classes must be the same)")
    averages = [module.net, module.ema.module, *(module.power_ema.averages if module.power_ema is not None else [])]
    for net in averages:
        net.load_state_dict(theirs, strict=False)


def instantiate_loggers(node) -> list | bool:
    """One logger (a node with ``_target_``), several (a node of such nodes, e.g. logger=wandb_csv), or none."""
    if not node:
        return False
    if "_target_" in node:
        return [built(node)]
    return [built(each) for each in node.values() if each]


def built(node, **kwargs):
    """``instantiate(node, **kwargs)``, with a ConfigError raised by the built object's own checks (wandb's run id file,
    say) passed on as it is, and Lightning's refusal of a setting (MisconfigurationException) as one: Hydra wraps
    whatever a target raises in its InstantiationException, which would turn the one line into "Error executing job"
    and a traceback."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, MisconfigurationException):
            target = str(node.get("_target_", "?")).rsplit(".", 1)[-1]
            raise ConfigError(f"{target}: {(str(cause).strip().splitlines() or ['refused'])[0][:300]}") from None
        raise
