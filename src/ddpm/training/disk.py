"""A run knows what it will write: the disk plan printed at start, and a one-line refusal when it will not fit.

The plan counts what grows with the run: checkpoints (the weights, the classic EMA, AdamW's two moments and each power
EMA, float32), power-EMA snapshots (``ema.snapshot_count`` of them, each power EMA in ``ema.snapshot_dtype``) and the
sample grids. Logs, metrics and wandb's files are small beside them and left out. The parameter count comes from the
network built on PyTorch's meta device: no memory, no compute.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ddpm.core.errors import ConfigError
from ddpm.snapshots import SNAPSHOT_DTYPES
from ddpm.training.snapshots import snapshot_interval

log = logging.getLogger(__name__)

ADAMW_STATES = 2  # exp_avg and exp_avg_sq, one float32 tensor each per parameter


@dataclass(frozen=True)
class DiskPlan:
    parameters: int
    checkpoints: int
    checkpoint_bytes: int
    snapshots: int
    snapshot_bytes: int
    grids: int
    grid_bytes: int

    @property
    def total(self) -> int:
        return self.checkpoints * self.checkpoint_bytes + self.snapshots * self.snapshot_bytes + self.grids * self.grid_bytes

    def describe(self) -> str:
        return (f"about {_size(self.total)}: {self.checkpoints} checkpoints x {_size(self.checkpoint_bytes)}, "
                f"{self.snapshots} EMA snapshots x {_size(self.snapshot_bytes)}, {self.grids} grids x {_size(self.grid_bytes)} "
                f"({self.parameters / 1e6:.1f}M parameters)")


def _size(n: float) -> str:
    """Bytes in decimal units, as disks are sold: 152.1 MB, 75.3 GB."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def count_parameters(cfg: DictConfig) -> int:
    """The network's parameters and buffers, built on the meta device."""
    from omegaconf import OmegaConf

    from ddpm.builders import build_net, network_classes

    config = OmegaConf.to_container(cfg, resolve=True)
    net = build_net(config["model"], device="meta", num_classes=network_classes(config))
    return sum(t.numel() for t in (*net.parameters(), *net.buffers()) if t.is_floating_point())


def disk_plan(cfg: DictConfig, parameters: int | None = None) -> DiskPlan:
    """What a composed training config will write, at most (a resumed run writes what is left of it)."""
    parameters = count_parameters(cfg) if parameters is None else parameters
    steps = int(cfg.trainer.max_steps)
    callbacks = cfg.get("callbacks") or {}
    sigma_rels = list(cfg.ema.get("sigma_rels") or [])

    checkpoint = callbacks.get("model_checkpoint")
    every = int(checkpoint.get("every_n_train_steps") or 0) if checkpoint else 0
    periodic = steps // every if every and steps > 0 else 0
    keep = int(checkpoint.get("save_top_k", -1)) if checkpoint else 0
    kept = periodic if keep < 0 else min(keep, periodic)
    copies = 1 + 1 + ADAMW_STATES + len(sigma_rels)  # weights, classic EMA, AdamW moments, power EMAs
    checkpoints = kept + 1  # and last.ckpt

    snapshots_node = callbacks.get("ema_snapshots")
    interval = snapshot_interval(int(cfg.ema.get("snapshot_count") or 0), steps, cfg.ema.get("snapshot_every")) \
        if snapshots_node and sigma_rels else 0
    snapshots = (steps // interval + (1 if steps % interval else 0)) if interval and steps > 0 else 0
    width = torch.finfo(SNAPSHOT_DTYPES[cfg.ema.get("snapshot_dtype", "float32")]).bits // 8

    grid = callbacks.get("sample_grid")
    grids, grid_bytes = 0, 0
    if grid:
        grid_every = int(grid.get("every_n_steps") or 0)
        grids = (steps // grid_every if grid_every else 0) + 1  # and final.png
        images = grid.per_class * cfg.data.num_classes if cfg.guidance.conditional else grid.num_samples
        side = max(int(cfg.data.image_size), int(grid.get("min_size") or 0))
        grid_bytes = images * side * side * int(cfg.data.channels)  # uncompressed: PNG writes less
    return DiskPlan(parameters, checkpoints, parameters * 4 * copies, snapshots, parameters * width * len(sigma_rels),
                    grids, grid_bytes)


def _written(run_dir: Path) -> int:
    """Bytes the run has already written of what the plan counts (a resumed run needs only the rest)."""
    return sum(p.stat().st_size for sub in ("checkpoints", "ema_snapshots", "samples") for p in (run_dir / sub).glob("*")
               if p.is_file()) if run_dir.is_dir() else 0


def check_disk(cfg: DictConfig) -> DiskPlan:
    """Log the plan, and refuse in one line when the file system of ``paths.output_dir`` cannot hold it."""
    plan = disk_plan(cfg)
    run_dir = Path(cfg.paths.output_dir)
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    needed = max(0, plan.total - _written(run_dir))
    log.info("disk: this run writes %s; %s free in %s", plan.describe(), _size(free), existing)
    if needed > free:
        raise ConfigError(
            f"paths.output_dir={str(run_dir)!r}: this run would write {plan.describe()}, but its file system has "
            f"{_size(free)} free: free some space, write elsewhere (hydra.run.dir=...), or write less "
            "(callbacks.model_checkpoint.every_n_train_steps, callbacks.model_checkpoint.save_top_k, ema.snapshot_count, "
            "ema.snapshot_dtype=float16)")
    return plan
