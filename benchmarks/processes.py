"""`python benchmarks/processes.py`: what a process costs, one row each, on the digits network (unet_tiny, 1x8x8).

For ddpm (eps and v, cosine), flow, edm and trigflow it times, side by side in one process and round-robin (each
round times one step of every process, so all see the same machine state):
- the training step (label dropout, the process's t and noise, preconditioning, forward, loss, backward, AdamW);
- guided DDIM sampling of 256 images, per network evaluation (NFE).
Each ratio is the median of the per-round ratios to the ddpm eps row. Prints a markdown table and writes it as JSON.
A benchmark, never a test: the numbers depend on the machine. Run it alone (two torch processes on 2 cores slow each
other 5-20x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ddpm.config import build_network
from ddpm.core.objectives.denoising import Denoising
from ddpm.core.denoiser import Denoiser
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.guidance import drop_labels, guided
from ddpm.core.processes.edm import EDMProcess
from ddpm.core.processes.flow import FlowProcess
from ddpm.core.processes.trigflow import TrigFlowProcess
from ddpm.core.samplers.ddim import sample_ddim
from ddpm.core.schedules import cosine_betas

MODEL = "unet_tiny"  # the network of the default digits run (conf/model/)
ARMS = {  # name: (process, prediction, loss weight), each process's own defaults (conf/process/*.yaml)
    "ddpm eps (cosine)": (lambda: DDPMProcess(cosine_betas(1000)), "eps", "uniform"),
    "ddpm v (cosine)": (lambda: DDPMProcess(cosine_betas(1000)), "v", "uniform"),
    "flow (logit-normal)": (lambda: FlowProcess(), "velocity", "uniform"),
    "edm": (lambda: EDMProcess(sigma_data=0.75), "edm", "edm"),
    "trigflow": (lambda: TrigFlowProcess(), "v", "uniform"),
}


def arm(name: str, batch: int, seed: int = 0):
    make, prediction, weight = ARMS[name]
    torch.manual_seed(seed)
    net = build_network(f"model={MODEL}")
    denoiser = Denoiser(net, make(), prediction, weight)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4)
    x0, labels = torch.randn(batch, 1, 8, 8).clamp(-1, 1), torch.randint(0, 10, (batch,))

    def train_step() -> float:
        start = time.perf_counter()
        loss = Denoising()(denoiser, x0, drop_labels(labels, 0.1, net.null_label))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    def sample(steps: int) -> float:
        noise = torch.randn(256, 1, 8, 8)
        start = time.perf_counter()
        with torch.no_grad():
            sample_ddim(guided(denoiser, labels[:1].expand(256), 1.0), denoiser.process, noise, steps=steps)
        return (time.perf_counter() - start) / steps

    return train_step, sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="training batch (the digits preset's)")
    parser.add_argument("--rounds", type=int, default=60, help="timed training rounds after 10 warm-up rounds")
    parser.add_argument("--sample-rounds", type=int, default=8, help="timed sampling rounds (20 NFE each)")
    parser.add_argument("--json", default="processes_bench.json")
    args = parser.parse_args(argv)
    arms = {name: arm(name, args.batch) for name in ARMS}
    train = {name: [] for name in arms}
    for round_ in range(10 + args.rounds):
        for name, (step, _) in arms.items():
            seconds = step()
            if round_ >= 10:
                train[name].append(seconds)
    sampling = {name: [] for name in arms}
    for round_ in range(1 + args.sample_rounds):
        for name, (_, sample) in arms.items():
            seconds = sample(20)
            if round_ >= 1:
                sampling[name].append(seconds)
    base = next(iter(arms))
    rows = []
    for name in arms:
        train_ratio = statistics.median(a / b for a, b in zip(train[name], train[base]))
        sample_ratio = statistics.median(a / b for a, b in zip(sampling[name], sampling[base]))
        rows.append({"process": name, "train_step_ms": 1e3 * statistics.median(train[name]), "train_vs_ddpm": train_ratio,
                     "ms_per_nfe_256": 1e3 * statistics.median(sampling[name]), "sampling_vs_ddpm": sample_ratio})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds\n")
    print("| process | training step (ms) | vs ddpm eps | guided sampling, ms per NFE (256 images) | vs ddpm eps |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['process']} | {r['train_step_ms']:.2f} | {r['train_vs_ddpm']:.3f} | {r['ms_per_nfe_256']:.2f} | "
              f"{r['sampling_vs_ddpm']:.3f} |")
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
