"""docs/ablations/processes.md's last table: each process at its own best (sampler, NFE, w) cell of the evaluation grid,
and the pairwise comparisons of those bests (paired on the training seed; Holm's correction over all six).

    python docs/ablations/processes/best_settings.py EVAL_DIR_ddpm_eps EVAL_DIR_ddpm_v EVAL_DIR_flow EVAL_DIR_edm

Each EVAL_DIR is a ddpm.report'ed evaluation sweep over one process's three checkpoints (its runs.csv; the run
directories' overrides name the checkpoint, whose training seed pairs the processes)."""

import csv
import itertools
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from ddpm.evaluation.stats import compare, holm


def best_cell(eval_dir: Path) -> tuple[tuple, dict]:
    cells = defaultdict(dict)
    for row in csv.DictReader(open(eval_dir / "runs.csv")):
        overrides = yaml.safe_load(open(eval_dir / row["run"] / ".hydra" / "overrides.yaml"))
        checkpoint = next(o for o in overrides if o.startswith("ckpt_path="))
        seed = yaml.safe_load(open(Path(checkpoint.split("=", 1)[1]).parents[1] / ".hydra" / "overrides.yaml"))
        seed = int(next(re.sub("seed=", "", o) for o in seed if o.startswith("seed=")))
        cells[(row["sampler"], int(row["sampler.steps"]), float(row["guidance.scale"]))][seed] = float(row["fd_digits"])
    return min(cells.items(), key=lambda kv: statistics.fmean(kv[1].values()))


def main(dirs: list[str]) -> None:
    bests = {Path(d).name.removeprefix("eval_"): best_cell(Path(d)) for d in dirs}
    print("| process | best cell (sampler, NFE, w) | fd_digits mean ± std (n = 3) |\n|---|---|---|")
    for name, (cell, values) in sorted(bests.items(), key=lambda kv: statistics.fmean(kv[1][1].values())):
        print(f"| {name} | {cell[0]}, {cell[1]}, {cell[2]:g} | {statistics.fmean(values.values()):.2f} ± "
              f"{statistics.stdev(values.values()):.2f} |")
    pairs = list(itertools.combinations(bests, 2))
    tests = [compare(bests[a][1], bests[b][1]) for a, b in pairs]
    adjusted = holm([t.p for t in tests])
    print(f"\n{len(pairs)} comparisons (paired t-tests on the seed), Holm-adjusted:\n")
    print("| a vs b | difference a - b | 95% CI | p | Holm p |\n|---|---|---|---|---|")
    for (a, b), t, p in zip(pairs, tests, adjusted):
        print(f"| {a} vs {b} | {t.difference:.2f} | [{t.low:.2f}, {t.high:.2f}] | {t.p:.3g} | {p:.3g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
