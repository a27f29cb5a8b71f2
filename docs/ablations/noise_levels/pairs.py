"""docs/ablations/noise_levels.md's planned comparisons: within each process, its two training distributions of noise
levels (flow: uniform vs logit-normal t; edm: log-normal vs uniform-in-lambda sigma), on fd_digits at w = 0 and 1,
paired on the seed, with Holm's correction over the four.

    python docs/ablations/noise_levels/pairs.py SWEEP_DIR      (the runs' metrics.json, as ddpm.report reads them)"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from ddpm.evaluation.stats import compare, holm

PAIRS = [("flow_logit_normal", "flow_uniform"), ("edm_log_normal", "edm_uniform_lambda")]


def main(sweep: Path) -> None:
    values = defaultdict(dict)  # (arm, w) -> {seed: fd_digits}
    for run in sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file()):
        overrides = dict(o.lstrip("+").split("=", 1) for o in yaml.safe_load(open(run / ".hydra" / "overrides.yaml")))
        arm, seed = overrides["experiments/noise_levels"], int(overrides["seed"])
        for entry in json.loads((run / "metrics.json").read_text())["evaluations"]:
            values[(arm, f"{entry['guidance_scale']:g}")][seed] = entry["metrics"]["fd_digits"]
    rows = [(a, b, w, compare(values[(a, w)], values[(b, w)])) for a, b in PAIRS for w in ("0", "1")]
    adjusted = holm([t.p for *_, t in rows])
    print("| comparison | w | fd_digits a - b | 95% CI | p | Holm p (4 tests) |\n|---|---|---|---|---|---|")
    for (a, b, w, t), p in zip(rows, adjusted):
        print(f"| {a} vs {b} | {w} | {t.difference:.2f} | [{t.low:.2f}, {t.high:.2f}] | {t.p:.3g} | {p:.3g} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
