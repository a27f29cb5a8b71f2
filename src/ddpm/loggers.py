"""Loggers. wandb must never prompt, work with no account and no network, and go online by itself
when the user is logged in."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger


def wandb_credentials_available() -> bool:
    """True when wandb has an API key: WANDB_API_KEY or an entry for its host in ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto``: WANDB_MODE if set, else online with credentials and offline without."""
    modes = ("auto", "online", "offline", "disabled")
    if mode not in modes:
        raise ValueError(f"logger.mode={mode!r}: must be one of {list(modes)}")
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_available() else "offline")


def sweep_identity(experiment: str | None = None) -> tuple[str | None, str | None, dict]:
    """(group, name, overrides) of the running Hydra job: the group is the experiment and the sweep (its directory's
    date and time), shared by every job of a multirun; the name is the job's overrides (``schedule=cosine,seed=1``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None, {}
    hydra_cfg = HydraConfig.get()
    overrides = dict(o.split("=", 1) for o in hydra_cfg.overrides.task if "=" in o and not o.startswith(("hydra", "~")))
    output_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = output_dir.parent if str(hydra_cfg.mode) == "RunMode.MULTIRUN" else output_dir
    group = f"{experiment or 'default'}/{sweep.parent.name}_{sweep.name}"
    name = ",".join(f"{k.lstrip('+')}={v}" for k, v in overrides.items() if k not in ("ckpt_path",)) or "defaults"
    return group, name, overrides


def wandb_logger(project: str, save_dir: str, mode: str = "auto", group: str | None = "auto", name: str | None = "auto",
                 experiment: str | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger whose run lives under the run directory (``save_dir/wandb``). ``auto`` group and name come from
    the Hydra job (see ``sweep_identity``); the job's overrides are logged as config fields under ``sweep``."""
    os.makedirs(save_dir, exist_ok=True)
    auto_group, auto_name, overrides = sweep_identity(experiment)
    logger = WandbLogger(project=project, save_dir=save_dir, mode=resolve_wandb_mode(mode),
                         group=auto_group if group == "auto" else group, name=auto_name if name == "auto" else name, **kwargs)
    if overrides:
        logger.log_hyperparams({"sweep": {"overrides": overrides, **{k.lstrip("+"): v for k, v in overrides.items()}}})
    return logger


def instantiate_loggers(node) -> list | bool:
    """One logger (a node with ``_target_``), several (a node of such nodes, e.g. logger=wandb_csv), or none."""
    if not node:
        return False
    from hydra.utils import instantiate

    if "_target_" in node:
        return [instantiate(node)]
    return [instantiate(each) for each in node.values() if each]
