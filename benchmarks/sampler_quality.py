"""Quality against the number of model evaluations (NFE) on digits: one checkpoint, several samplers.

    python benchmarks/sampler_quality.py CKPT [--num-samples 1000] [--guidance-scale 1] [--out table.json]

Runs ``ddpm.evaluate`` once per row (same seed, same labels, same reference statistics) and prints a markdown
table of fd_digits, guided accuracy, diversity and sampling time. A benchmark, not a test: numbers depend on the
checkpoint and the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ddpm.config import compose
from ddpm.evaluate import evaluate

ROWS = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("dpmpp_2m", 10), ("dpmpp_2m", 20),
        ("heun", 10), ("heun", 20)]  # heun: N levels cost 2N - 1 evaluations, so 9 and 19


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_path")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--guidance-scale", type=float, default=None, help="w; default: the checkpoint's")
    parser.add_argument("--rows", default=None, help="e.g. ddim:20,dpmpp_2m:20 (default: the full table)")
    parser.add_argument("--out", default="sampler_quality.json")
    parser.add_argument("overrides", nargs="*", help="extra ddpm.evaluate overrides, e.g. sampler.x0_clip=none")
    args = parser.parse_args()
    rows = [(name, int(steps)) for name, steps in (r.split(":") for r in args.rows.split(","))] if args.rows else ROWS

    records = []
    for name, steps in rows:
        overrides = [f"ckpt_path={args.ckpt_path}", f"sampler={name}", f"sampler.steps={steps}",
                     f"num_samples={args.num_samples}", *args.overrides]
        if args.guidance_scale is not None:
            overrides.append(f"guidance.scale={args.guidance_scale}")
        with tempfile.TemporaryDirectory() as run_dir:
            record = evaluate(compose(overrides, config_name="evaluate", output_dir=run_dir))
        records.append(record)
        m = record["metrics"]
        print(f"{name}@{steps}: fd_digits {m.get('fd_digits', float('nan')):.2f}  accuracy {m.get('guided_accuracy', float('nan')):.3f}  "
              f"{m['sampling_seconds']:.1f} s", flush=True)

    lines = ["| sampler | steps (NFE) | fd_digits | guided accuracy | diversity | sampling s | images/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for record in records:
        m, p = record["metrics"], record["protocol"]
        lines.append(f"| {p['sampler']['name']} | {m['nfe']:.0f} | {m.get('fd_digits', float('nan')):.2f} | "
                     f"{m.get('guided_accuracy', float('nan')):.3f} | {m.get('diversity', float('nan')):.3f} | "
                     f"{m['sampling_seconds']:.1f} | {m['images_per_second']:.1f} |")
    p = records[0]["protocol"]
    print()
    print(f"{p['num_samples']} samples, guidance w={p['guidance_scale']}, {p['weights']} weights, seed {p['seed']}, "
          f"reference {p['reference']['dataset']} {p['reference']['split']} ({p['reference']['size']} images), "
          f"checkpoint step {p['checkpoint']['global_step']}")
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
