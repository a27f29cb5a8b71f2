"""docs/ablations/few_step.md's tables: each arm's best (sampler, w) cell at 1, 2 and 4 NFE, and the few-step
objectives against the best denoising model at the same NFE (paired on the training seed; Holm's correction over every
comparison the page makes).

    python docs/ablations/few_step/table.py EVAL_SWEEP_DIR [EVAL_SWEEP_DIR ...]

Each EVAL_SWEEP_DIR is a `ddpm.evaluate --multirun evaluations=few_step` sweep; each job's metrics.json names its
checkpoint, whose training run's overrides name the arm (+experiments/few_step=ARM) and the seed."""

import itertools
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from ddpm.evaluation.stats import compare, holm

METRIC = "fd_digits"
FEW_STEP = ("ect", "ect_tuned", "meanflow", "shortcut")


def arm_and_seed(checkpoint: str) -> tuple[str, int]:
    overrides = yaml.safe_load(open(Path(checkpoint).parents[1] / ".hydra" / "overrides.yaml"))
    values = dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)
    return values["experiments/few_step"], int(values.get("seed", 0))


def read(dirs: list[str]) -> dict:
    """{(arm, nfe): {(sampler, w): {seed: metric}}}."""
    cells = defaultdict(lambda: defaultdict(dict))
    for d in dirs:
        for path in sorted(Path(d).glob("*/metrics.json")):
            record = json.loads(path.read_text())
            protocol, value = record["protocol"], (record.get("metrics") or {}).get(METRIC)
            if value is None:
                continue
            arm, seed = arm_and_seed(protocol["checkpoint"]["path"])
            cell = (protocol["sampler"]["name"], float(protocol["guidance_scale"]))
            cells[(arm, int(protocol["sampler"]["steps"]))][cell][seed] = float(value)
    return cells


def main(dirs: list[str]) -> None:
    cells = read(dirs)
    arms = sorted({a for a, _ in cells}, key=lambda a: (a in FEW_STEP, a))
    nfes = sorted({n for _, n in cells})
    best = {key: min(grid.items(), key=lambda kv: statistics.fmean(kv[1].values())) for key, grid in cells.items()}
    print(f"{METRIC} (lower is better), each arm's best (sampler, w) at each NFE, mean ± std over the seeds:\n")
    print("| arm | " + " | ".join(f"{n} NFE" for n in nfes) + " |\n|---|" + "---|" * len(nfes))
    for arm in arms:
        row = []
        for n in nfes:
            if (arm, n) not in best:
                row.append("")
                continue
            (sampler, w), values = best[(arm, n)]
            v = list(values.values())
            row.append(f"{statistics.fmean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f} ({sampler}, w={w:g}, n={len(v)})")
        print(f"| {arm} | " + " | ".join(row) + " |")
    comparisons = []
    for n in nfes:
        denoising = [a for a in arms if a not in FEW_STEP and (a, n) in best]
        if not denoising:
            continue
        top = min(denoising, key=lambda a: statistics.fmean(best[(a, n)][1].values()))
        comparisons += [(n, a, top) for a in FEW_STEP if (a, n) in best]
    tests = [compare(best[(a, n)][1], best[(b, n)][1]) for n, a, b in comparisons]
    kept = [(c, t) for c, t in zip(comparisons, tests) if t is not None]
    adjusted = holm([t.p for _, t in kept])
    print(f"\n{len(kept)} comparisons: each few-step objective against the best denoising arm at the same NFE (each side"
          " at its best cell, picked on the same data), paired t-tests on the training seed, Holm-adjusted:\n")
    print("| NFE | a vs b | difference a - b | 95% CI | p | Holm p |\n|---|---|---|---|---|---|")
    for ((n, a, b), t), p in zip(kept, adjusted):
        print(f"| {n} | {a} vs {b} | {t.difference:.1f} | [{t.low:.1f}, {t.high:.1f}] | {t.p:.3g} | {p:.3g} |")


if __name__ == "__main__":
    main(sys.argv[1:])
