"""docs/ablations/likelihood.md's tables: bits/dim and sample quality of the arms of experiments=likelihood (or
likelihood_fashion), and every comparison the page makes, paired on the training seed, with Holm's correction over
the page.

    python docs/ablations/likelihood/table.py METRIC TRAIN_SWEEP BPD_SWEEP STEPS_SWEEP

METRIC: fd_digits or fd_fashion. TRAIN_SWEEP: `ddpm.train --multirun experiments=likelihood` (its runs' overrides name
the arm and seed); BPD_SWEEP: `ddpm.evaluate --multirun evaluations=likelihood ckpt_path=...` over its checkpoints;
STEPS_SWEEP: `ddpm.evaluate --multirun evaluations=likelihood_steps ckpt_path=...` over its DDPM checkpoints. With one
seed per arm (Fashion-MNIST) the tables are printed and no test is made."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from ddpm.evaluation.stats import holm, paired

ORDER = ("linear", "cosine", "cosine_learned", "flow", "edm", "trigflow")


def overrides(run: Path) -> dict:
    items = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return dict(o.lstrip("+").split("=", 1) for o in items if "=" in o)


def training_runs(sweep: Path) -> dict[str, tuple[str, int]]:
    """{run directory: (arm, seed)} of a training sweep."""
    out = {}
    for run in sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        o = overrides(run)
        arm = next(v for k, v in o.items() if k.startswith("experiments/likelihood"))  # either preset's group
        out[str(run.resolve())] = (arm, int(o.get("seed", 0)))
    return out


def evaluations(sweep: Path, runs: dict) -> list[tuple[str, int, dict, dict]]:
    """(arm, seed, overrides, metrics) of each evaluation of a ddpm.evaluate multirun over the sweep's checkpoints."""
    out = []
    for path in sorted(sweep.glob("*/metrics.json")):
        o = overrides(path.parent)
        run = str(Path(o["ckpt_path"]).resolve().parent.parent)
        out.append((*runs[run], o, json.loads(path.read_text())["metrics"]))
    return out


def cell(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(metric: str, train: str, bpd_sweep: str, steps_sweep: str) -> None:
    runs = training_runs(Path(train))
    bpd, fd, fd_steps, nfe = defaultdict(dict), defaultdict(dict), defaultdict(dict), defaultdict(list)
    for arm, seed, o, m in evaluations(Path(bpd_sweep), runs):
        bpd[arm][seed], fd[arm][seed] = m["bpd"], m[metric]
    for arm, seed, o, m in evaluations(Path(steps_sweep), runs):
        fd_steps[(arm, int(o["sampler.steps"]))][seed] = m[metric]
    arms = [a for a in ORDER if a in bpd]
    seeds = max(len(v) for v in bpd.values())
    print(f"### Bits/dim of the test split and {metric} (500 samples, DPM-Solver++(2M) 20 steps), "
          f"{seeds} seed{'s' if seeds > 1 else ''} each (mean ± std)\n")
    print(f"| arm | bits/dim | {metric} |\n|---|---|---|")
    for arm in arms:
        print(f"| {arm} | {cell(list(bpd[arm].values()), 3)} | {cell(list(fd[arm].values()), 1)} |")
    steps = sorted({s for _, s in fd_steps})
    ddpm_arms = [a for a in arms if any((a, s) in fd_steps for s in steps)]
    print(f"\n### {metric} with ancestral DDPM sampling at {', '.join(map(str, steps))} steps (500 samples)\n")
    print("| arm | " + " | ".join(f"{s} steps" for s in steps) + " |\n|---|" + "---|" * len(steps))
    for arm in ddpm_arms:
        print(f"| {arm} | " + " | ".join(cell(list(fd_steps[(arm, s)].values()), 1) for s in steps) + " |")
    if seeds < 2:
        return
    tests = [("bits/dim: cosine vs linear", bpd["cosine"], bpd["linear"]),
             ("bits/dim: cosine_learned vs cosine", bpd["cosine_learned"], bpd["cosine"])]
    tests += [(f"{metric} at {s} DDPM steps: cosine_learned vs cosine", fd_steps[("cosine_learned", s)],
               fd_steps[("cosine", s)]) for s in steps]
    tests += [(f"bits/dim: {arm} vs cosine (DDPM's bound)", bpd[arm], bpd["cosine"]) for arm in ("flow", "edm", "trigflow")
              if arm in bpd]
    results = [(label, paired([a[s] for s in sorted(a)], [b[s] for s in sorted(a)])) for label, a, b in tests]
    adjusted = holm([c.p for _, c in results])
    print(f"\n### Every comparison on this page: paired t-tests over the {seeds} training seeds, Holm over all "
          f"{len(results)}\n")
    print("| comparison | mean difference | 95% CI | p | Holm p | holds |\n|---|---|---|---|---|---|")
    for (label, c), q in zip(results, adjusted):
        print(f"| {label} | {c.difference:+.3f} | [{c.low:+.3f}, {c.high:+.3f}] | {c.p:.2g} | {q:.2g} | "
              f"{'yes' if q < 0.05 else 'no'} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
