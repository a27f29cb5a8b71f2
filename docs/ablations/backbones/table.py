"""docs/ablations/backbones.md's tables: each backbone x process pair of experiments=backbones at its own best
(sampler, NFE, w) cell of evaluations=backbones, and at one cell fixed before the data (dpmpp_2m, 20 steps, w = 0.5:
the processes page's best scale); U-Net against DiT under each process, paired on the training seed, at both; the
processes against each other on each backbone at their best cells (SiT's question); and a figure of each arm's seed-0
training grid. Holm's correction over all twelve tests.

    python docs/ablations/backbones/table.py TRAIN_SWEEP EVAL_SWEEP [LONG_SWEEP]

TRAIN_SWEEP is the `python -m ddpm.train --multirun experiments=backbones` directory (each run's overrides name its
arm and seed); EVAL_SWEEP the `python -m ddpm.evaluate --multirun evaluations=backbones ckpt_path=...` one (each run's
overrides name its checkpoint and cell, its metrics.json the result). LONG_SWEEP, optional, is the same arms at seed 0
for 3,000 steps (`experiments=backbones trainer.max_steps=3000 seed=0`): their final evaluation, and their grids."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import yaml

from ddpm.evaluation.stats import compare, holm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BACKBONES, PROCESSES = ("unet", "dit"), ("ddpm", "flow", "edm")
FIXED = ("dpmpp_2m", 20, 0.5)


def overrides(run: Path) -> dict:
    return dict(o.lstrip("+").split("=", 1) for o in yaml.safe_load(open(run / ".hydra" / "overrides.yaml")))


def arm_and_seed(train_run: Path) -> tuple[str, int]:
    o = overrides(train_run)
    return o["experiments/backbones"], int(o.get("seed", 0))


def cells(eval_sweep: Path) -> dict:
    """{arm: {(sampler, steps, w): {seed: fd_digits}}}"""
    table = defaultdict(lambda: defaultdict(dict))
    for run in sorted(p for p in eval_sweep.iterdir() if (p / "metrics.json").exists()):
        o = overrides(run)
        arm, seed = arm_and_seed(Path(o["ckpt_path"]).parents[1])
        cell = (o["sampler"], int(o["sampler.steps"]), float(o["guidance.scale"]))
        table[arm][cell][seed] = json.load(open(run / "metrics.json"))["metrics"]["fd_digits"]
    return table


def mean_std(values: dict) -> str:
    return f"{statistics.fmean(values.values()):.2f} ± {statistics.stdev(values.values()):.2f}"


def long_runs(sweep: Path) -> None:
    print("\n| backbone | process | final loss | fd_digits at w = 0 | at w = 1 | guided accuracy at w = 0 |\n|---|---|---|---|---|---|")
    runs = {arm_and_seed(r)[0]: json.load(open(r / "metrics.json")) for r in sweep.iterdir() if (r / "metrics.json").exists()}
    for process in PROCESSES:
        for backbone in BACKBONES:
            record = runs[f"{backbone}_{process}"]
            by_w = {e["guidance_scale"]: e["metrics"] for e in record["evaluations"]}
            print(f"| {backbone} | {process} | {record['final_loss']:.4f} | {by_w[0.0]['fd_digits']:.1f} | "
                  f"{by_w[1.0]['fd_digits']:.1f} | {by_w[0.0]['guided_accuracy']:.3f} |")


def figure(train_sweep: Path, out: Path) -> None:
    runs = {arm_and_seed(r): r for r in train_sweep.iterdir() if (r / ".hydra").exists()}
    fig, axes = plt.subplots(len(BACKBONES), len(PROCESSES), figsize=(3 * len(PROCESSES), 3 * len(BACKBONES)))
    for i, backbone in enumerate(BACKBONES):
        for j, process in enumerate(PROCESSES):
            ax = axes[i][j]
            ax.imshow(plt.imread(runs[(f"{backbone}_{process}", 0)] / "samples" / "final.png"), cmap="gray")
            ax.set_title(f"{backbone}, {process} (seed 0)", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(train_sweep: str, eval_sweep: str, long_sweep: str | None = None) -> None:
    table = cells(Path(eval_sweep))
    best = {arm: min(c.items(), key=lambda kv: statistics.fmean(kv[1].values())) for arm, c in table.items()}
    print("| backbone | process | best cell (sampler, steps, w) | fd_digits there | at dpmpp_2m, 20, w = 0.5 |")
    print("|---|---|---|---|---|")
    for process in PROCESSES:
        for backbone in BACKBONES:
            arm = f"{backbone}_{process}"
            (sampler, steps, w), values = best[arm]
            print(f"| {backbone} | {process} | {sampler}, {steps}, {w:g} | {mean_std(values)} | "
                  f"{mean_std(table[arm][FIXED])} |")
    names, tests = [], []
    for process in PROCESSES:
        unet, dit = f"unet_{process}", f"dit_{process}"
        names.append(f"{process}: unet vs dit, each at its best cell")
        tests.append(compare(best[unet][1], best[dit][1]))
        names.append(f"{process}: unet vs dit at dpmpp_2m, 20, w = 0.5")
        tests.append(compare(table[unet][FIXED], table[dit][FIXED]))
    for backbone in BACKBONES:
        for a, b in (("flow", "ddpm"), ("flow", "edm"), ("edm", "ddpm")):
            names.append(f"{backbone}: {a} vs {b}, each at its best cell")
            tests.append(compare(best[f"{backbone}_{a}"][1], best[f"{backbone}_{b}"][1]))
    adjusted = holm([t.p for t in tests])
    print(f"\n{len(tests)} comparisons (paired t-tests on the training seed, n = 3), Holm-adjusted:\n")
    print("| comparison (a vs b) | difference a - b | 95% CI | p | Holm p |\n|---|---|---|---|---|")
    for name, t, p in zip(names, tests, adjusted):
        print(f"| {name} | {t.difference:.2f} | [{t.low:.2f}, {t.high:.2f}] | {t.p:.3g} | {p:.3g} |")
    figure(Path(train_sweep), Path(__file__).parent / "training_grid.png")
    if long_sweep:
        long_runs(Path(long_sweep))
        figure(Path(long_sweep), Path(__file__).parent / "training_grid_3000.png")


if __name__ == "__main__":
    main(*sys.argv[1:])
