"""`python -m ddpm.sample ckpt_path=... [sampler=ddim sampler.steps=50 guidance.scale=2 num_samples=64]`:
images from a checkpoint, as a PNG grid and as raw uint8 arrays (samples.npz)."""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl+C while the imports below run (seconds): one line, not a traceback (ddpm.interrupts)
    from ddpm.interrupts import quiet_while_starting

    quiet_while_starting()

import logging
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ddpm.builders import build_guidance, build_sampler, from_checkpoint, guidance_node
from ddpm.config import cli_main, native_bf16, run_cli
from ddpm.core.guidance import Guidance, GuidanceMethod, check_guide
from ddpm.core.probe import dry_run
from ddpm.core.samplers import check_steps
from ddpm.files import atomic_write
from ddpm.images import class_rows, save_png, to_grid, to_uint8
from ddpm.core.ema import MAX_SIGMA_REL, valid_sigma_rel
from ddpm.inference import Pipeline, check_load_arguments, load, resolve_device
from ddpm.options import config_dir
from ddpm.training.rundirs import claim_outputs, commit, settle
from ddpm.validation import ConfigError, validate

log = logging.getLogger(__name__)


def guidance_of(cfg: DictConfig, model: Pipeline) -> Guidance:
    """The command line's guidance over the checkpoint's: each setting as given, or, where it is ``checkpoint`` (the
    default), the checkpoint's own, as ``ddpm.load(...).sample()`` uses them all (``builders.from_checkpoint``)."""
    given = {k: v for k, v in OmegaConf.to_container(cfg.guidance, resolve=True).items() if k != "guide"}
    return build_guidance(from_checkpoint(guidance_node(model.guidance), given))


def guide_for(cfg: DictConfig, model: Pipeline, method: GuidanceMethod) -> Pipeline | None:
    """Autoguidance's guide from ``guidance.guide``: another run's checkpoint (``ckpt_path``), this run's checkpoint at
    an earlier step (``step``: ``step_NNNNNNN.ckpt`` beside ``ckpt_path``), with the EMA of width ``sigma_rel``
    (alone: ``ckpt_path``'s own checkpoint with that EMA). Loaded through ``ddpm.load``'s trust checks, on the model's
    device, and checked to be a model of the same data and process; None for the other methods."""
    node = cfg.guidance.guide
    given = {key: node[key] for key in ("ckpt_path", "step", "sigma_rel") if node[key] is not None}
    if method.unconditional:  # a sweep over methods may name a guide for its autoguidance jobs: the others ignore it
        return None
    if not given:
        raise ConfigError("guidance.method=autoguidance needs a guide: guidance.guide.step=N (this run at step N), "
                          "guidance.guide.ckpt_path=... (another run) and/or guidance.guide.sigma_rel=X (a shorter EMA)")
    if "ckpt_path" in given and "step" in given:
        raise ConfigError("guidance.guide.ckpt_path and guidance.guide.step: give one (step names a checkpoint of this run)")
    path = Path(node.ckpt_path or cfg.ckpt_path).expanduser()
    if node.step is not None:
        path = path.parent / f"step_{node.step:07d}.ckpt"
        if not path.is_file():
            steps = sorted(p.stem for p in path.parent.glob("step_*.ckpt"))
            raise ConfigError(f"guidance.guide.step={node.step}: no checkpoint {path} (this run has {steps})")
    if path.resolve() == Path(cfg.ckpt_path).expanduser().resolve() and node.sigma_rel is None:
        raise ConfigError("guidance.guide: that is the model itself (autoguidance by it is the conditional model): "
                          "name an earlier step, another run or a shorter guidance.guide.sigma_rel")
    guide = load(path, ema=True if node.sigma_rel is None else float(node.sigma_rel), device=model.device,
                 key="guidance.guide.step" if node.step is not None else "guidance.guide.ckpt_path")
    check_guide(model.denoiser, guide.denoiser)
    return guide


def labels_of(cfg: DictConfig) -> list | None:
    """The command line's ``labels``: null, or a list of class ids (``Pipeline.labels_for`` checks them against the model)."""
    if cfg.labels is not None and not OmegaConf.is_list(cfg.labels):
        raise ConfigError(f"labels={cfg.labels!r}: must be null or a list of class ids >= 0, e.g. labels=[3] or labels=[3,3,7]")
    return list(cfg.labels) if cfg.labels else None


def draw_options(cfg: DictConfig, guidance: Guidance) -> dict:
    """``Pipeline.draw``'s arguments from a sample/evaluate config and its checked guidance: the sampler node, guidance,
    seed, batches, precision."""
    node = OmegaConf.to_container(cfg.sampler, resolve=True)
    return {"labels": labels_of(cfg), "num_samples": cfg.num_samples,
            "sampler": build_sampler(node),  # less precision and compile, which are draw's (builders.NOT_ARGUMENTS)
            "guidance": guidance, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "precision": cfg.sampler.precision, "compile": cfg.sampler.compile}


def weights_of(cfg: DictConfig) -> dict:
    """``ddpm.load``'s choice of weights from conf/weights.yaml's keys (use_ema, ema.sigma_rel, ema.snapshots, ...),
    checked as ``ddpm.load`` checks them (ConfigError naming the key), before anything is read."""
    if not isinstance(cfg.use_ema, bool):
        raise ConfigError(f"use_ema={cfg.use_ema!r}: must be true or false")
    if cfg.ema.sigma_rel is not None and not cfg.use_ema:
        raise ConfigError(f"ema.sigma_rel={cfg.ema.sigma_rel}: must be null with use_ema=false (the raw weights have no EMA "
                          "length; drop one of the two)")
    if cfg.ema.sigma_rel is not None and not valid_sigma_rel(cfg.ema.sigma_rel):
        raise ConfigError(f"ema.sigma_rel={cfg.ema.sigma_rel!r}: must be null (the classic EMA) or a relative EMA width in "
                          f"(0, {MAX_SIGMA_REL:.4f}), e.g. 0.05 or 0.10")
    sources = cfg.ema.sources
    weights = {"ema": cfg.ema.sigma_rel if cfg.use_ema and cfg.ema.sigma_rel is not None else bool(cfg.use_ema),
               "snapshots": cfg.ema.snapshots, "ema_source": cfg.ema.source,
               "ema_sources": list(sources) if OmegaConf.is_list(sources) else sources}
    check_load_arguments(weights["ema"], weights["ema_source"], weights["ema_sources"], cfg.device)
    return weights


def load_for_sampling(cfg: DictConfig, entry: str, outputs: tuple[str, ...]) -> tuple[Pipeline, Guidance]:
    """Validate ``cfg`` for ``entry`` (sample | evaluate), refuse to overwrite earlier ``outputs`` in the run
    directory, load the checkpoint (``ddpm.load``) and, for autoguidance, its guide, and check the requested labels,
    steps and guidance against it. Returns the model and the checked guidance."""
    validate(cfg, entry)
    weights = weights_of(cfg)
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
        cfg.sampler.precision = "bf16" if native_bf16(device.type) else "float32"
    model = load(cfg.ckpt_path, device=device, **weights)
    model.labels_for(labels_of(cfg), cfg.num_samples)
    if cfg.sampler.get("steps") is not None:
        check_steps(cfg.sampler.steps, model.process.num_timesteps)
    guidance = guidance_of(cfg, model)
    guidance = model.guidance_for(replace(guidance, guide=guide_for(cfg, model, guidance.method)))
    check_memory(cfg, model)
    # The sampler walks the checkpoint's process on a probe network first: settings that overflow are refused now
    sampler = build_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))
    sampler.check_process(model.process)  # e.g. ancestral DDPM on a flow checkpoint: one line naming both, not a traceback
    sampler.check_model(model.denoiser)
    dry_run(sampler, model.process, model.denoiser.prediction, guidance=guidance, what="sampler",
            num_classes=model.num_classes, boundary=model.denoiser.boundary)
    commit(run_dir)  # the folder is this command's and every check passed: its record and log file (rundirs.commit)
    return model, guidance


def check_memory(cfg: DictConfig, model: Pipeline) -> None:
    """ConfigError, one line, when the images asked for (with their trajectory frames, enlarged to ``min_size`` in the
    PNG) would not fit in half of this machine's memory: refused before sampling rather than killed after it."""
    from ddpm.preflight import IMAGE_COPIES, machine_memory

    n = len(cfg.labels) if cfg.labels else cfg.num_samples
    pixels = model.net.in_channels * model.net.image_size**2
    side = max(model.net.image_size, -(-int(cfg.get("min_size") or 0) // model.net.image_size) * model.net.image_size)
    needed = n * pixels * 4 * IMAGE_COPIES + n * model.net.in_channels * side * side * 4
    frames = int(cfg.get("trajectory") or 0)
    if frames > n:
        raise ConfigError(f"trajectory={frames}: must be at most num_samples={n} (the trajectories of that many images)")
    memory = machine_memory()
    if memory and needed > memory // 2:
        raise ConfigError(f"num_samples={n} with min_size={cfg.get('min_size')}: {needed / 1e9:.1f} GB of images, more than "
                          f"half of this machine's {memory / 1e9:.1f} GB: sample fewer (num_samples) or in several runs")


def sample(cfg: DictConfig) -> dict:
    model, guidance = load_for_sampling(cfg, "sample", ("grid.png", "samples.npz"))
    out = model.draw(**draw_options(cfg, guidance), trajectory=cfg.trajectory, progress=True)
    run_dir = Path(cfg.paths.output_dir)
    nrow = class_rows(len(out["images"]), model.num_classes)
    grid = to_grid(out["images"], nrow=nrow, min_size=cfg.min_size)
    atomic_write(run_dir / "grid.png", lambda f: save_png(grid, f), what="samples")
    labels = out["labels"].numpy() if out["labels"] is not None else np.full(len(out["images"]), -1)
    atomic_write(run_dir / "samples.npz", lambda f: np.savez_compressed(f, images=to_uint8(out["images"]), labels=labels),
                 what="samples")
    if out["trajectory"] is not None:
        k, steps = out["trajectory"].shape[:2]
        frames = to_grid(out["trajectory"].flatten(0, 1), nrow=steps, min_size=cfg.min_size)
        atomic_write(run_dir / "trajectory.png", lambda f: save_png(frames, f), what="samples")
    settle()
    log.info("%d samples, %g network evaluations each, in %.1f s; wrote %s", len(out["images"]), out["nfe"], out["seconds"],
             run_dir)
    return out


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="sample")
def main(cfg: DictConfig) -> None:
    run_cli(sample, cfg)


def cli() -> None:
    """The command line: ``python -m ddpm.sample`` and the ``ddpm-sample`` script."""
    cli_main(main)


if __name__ == "__main__":
    cli()
