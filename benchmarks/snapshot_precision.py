"""How precisely must power-EMA snapshots be stored? Rebuild error of float32, float16 and bfloat16 snapshots.

Trains one digits run (the default network) with the power EMAs 0.05 and 0.10 snapshotted in float32, and 0.15
tracked directly. Then each precision: the snapshots cast to it, sigma_rel = 0.15 rebuilt from the 0.05/0.10 ones, and
compared with the tracked 0.15 and with the float32 rebuild, relative to how far the EMA is from the raw weights
(||rebuilt - tracked|| / ||tracked - raw||, the measure of docs/ablations/ema_length.md).

    python benchmarks/snapshot_precision.py [--steps 600] [--out /tmp/snapshot_precision]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ddpm.config import compose
from ddpm.snapshots import SNAPSHOT_DTYPES, posthoc_state_dict
from ddpm.train import train


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values() if v.is_floating_point()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="snapshot_precision_")))
    args = parser.parse_args()
    run = args.out / "run"
    module = train(compose(["logger=none", "trainer.enable_progress_bar=false", f"trainer.max_steps={args.steps}",
                            "ema.sigma_rels=[0.05,0.10,0.15]", "ema.snapshot_count=50", "ema.snapshot_dtype=float32",
                            "~callbacks.sample_quality", "~callbacks.evaluate_at_end", "~callbacks.sample_grid"],
                           output_dir=run))
    tracked = flat(module.power_ema.find(0.15).state_dict())
    raw = flat(module.net.state_dict())
    scale = (tracked - raw).norm()
    snapshots = sorted((run / "ema_snapshots").glob("ema_*.pt"))
    rebuilt = {}
    rows = []
    for name, dtype in SNAPSHOT_DTYPES.items():
        folder = args.out / name
        folder.mkdir(exist_ok=True)
        size = 0
        for path in snapshots:
            s = torch.load(path, weights_only=True)
            s["state_dicts"] = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()} for sd in s["state_dicts"]]
            torch.save(s, folder / path.name)
            size += (folder / path.name).stat().st_size
        state, info = posthoc_state_dict(folder, 0.15, sources=[0.05, 0.10])
        rebuilt[name] = flat(state)
        rows.append((name, size / len(snapshots) / 2**20, ((rebuilt[name] - tracked).norm() / scale).item(),
                     ((rebuilt[name] - rebuilt["float32"]).norm() / scale).item(), info["profile_fit_error"]))
    print(f"{len(snapshots)} snapshots of a {args.steps}-step digits run; sigma_rel 0.15 rebuilt from 0.05/0.10\n")
    print("| snapshot dtype | MB per snapshot | rebuilt vs tracked 0.15 | rebuilt vs float32 rebuild | profile fit error |")
    print("|---|---|---|---|---|")
    for name, mb, vs_tracked, vs_fp32, fit in rows:
        print(f"| {name} | {mb:.2f} | {100 * vs_tracked:.3f}% | {100 * vs_fp32:.4f}% | {100 * fit:.2f}% |")


if __name__ == "__main__":
    main()
