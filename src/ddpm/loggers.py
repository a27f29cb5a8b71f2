"""Loggers. wandb must never prompt, work with no account and no network, and go online by itself
when the user is logged in."""

from __future__ import annotations

import netrc
import os
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


def wandb_logger(project: str, save_dir: str, mode: str = "auto", **kwargs) -> WandbLogger:
    """A WandbLogger whose run lives under the run directory (``save_dir/wandb``)."""
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, mode=resolve_wandb_mode(mode), **kwargs)
