"""`python -m ddpm.evaluate ckpt_path=... [sampler=dpmpp_2m sampler.steps=20 guidance.scale=2 num_samples=10000]`:
sample a checkpoint and write ``metrics.json`` (quality, NFE, wall time, and the protocol behind every number).

A guidance sweep at sampling time is a multirun: ``--multirun ckpt_path=... guidance.scale=0,0.5,1,2,4``.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl+C while the imports below run (seconds): one line, not a traceback (ddpm.interrupts)
    from ddpm.interrupts import quiet_while_starting

    quiet_while_starting()

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ddpm.config import cli_main, run_cli
from ddpm.options import config_dir
from ddpm.evaluation.records import write_metrics
from ddpm.builders import build
from ddpm.core.errors import ConfigError
from ddpm.evaluation.metrics import PREPARATIONS
from ddpm.training.loggers import finish_wandb
from ddpm.sample import draw_options, load_for_sampling
from ddpm.training.rundirs import settle

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict:
    """Sample ``cfg.num_samples`` images from the checkpoint and measure them against the reference split
    (``Pipeline.evaluate``), then write metrics.json and log it."""
    from ddpm.core.likelihood import check_settings

    check_settings(**cfg.likelihood)
    model, guidance = load_for_sampling(cfg, "evaluate", ("metrics.json",))
    if cfg.likelihood.num_images and not cfg.likelihood.conditional and model.conditional and not model.p_uncond > 0:
        raise ConfigError("likelihood.conditional=false: this model trained with guidance.p_uncond=0, so it has no "
                          "unconditional model to measure p(x) with; set likelihood.conditional=true for p(x | y)")
    # The checkpoint's own dataset, unless another is chosen (+data=NAME); it must match the model.
    if cfg.get("data"):
        node = OmegaConf.to_container(cfg.data, resolve=True)
        if cfg.data_root is not None:
            node["root"] = cfg.data_root
        data = build(node, "data")
    else:
        data = model.data(root=cfg.data_root)
    options = draw_options(cfg, guidance)
    record = model.evaluate(data=data, feature_extractor=cfg.metrics.feature_extractor,
                            reference_split=cfg.metrics.reference_split, reference_size=cfg.metrics.reference_size,
                            cache_dir=cfg.metrics.cache_dir, inception_score=cfg.metrics.inception_score, progress=True,
                            **options)
    if cfg.likelihood.num_images:
        record["metrics"]["bpd"], record["protocol"]["likelihood"] = test_bits_per_dim(model, data, cfg.likelihood)
    # not part of the protocol: how this command shared the extractor and reference statistics (a multirun of N
    # evaluations in one command: uses N, built 1)
    record["command"] = {"extractor_and_reference_uses": PREPARATIONS["uses"],
                         "extractor_and_reference_built": PREPARATIONS["built"]}
    write_metrics(Path(cfg.paths.output_dir) / "metrics.json", record)
    settle()
    log.info("%s", json.dumps(record["metrics"]))
    from ddpm.training.assemble import instantiate_loggers  # here: Lightning's loggers (3 s to import) only when logging is asked for

    loggers = instantiate_loggers(cfg.get("logger")) if cfg.get("logger") else False
    for logger in loggers or []:
        logger.log_hyperparams(record["protocol"])
        logger.log_metrics({f"eval/{key}": value for key, value in record["metrics"].items()},
                           step=record["protocol"]["checkpoint"]["global_step"])
        logger.finalize("success")
    if loggers:
        finish_wandb()
    return record


def test_bits_per_dim(model, data, settings) -> tuple[float, dict]:
    """The mean bits per dimension of the first ``settings.num_images`` test images (``Pipeline.bits_per_dim``) and
    its protocol: which images, which model (p(x) or p(x | y)), and how it was computed."""
    from ddpm.data import stack_dataset

    data.setup()
    images, labels = stack_dataset(data.reference_set("test"), settings.num_images)
    options = {k: settings[k] for k in ("estimator", "num_probes", "solver", "rtol", "atol", "variance", "x0_clip", "seed", "batch_size")}
    record = model.bits_per_dim(images, labels if settings.conditional else None, **options)
    return record["mean"], {"split": "test", "num_images": len(images), "conditional": settings.conditional,
                            **record["protocol"]}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


def cli() -> None:
    """The command line: ``python -m ddpm.evaluate`` and the ``ddpm-evaluate`` script."""
    cli_main(main)


if __name__ == "__main__":
    cli()
