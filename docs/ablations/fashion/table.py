"""docs/ablations/fashion.md's tables: the five arms of experiments=fashion_findings at each w, the guidance methods on
the cosine eps run, the spread of the metric over sample draws of one model, and each finding's difference against
that spread (one training seed: the only noise this page can measure), with Holm's correction over the page.

    python docs/ablations/fashion/table.py TRAIN_SWEEP[,TRAIN_SWEEP] GUIDANCE_SWEEP DRAWS_SWEEP [ARM=EVAL_SWEEP ...]

TRAIN_SWEEP: `ddpm.train --multirun experiments=fashion_findings`; GUIDANCE_SWEEP: `ddpm.evaluate --multirun
evaluations=guidance_methods ...` on its cosine eps run; DRAWS_SWEEP: `ddpm.evaluate --multirun seed=0,1,2
guidance.scale=0,1 num_samples=500` on the same run (the sample seed changes, the model does not). ARM=EVAL_SWEEP: an
arm trained elsewhere and measured by `ddpm.evaluate --multirun guidance.scale=0,1 num_samples=500
sampler.precision=float32` (training's own final evaluation, to the bit)."""

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml
from scipy.stats import norm

from ddpm.evaluation.stats import holm

METRICS = ("fd_fashion", "kid_fashion", "guided_accuracy", "precision", "recall")


def overrides(run: Path) -> dict:
    items = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return dict(o.lstrip("+").split("=", 1) for o in items if "=" in o)


def arms(sweep: Path) -> dict:
    """{arm: {w: metrics}} from each training run's metrics.json (its final evaluation at every w)."""
    out = {}
    for path in sorted(sweep.glob("*/metrics.json")):
        arm = overrides(path.parent)["experiments/fashion_findings"]
        out[arm] = {float(e["guidance_scale"]): e["metrics"] for e in json.loads(path.read_text())["evaluations"]}
    return out


def evaluations(sweep: Path) -> list[tuple[dict, dict]]:
    """(overrides, metrics) of each evaluation of a ddpm.evaluate multirun."""
    return [(overrides(p.parent), json.loads(p.read_text())["metrics"]) for p in sorted(sweep.glob("*/metrics.json"))]


def main(train: str, guidance: str, draws: str, *more: str) -> None:
    results = {arm: cells for sweep in train.split(",") for arm, cells in arms(Path(sweep)).items()}
    for item in more:  # ARM=EVAL_SWEEP
        arm, sweep = item.split("=", 1)
        results[arm] = {float(o["guidance.scale"]): m for o, m in evaluations(Path(sweep))}
    results = dict(sorted(results.items(), key=lambda kv: ("linear_eps", "cosine_eps", "cosine_v", "flow", "edm").index(kv[0])))
    scales = sorted(set.intersection(*(set(cells) for cells in results.values())))  # the w every arm was measured at
    print("### The arms, one seed each (500 samples, DPM-Solver++(2M) 20 steps)\n")
    print("| arm | " + " | ".join(f"fd_fashion w={w:g}" for w in scales) + " | " +
          " | ".join(f"kid_fashion w={w:g}" for w in scales) + " | accuracy w=0 | accuracy w=1 |")
    print("|---|" + "---|" * (2 * len(scales) + 2))
    for arm, cells in results.items():
        print(f"| {arm} | " + " | ".join(f"{cells[w]['fd_fashion']:.1f}" for w in scales) + " | " +
              " | ".join(f"{cells[w]['kid_fashion']:.2f}" for w in scales) +
              f" | {cells[0.0]['guided_accuracy']:.3f} | {cells[1.0]['guided_accuracy']:.3f} |")

    spread = defaultdict(lambda: defaultdict(list))
    for o, m in evaluations(Path(draws)):
        for name in ("fd_fashion", "kid_fashion"):
            spread[float(o["guidance.scale"])][name].append(m[name])
    print("\n### Spread over sample draws (the cosine eps model, 3 sample seeds of 500 images)\n")
    print("| w | fd_fashion mean ± std | kid_fashion mean ± std |\n|---|---|---|")
    for w, by in sorted(spread.items()):
        print(f"| {w:g} | {statistics.fmean(by['fd_fashion']):.2f} ± {statistics.stdev(by['fd_fashion']):.2f} | "
              f"{statistics.fmean(by['kid_fashion']):.3f} ± {statistics.stdev(by['kid_fashion']):.3f} |")

    rows = defaultdict(dict)
    for o, m in evaluations(Path(guidance)):
        rows[(o["guidance.method"], float(o["guidance.scale"]))] = m
    print("\n### Guidance methods on the cosine eps run (DDIM, 50 steps, 500 samples; autoguidance's guide: its step 450)\n")
    print("| method | w | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS))
    for (method, w), m in sorted(rows.items()):
        print(f"| {method} | {w:g} | " + " | ".join(f"{m[k]:.3g}" for k in METRICS) + " |")

    # Findings: two models' 500-sample numbers differ by draw noise alone with std sqrt(2) s (s: the spread over draws
    # at that w, measured on one model and taken as every model's); z = difference / (sqrt(2) s), two-sided p.
    def test(label, a, b, w):
        s = statistics.stdev(spread[0.0 if w == 0 else 1.0]["fd_fashion"])
        z = (a - b) / (math.sqrt(2) * s)
        return label, a, b, 2 * norm.sf(abs(z))

    findings = [test(f"linear vs cosine (eps), w={w:g}", results["linear_eps"][w]["fd_fashion"],
                     results["cosine_eps"][w]["fd_fashion"], w) for w in (0.0, 1.0)]
    for w in (0.0, 1.0):
        best = min(("cosine_eps", "cosine_v", "flow", "edm"), key=lambda a: results[a][w]["fd_fashion"])
        second = min((a for a in ("cosine_eps", "cosine_v", "flow", "edm") if a != best), key=lambda a: results[a][w]["fd_fashion"])
        findings.append(test(f"process, w={w:g}: {best} vs {second}", results[best][w]["fd_fashion"],
                             results[second][w]["fd_fashion"], w))
    for w in (1.0, 2.0):
        if ("apg", w) in rows and ("cfg", w) in rows:
            findings.append(test(f"apg vs cfg, w={w:g}", rows[("apg", w)]["fd_fashion"], rows[("cfg", w)]["fd_fashion"], w))
        if ("autoguidance", w) in rows and ("cfg", w) in rows:
            findings.append(test(f"autoguidance vs cfg, w={w:g}", rows[("autoguidance", w)]["fd_fashion"],
                                 rows[("cfg", w)]["fd_fashion"], w))
    adjusted = holm([p for *_, p in findings])
    print("\n### Findings against the draw noise (fd_fashion; Holm over these comparisons)\n")
    print("| comparison | first | second | p (draws) | Holm p | beyond the draw noise |\n|---|---|---|---|---|---|")
    for (label, a, b, p), q in zip(findings, adjusted):
        shown = lambda v: "< 1e-6" if v < 1e-6 else f"{v:.2g}"  # noqa: E731 (a normal tail that far out is no number)
        print(f"| {label} | {a:.1f} | {b:.1f} | {shown(p)} | {shown(q)} | {'yes' if q < 0.05 else 'no'} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
