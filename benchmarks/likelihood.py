"""What a bits/dim evaluation costs, per image and per estimator: DDPM's variational bound (T network evaluations per
image) and the probability-flow ODE with the exact divergence (one backward pass per dimension at every solver step)
or Hutchinson's estimate (one per probe). One table, the checkpoints measured one after another in one process.

    python benchmarks/likelihood.py CKPT [CKPT ...] [--images 50] [--rtol 1e-5]

Each row: the checkpoint's process, the estimator, the mean bits/dim of the first N test images under the model (given
their labels, p(x | y), for a class-conditional checkpoint; p(x) for an unconditional one), the network evaluations per
batch (the bound: one per step; the ODE: the solver's function evaluations, each a forward pass and the divergence's
backward passes) and the seconds per image.
"""

from __future__ import annotations

import argparse
import time

import torch

from ddpm.data import stack_dataset
from ddpm.inference import load


def estimators(discrete: bool, dims: int, learned: bool = False) -> list[dict]:
    if discrete:
        return [{"variance": "fixed_small"}, {"variance": "fixed_large"}] + ([{"variance": "learned_range"}] if learned else [])
    rows = [{"estimator": "hutchinson", "num_probes": 1}, {"estimator": "hutchinson", "num_probes": 4}]
    return rows + ([{"estimator": "exact"}] if dims <= 64 else [])  # exact: D backward passes a step (8x8 digits: 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=50, help="the first N test images")
    parser.add_argument("--rtol", type=float, default=1e-5, help="the ODE solver's rtol and atol")
    args = parser.parse_args()
    print("| checkpoint | process | estimator | bits/dim | NFE per batch | s per image |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        model = load(path, device="cpu")
        images, labels = stack_dataset(model.data().reference_set("test"), args.images)
        dims = images[0].numel()
        for options in estimators(model.process.discrete, dims, model.denoiser.learns_variance):
            start = time.perf_counter()
            given = labels if model.conditional else None  # an unconditional model: p(x)
            record = model.bits_per_dim(images, given, rtol=args.rtol, atol=args.rtol, batch_size=args.images, **options)
            seconds = time.perf_counter() - start
            protocol = record["protocol"]
            name = (f"bound ({protocol['variance']}, T = {protocol['steps']})" if protocol["method"] == "vlb" else
                    f"ODE, {protocol['estimator']}" + (f" x{protocol['num_probes']}" if protocol["num_probes"] else ""))
            print(f"| {path} | {model.process.name} | {name} | {record['mean']:.3f} | {protocol['nfe_per_batch']:.0f} | "
                  f"{seconds / len(images):.3f} |", flush=True)


if __name__ == "__main__":
    main()
