"""`python -m ddpm.export ckpt_path=... out=DIR [format=diffusers use_ema=true ema.sigma_rel=0.1]`: a checkpoint's
model in another library's format. ``format=diffusers`` writes a ``UNet2DModel`` and a ``DDIMScheduler``
(``ddpm/diffusers_export.py``; docs/export.md shows how to load and sample them)."""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl+C while the imports below run (seconds): one line, not a traceback (ddpm.interrupts)
    from ddpm.interrupts import quiet_while_starting

    quiet_while_starting()

import importlib.util
import logging

import hydra
from omegaconf import DictConfig

from ddpm.config import cli_main, run_cli
from ddpm.diffusers_export import FORMATS, check_out, export_diffusers
from ddpm.inference import load
from ddpm.options import config_dir
from ddpm.sample import weights_of
from ddpm.core.samplers import X0_CLIPS
from ddpm.core.settings import number
from ddpm.validation import ConfigError, validate

log = logging.getLogger(__name__)

RULES = (
    ("format", lambda v, _: v in FORMATS, f"one of {list(FORMATS)}"),
    ("out", lambda v, _: isinstance(v, str) and v.strip() != "", "a folder path, e.g. out=exports/digits"),
    ("sampler.x0_clip", lambda v, _: v in X0_CLIPS, f"one of {list(X0_CLIPS)}"),
    ("sampler.percentile", lambda v, _: number(v) and 0 < v <= 1, "a number in (0, 1]"),
)


def export(cfg: DictConfig) -> str:
    validate(cfg, "export", RULES)
    if importlib.util.find_spec("diffusers") is None:
        raise ConfigError("format=diffusers needs the diffusers package: pip install -e \".[export]\" "
                          "(or pip install 'diffusers>=0.30')")
    check_out(cfg.out)  # before loading (a post-hoc EMA rebuild takes a while)
    model = load(cfg.ckpt_path, device=cfg.device, **weights_of(cfg))
    out = export_diffusers(model, cfg.out, x0_clip=cfg.sampler.x0_clip, percentile=cfg.sampler.percentile)
    log.info("wrote %s (step %s, %s weights) to %s", cfg.ckpt_path, model.step, model.weights, out)
    return str(out)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


def cli() -> None:
    """The command line: ``python -m ddpm.export`` and the ``ddpm-export`` script."""
    cli_main(main)


if __name__ == "__main__":
    cli()
