"""`python -m ddpm.evaluate ckpt_path=... [sampler=dpmpp_2m sampler.steps=20 guidance.scale=2 num_samples=10000]`:
sample a checkpoint and write ``metrics.json`` (quality, NFE, wall time, and the protocol behind every number).

A guidance sweep at sampling time is a multirun: ``--multirun ckpt_path=... guidance.scale=0,0.5,1,2,4``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.config import cli_main, run_cli
from ddpm.options import config_dir
from ddpm.build import instantiate_loggers
from ddpm.files import atomic_write
from ddpm.evaluation.metrics import PREPARATIONS, inception_score, metric_name, prepare, sample_metrics
from ddpm.training.loggers import finish_wandb
from ddpm.training.module import DiffusionModule
from ddpm.sample import draw, load_for_sampling
from ddpm.validation import ConfigError

log = logging.getLogger(__name__)


def protocol(cfg: DictConfig, module: DiffusionModule, reference_info: dict, extractor_info: dict, num_images: int) -> dict:
    """Everything that makes two numbers comparable: reference set, feature space, sample count, sampler,
    guidance, weights, seed. Compare runs only when their protocols agree."""
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    sampler_name = sampler.pop("_target_").rsplit(".", 1)[-1].removeprefix("sample_")
    sampler.pop("_partial_", None)
    if sampler.get("steps") is None:
        sampler["steps"] = module.diffusion.num_timesteps
    return {
        "reference": reference_info,
        "feature_extractor": extractor_info,
        "num_samples": num_images,
        "sampler": {"name": sampler_name, **sampler},
        "guidance_scale": module.guidance_scale if cfg.guidance.scale is None else float(cfg.guidance.scale),
        "guidance_rescale": float(cfg.guidance.rescale),
        "guidance_interval": None if cfg.guidance.interval is None else [float(v) for v in cfg.guidance.interval],
        "prediction": module.denoiser.prediction,
        "weights": ("ema" if cfg.ema.sigma_rel is None else {"power_ema": getattr(module, "ema_weights", None)}) if cfg.use_ema else "raw",
        "seed": cfg.seed,
        "checkpoint": {"path": str(Path(cfg.ckpt_path).resolve()), "global_step": getattr(module, "checkpoint_step", None)},
    }


def check_pair(module: DiffusionModule, data_cfg: DictConfig) -> None:
    """Refuse to measure a model against images of another shape or label set."""
    net, lines = module.net, []
    for key, model_value in (("channels", net.in_channels), ("image_size", net.image_size), ("num_classes", net.num_classes)):
        if model_value is not None and data_cfg.get(key) != model_value:
            lines.append(f"data.{key}={data_cfg.get(key)!r}: the checkpoint's model has {key}={model_value}")
    if lines:
        raise ConfigError("; ".join(lines) + " (evaluate against the dataset the model was trained on)")


def evaluate(cfg: DictConfig) -> dict:
    """Sample ``cfg.num_samples`` images from the checkpoint and measure them against the reference split."""
    module = load_for_sampling(cfg, "evaluate", ("metrics.json",))
    device = module.device
    # The checkpoint's own dataset, unless another is chosen (+data=NAME); it must match the model.
    data_cfg = OmegaConf.create(cfg.data if cfg.get("data") else module.config["data"])
    if cfg.data_root is not None:
        data_cfg.root = cfg.data_root
    check_pair(module, data_cfg)
    datamodule = instantiate(data_cfg)
    datamodule.check()
    extractor, extractor_info, reference = prepare(cfg.metrics.feature_extractor, datamodule, cfg.metrics.reference_split,
                                                   cfg.metrics.cache_dir, cfg.metrics.reference_size, device)

    out = draw(module, cfg)
    images, labels = out["images"], out["labels"]
    metrics = sample_metrics(extractor, reference, images, labels)
    if cfg.metrics.inception_score and labels is not None and images.shape[1] == 3 and metric_name(extractor) == "fid":
        metrics.update(inception_score(images))
    batches = -(-len(images) // cfg.batch_size)
    # One evaluation is one network call on a batch; a guided one carries the conditional and the
    # unconditional halves together. nfe counts them per image (the sampler's steps).
    metrics.update(nfe=out["nfe"] / batches, sampling_seconds=out["seconds"], images_per_second=len(images) / out["seconds"])
    record = {"metrics": metrics, "protocol": protocol(cfg, module, reference.info, extractor_info, len(images)),
              # not part of the protocol: how this process shared the extractor and reference statistics (a multirun
              # of N evaluations in one process: uses N, built 1)
              "process": {"extractor_and_reference_uses": PREPARATIONS["uses"],
                          "extractor_and_reference_built": PREPARATIONS["built"]}}

    text = json.dumps(record, indent=2) + "\n"
    atomic_write(Path(cfg.paths.output_dir) / "metrics.json", lambda f: f.write(text.encode()), what="metrics")
    log.info("%s", json.dumps(metrics))
    loggers = instantiate_loggers(cfg.get("logger"))
    for logger in loggers or []:
        logger.log_hyperparams(record["protocol"])
        logger.log_metrics({f"eval/{key}": value for key, value in metrics.items()}, step=record["protocol"]["checkpoint"]["global_step"])
        logger.finalize("success")
    if loggers:
        finish_wandb()
    return record


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


def cli() -> None:
    """The command line: ``python -m ddpm.evaluate`` and the ``ddpm-evaluate`` script."""
    cli_main(main)


if __name__ == "__main__":
    cli()
