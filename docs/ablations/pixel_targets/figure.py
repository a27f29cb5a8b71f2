"""docs/ablations/pixel_targets.md's figure: the seed-0 final grid of each prediction target, one row per sweep
(experiments=pixel_targets at 14x14 patches, then its 7x7-patch control).

    python docs/ablations/pixel_targets/figure.py SWEEP [SWEEP ...]

Each SWEEP is a `python -m ddpm.train --multirun experiments=pixel_targets ...` directory; its runs' overrides name the
target (diffusion.prediction), the seed and any model override."""

import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGETS = ("x0", "eps", "v")


def seed0_runs(sweep: Path) -> tuple[dict, str]:
    runs, label = {}, ""
    for run in sorted(p for p in sweep.iterdir() if (p / ".hydra").exists()):
        o = dict(x.split("=", 1) for x in yaml.safe_load(open(run / ".hydra" / "overrides.yaml")))
        if int(o.get("seed", 0)) == 0 and (run / "samples" / "final.png").exists():
            runs[o["diffusion.prediction"]] = run / "samples" / "final.png"
            label = f"patch {o.get('model.patch_size', 14)}, rank {o.get('model.bottleneck', 32)}"
    return runs, label


def main(sweeps: list[str]) -> None:
    fig, axes = plt.subplots(len(sweeps), len(TARGETS), figsize=(3.2 * len(TARGETS), 3.4 * len(sweeps)), squeeze=False)
    for i, sweep in enumerate(sweeps):
        runs, label = seed0_runs(Path(sweep))
        for j, target in enumerate(TARGETS):
            ax = axes[i][j]
            if target in runs:
                ax.imshow(plt.imread(runs[target]), cmap="gray")
            ax.set_title(f"{target}-prediction, {label} (seed 0)", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(Path(__file__).parent / "samples.png", dpi=55)


if __name__ == "__main__":
    main(sys.argv[1:])
