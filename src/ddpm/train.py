"""`python -m ddpm.train [OVERRIDES]`: compose the Hydra config, build the Lightning pieces, fit.

``train(cfg)`` is importable and tested; ``main`` is the thin ``@hydra.main`` wrapper around it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from ddpm.config import config_dir
from ddpm.guidance import check_guidance
from ddpm.module import DiffusionModule

log = logging.getLogger(__name__)


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> DiffusionModule:
    """Seed, build data, model, callbacks, logger and trainer from ``cfg``, then fit (resuming from
    ``cfg.ckpt_path`` when set). ``extra_callbacks`` join the configured ones (handy from Python).
    Returns the trained module."""
    if cfg.guidance.conditional:
        check_guidance(cfg.guidance.p_uncond, cfg.guidance.scale)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    module = DiffusionModule.from_config(cfg)
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node] + list(extra_callbacks)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)

    # Every logger gets the whole resolved config, schedule and guidance included.
    for each in trainer.loggers:
        each.log_hyperparams(module.config)
    n_params = sum(p.numel() for p in module.net.parameters())
    log.info("network: %s with %.2fM parameters; writing to %s", cfg.model._target_, n_params / 1e6, cfg.paths.output_dir)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    finally:
        _finish_wandb()
    return module


def _finish_wandb() -> None:
    """Close the wandb run, so the next job of a multirun in this process starts its own."""
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
