"""`python -m ddpm.sample ckpt_path=... [sampler=ddim sampler.steps=50 guidance.scale=2 num_samples=64]`:
images from a checkpoint, as a PNG grid and as raw uint8 arrays (samples.npz)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ddpm.build import guidance_interval, load_module
from ddpm.training.callbacks import class_rows, even_labels, to_grid
from ddpm.config import cli_main, native_bf16, run_cli
from ddpm.options import config_dir
from ddpm.core.guidance import check_guidance
from ddpm.core.samplers import check_steps
from ddpm.files import atomic_write
from ddpm.training.rundirs import claim_outputs
from ddpm.training.snapshots import posthoc_state_dict, snapshot_dir
from ddpm.training.module import DiffusionModule
from ddpm.validation import ConfigError, validate

log = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> [0, 255] NHWC uint8, the usual layout of image arrays."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def draw(module: DiffusionModule, cfg: DictConfig, trajectory_steps: int = 10) -> dict:
    """Sample ``cfg.num_samples`` images in batches from one seeded generator. Returns images in [-1, 1],
    labels, the trajectory (or None), the number of model evaluations and the wall time."""
    sampler = instantiate({k: v for k, v in cfg.sampler.items() if k not in ("precision", "compile")})
    num_classes = module.net.num_classes
    labels = None
    if num_classes is not None:
        labels = torch.tensor(list(cfg.labels)) if cfg.labels else even_labels(cfg.num_samples, num_classes)
    n = len(labels) if labels is not None else cfg.num_samples
    generator = torch.Generator(module.device).manual_seed(cfg.seed)
    evaluations, frames = 0, []

    def count(model_fn):
        def counted(x, t):
            nonlocal evaluations
            evaluations += 1
            return model_fn(x, t)
        return counted

    start, chunks = time.perf_counter(), []
    batches = range(0, n, cfg.batch_size)
    # One bar over all images when there are several batches (10,000 images are 20 batches, not 20 bars); the
    # sampler's own bar over its steps when there is one.
    overall = tqdm(total=n, desc="sampling", unit="img", disable=len(batches) == 1, leave=False)
    for first in batches:
        batch_labels = labels[first:first + cfg.batch_size] if labels is not None else None
        size = len(batch_labels) if batch_labels is not None else min(cfg.batch_size, n - first)
        keep = cfg.trajectory if first == 0 else 0
        callback = (lambda i, x, x0: frames.append(x[:keep].clone())) if keep else None  # noqa: E731
        chunks.append(module.sample(batch_labels, num_samples=size, guidance_scale=cfg.guidance.scale,
                                    rescale=cfg.guidance.rescale, interval=guidance_interval(cfg.guidance.interval),
                                    generator=generator, use_ema=cfg.use_ema, sampler=_wrap(sampler, count),
                                    precision=cfg.sampler.precision, compile_net=cfg.sampler.compile,
                                    progress=len(batches) == 1, callback=callback))
        overall.update(size)
    overall.close()
    seconds = time.perf_counter() - start
    trajectory = None
    if frames:
        every = max(1, len(frames) // trajectory_steps)
        trajectory = torch.stack(frames[::every][: trajectory_steps - 1] + [frames[-1]], dim=1)  # (k, steps, C, H, W)
    return {"images": torch.cat(chunks), "labels": labels, "trajectory": trajectory, "nfe": evaluations, "seconds": seconds}


def _wrap(sampler, wrap_model_fn):
    """The sampler, with its model function passed through ``wrap_model_fn`` (to count evaluations)."""
    return lambda model_fn, *args, **kwargs: sampler(wrap_model_fn(model_fn), *args, **kwargs)


def resolve_device(device: str) -> str:
    """``auto``: cuda when available, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_for_sampling(cfg: DictConfig, entry: str, outputs: tuple[str, ...]) -> DiffusionModule:
    """Validate ``cfg`` for ``entry`` (sample | evaluate), refuse to overwrite earlier ``outputs`` in the run
    directory, and load the checkpoint, checking the requested labels and steps against it."""
    validate(cfg, entry)
    run_dir = Path(cfg.paths.output_dir)
    earlier = [name for name in outputs if (run_dir / name).exists()]
    if earlier:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r} already holds {earlier} from an earlier run: pick a new hydra.run.dir")
    try:
        claim_outputs(run_dir, entry)
    except FileExistsError as error:
        raise ConfigError(str(error)) from None
    device = resolve_device(cfg.device)
    if cfg.sampler.precision == "auto":  # resolved in place, so the protocol records what ran
        cfg.sampler.precision = "bf16" if native_bf16("cuda" if device.startswith("cuda") else "cpu") else "float32"
    module = load_module(cfg.ckpt_path, map_location=device).to(device).eval()
    num_classes, timesteps = module.net.num_classes, module.diffusion.num_timesteps
    if cfg.labels and (num_classes is None or max(cfg.labels) >= num_classes):
        allowed = f"class ids below {num_classes}" if num_classes else "null (the checkpoint is unconditional)"
        raise ConfigError(f"labels={list(cfg.labels)}: must be {allowed}")
    if cfg.sampler.get("steps") is not None:
        check_steps(cfg.sampler.steps, timesteps)
    if cfg.use_ema and cfg.ema.sigma_rel is not None:
        module.ema_weights = use_power_ema(module, cfg)
    check_guidance(module.p_uncond, module.guidance_scale if cfg.guidance.scale is None else cfg.guidance.scale,
                   module.conditional, cfg.guidance.rescale, guidance_interval(cfg.guidance.interval))
    return module


def use_power_ema(module: DiffusionModule, cfg: DictConfig) -> dict:
    """Load the power EMA of ``ema.sigma_rel`` into the module's EMA weights: the one tracked during training when
    it is there, else rebuilt from the run's snapshots. Returns what the protocol records about it."""
    sigma_rel = float(cfg.ema.sigma_rel)
    tracked = module.power_ema.find(sigma_rel) if module.power_ema is not None else None
    if cfg.ema.source == "tracked" and tracked is None:
        widths = module.power_ema.sigma_rels if module.power_ema is not None else []
        raise ConfigError(f"ema.sigma_rel={sigma_rel}: the checkpoint tracks no power EMA of that width (it has {widths}); "
                          "use ema.source=auto or posthoc to rebuild it from the snapshots")
    if tracked is not None and cfg.ema.source != "posthoc":
        module.ema.module.load_state_dict(tracked.state_dict())
        return {"sigma_rel": sigma_rel, "source": "tracked"}
    directory = Path(cfg.ema.snapshots).expanduser() if cfg.ema.snapshots else snapshot_dir(cfg.ckpt_path)
    sources = None if cfg.ema.sources is None else [float(s) for s in cfg.ema.sources]
    # the EMA at the asked-for checkpoint's step, from the snapshots up to it only
    state, info = posthoc_state_dict(directory, sigma_rel, step=module.checkpoint_step, sources=sources,
                                     reference=module.ema.module.state_dict())
    module.ema.module.load_state_dict({k: v.to(module.device) for k, v in state.items()})
    log.info("power EMA sigma_rel=%g at step %d rebuilt from %d snapshots in %s", sigma_rel, info["step"], info["snapshots"],
             directory)
    return {"source": "posthoc", **info}


def sample(cfg: DictConfig) -> dict:
    module = load_for_sampling(cfg, "sample", ("grid.png", "samples.npz"))
    out = draw(module, cfg)
    run_dir = Path(cfg.paths.output_dir)
    nrow = class_rows(len(out["images"]), module.net.num_classes)
    grid = to_grid(out["images"], nrow=nrow, min_size=cfg.min_size)
    atomic_write(run_dir / "grid.png", lambda f: save_image(grid, f, format="png"), what="samples")
    labels = out["labels"].numpy() if out["labels"] is not None else np.full(len(out["images"]), -1)
    atomic_write(run_dir / "samples.npz", lambda f: np.savez_compressed(f, images=to_uint8(out["images"]), labels=labels),
                 what="samples")
    if out["trajectory"] is not None:
        k, steps = out["trajectory"].shape[:2]
        frames = to_grid(out["trajectory"].flatten(0, 1), nrow=steps, min_size=cfg.min_size)
        atomic_write(run_dir / "trajectory.png", lambda f: save_image(frames, f, format="png"), what="samples")
    log.info("%d samples, %d model evaluations in %.1f s; wrote %s", len(out["images"]), out["nfe"], out["seconds"], run_dir)
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="sample")
def main(cfg: DictConfig) -> None:
    run_cli(sample, cfg)


def cli() -> None:
    """The command line: ``python -m ddpm.sample`` and the ``ddpm-sample`` script."""
    cli_main(main)


if __name__ == "__main__":
    cli()
