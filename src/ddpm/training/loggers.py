"""Loggers. wandb must never prompt, work with no account and no network, and go online by itself
when the user is logged in."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse


from ddpm.core.errors import ConfigError
from ddpm.validation import Rule, one_of

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

# How long an online wandb run may take to start before the run goes offline instead (wandb's own default is 90 s).
INIT_TIMEOUT_S = 10


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` gives no HTTP answer within ``timeout`` seconds (None: it answers, whatever the status). A dead
    network, a closed port and a server that accepts but never replies all fail here quickly, where wandb.init would
    wait for its own, much longer timeout."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        urlopen(url, timeout=timeout).close()
    except HTTPError:
        return None  # an HTTP status is an answer
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections; ValueError: a malformed URL
        return str(getattr(error, "reason", None) or error) or type(error).__name__
    return None


def wandb_credentials_available() -> bool:
    """True when wandb has an API key: WANDB_API_KEY or an entry for its host in ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(wandb_server()).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


WANDB_MODES = ("auto", "online", "offline", "disabled")  # logger.mode
# Its rule, checked with the training config's before anything is built (ddpm.train passes it to validate).
RULES = (Rule("logger.mode", one_of(*WANDB_MODES), f"one of {list(WANDB_MODES)}"),)


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto``: WANDB_MODE if set, else online with credentials and offline without."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={mode!r}: must be one of {list(WANDB_MODES)}")
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
    import wandb
    from lightning.pytorch.loggers import WandbLogger  # here, not above: validation reads WANDB_MODES without Lightning

    os.makedirs(save_dir, exist_ok=True)
    auto_group, auto_name, overrides = sweep_identity(experiment)
    mode = resolve_wandb_mode(mode)
    sync = f"upload it later with: wandb sync {Path(save_dir) / 'wandb'}/offline-run-*"
    if mode == "online" and (reason := unreachable(wandb_server())):
        log.warning("wandb: cannot reach %s (%s): logging offline instead; %s", wandb_server(), reason, sync)
        mode = "offline"

    def start(mode: str) -> WandbLogger:
        logger = WandbLogger(project=project, save_dir=save_dir, mode=mode, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S),
                             group=auto_group if group == "auto" else group, name=auto_name if name == "auto" else name, **kwargs)
        logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns that it has no effect
        logger.experiment  # start the run now: a failure surfaces here, before any compute
        return logger

    try:
        logger = start(mode)
    except Exception as error:  # wandb raises its own error types for auth, network and timeouts
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if mode != "online":
            raise ConfigError(f"logger=wandb: wandb could not start ({reason}); use logger=csv, or logger.mode=disabled") from None
        log.warning("wandb: the online run did not start within %d s (%s): logging offline instead; %s", INIT_TIMEOUT_S, reason, sync)
        logger = start("offline")
    if overrides:
        logger.log_hyperparams({"sweep": {"overrides": overrides, **{k.lstrip("+"): v for k, v in overrides.items()}}})
    return logger


def finish_wandb() -> None:
    """Close the wandb run, so the next job of a multirun in this process starts its own."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()
