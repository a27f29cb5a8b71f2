"""What a training run will compute, tried before it does: every sampler it uses (its grids, quality curve and final
evaluation) walked end to end on its process by a probe network (``ddpm.core.probe``), and the memory its images take.
Rules between options that ``ddpm.validation`` applies; a setting that overflows is refused at start, not after the
first 1,000 steps."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from ddpm.core.errors import ConfigError
from ddpm.core.settings import integer

# Images a command holds at once: a sample set lives in memory as float32, uint8 and features (about 3 copies); more
# than half the machine's memory would end in the kernel's OOM killer after all the sampling was done.
IMAGE_COPIES = 3


def machine_memory() -> int:
    """This machine's physical memory in bytes (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def image_bytes(count: int, channels: int, side: int, shown: int) -> int:
    """What ``count`` images of ``side`` pixels take in memory, shown (a PNG grid) at ``shown`` pixels."""
    return count * channels * 4 * (side * side * IMAGE_COPIES + shown * shown)


def check_fits(key: str, count: int, channels: int, side: int, min_size: int = 0) -> None:
    """ConfigError, one line naming ``key``, when ``count`` images (enlarged to ``min_size`` in a grid) take more than
    half of this machine's memory."""
    shown = side if not (integer(min_size) and min_size > side) else -(-min_size // side) * side
    needed, memory = image_bytes(count, channels, side, shown), machine_memory()
    if memory and needed > memory // 2:
        raise ConfigError(f"{key}: {count} images of {side}x{side}" + (f" shown at {shown}x{shown}" if shown != side else "")
                          + f" need {needed / 1e9:.3g} GB, more than half of this machine's {memory / 1e9:.3g} GB: ask for fewer")


def check_images(cfg: Any) -> None:
    """The images a training run draws (its grids, quality samples and final evaluation) fit in memory."""
    from ddpm.options import select

    side, channels = select(cfg, "data.image_size"), select(cfg, "data.channels")
    grid = select(cfg, "callbacks.sample_grid")
    if isinstance(grid, dict):
        count = grid.get("per_class", 0) * select(cfg, "data.num_classes") if select(cfg, "guidance.conditional") \
            else grid.get("num_samples", 0)
        check_fits("callbacks.sample_grid", count, channels, side, grid.get("min_size", 0))
    for name in ("sample_quality", "evaluate_at_end"):
        count = select(cfg, f"callbacks.{name}.num_samples")
        if integer(count):
            check_fits(f"callbacks.{name}.num_samples", count, channels, side)


def dry_run_training(cfg: Any, process, prediction: str, sampler, guidance) -> None:
    """Every sampler the run uses on its process (the run's sampler at the grid's and the quality curve's steps, the final
    evaluation's at each of its w), dry-run on a probe network."""
    from ddpm.builders import build_sampler
    from ddpm.core.probe import dry_run
    from ddpm.options import select

    num_classes = select(cfg, "data.num_classes") if select(cfg, "guidance.conditional") else None
    runs = [("sampler", sampler, guidance)]
    for name in ("sample_grid", "sample_quality"):
        steps = select(cfg, f"callbacks.{name}.steps")
        if select(cfg, f"callbacks.{name}") and steps is not None:
            runs.append((f"callbacks.{name}", sampler.with_steps(steps), guidance))
    final = select(cfg, "callbacks.evaluate_at_end")
    if isinstance(final, dict):
        final_sampler = build_sampler(final["sampler"]) if final.get("sampler") else sampler
        for w in final.get("guidance_scales") or []:
            chosen = replace(guidance, scale=float(w))
            if num_classes is None or chosen.usable(select(cfg, "guidance.p_uncond") or 0.0, True):
                runs.append(("callbacks.evaluate_at_end", final_sampler, chosen))
    for what, each, chosen in runs:
        dry_run(each, process, prediction, guidance=chosen, what=what, num_classes=num_classes)


def preflight(cfg: Any, process, prediction: str, sampler, guidance) -> None:
    """A training run's callbacks against its process (their sampler steps within its T), the memory of their images,
    and the dry run of every sampler they use."""
    from ddpm.core.samplers import check_steps
    from ddpm.options import select

    for name in ("sample_grid", "sample_quality"):
        steps = select(cfg, f"callbacks.{name}.steps")
        if select(cfg, f"callbacks.{name}") and integer(steps):
            check_steps(steps, process.num_timesteps, key=f"callbacks.{name}.steps")
    check_images(cfg)
    dry_run_training(cfg, process, prediction, sampler, guidance)
