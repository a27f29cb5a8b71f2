"""`python benchmarks/objectives.py`: what a training objective costs, one row each, on the digits network (unet_tiny).

For each objective on its process (denoising on flow and on edm as the baselines; consistency (ECT) on edm; meanflow and
shortcut on flow) it times, side by side in one process and round-robin (each round times one step of every arm, so
all see the same machine state):
- the training step (label dropout, the objective's draws, its network calls, backward, AdamW), as a ratio to the
  denoising step on the same process (the median of the per-round ratios);
- one-step generation: milliseconds per image at 1 NFE with the objective's own sampler (256 images);
and, for MeanFlow, where its step's time goes: the JVP that makes the target, the forward and backward of the loss.
Prints markdown tables and writes them as JSON. A benchmark, never a test; run it alone (two torch processes on 2 cores
slow each other 5-20x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ddpm.config import build_network
from ddpm.core.denoiser import Denoiser
from ddpm.core.guidance import Guidance, drop_labels
from ddpm.core.objectives.consistency import Consistency
from ddpm.core.objectives.denoising import Denoising
from ddpm.core.objectives.meanflow import MeanFlow
from ddpm.core.objectives.shortcut import Shortcut
from ddpm.core.processes.edm import EDMProcess
from ddpm.core.processes.flow import FlowProcess
from ddpm.core.samplers.consistency import ConsistencySampler
from ddpm.core.samplers.ddim import DDIM
from ddpm.core.samplers.meanflow import MeanFlowSampler

MODEL = "unet_tiny"  # the network of the default digits run (conf/model/)
ARMS = {  # name: (objective, process, prediction, baseline arm, one-step sampler)
    "denoising (flow)": (Denoising(), FlowProcess, "velocity", "denoising (flow)", DDIM(steps=1)),
    "denoising (edm)": (Denoising(), lambda: EDMProcess(sigma_data=0.75), "edm", "denoising (edm)", DDIM(steps=1)),
    "consistency / ECT (edm)": (Consistency(), lambda: EDMProcess(sigma_data=0.75), "edm", "denoising (edm)",
                                ConsistencySampler(steps=1)),
    "meanflow (flow)": (MeanFlow(), FlowProcess, "velocity", "denoising (flow)", MeanFlowSampler(steps=1)),
    "shortcut (flow)": (Shortcut(), FlowProcess, "velocity", "denoising (flow)", MeanFlowSampler(steps=1)),
}


def arm(name: str, batch: int, seed: int = 0):
    objective, make, prediction, _, sampler = ARMS[name]
    torch.manual_seed(seed)
    net = build_network(f"model={MODEL}", second_time=objective.second_time)
    ema = build_network(f"model={MODEL}", second_time=objective.second_time).requires_grad_(False)
    denoiser = Denoiser(net, make(), prediction, "edm" if prediction == "edm" else "uniform", boundary=objective.boundary)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4)
    x0, labels = torch.randn(batch, 1, 8, 8).clamp(-1, 1), torch.randint(0, 10, (batch,))

    def train_step() -> float:
        start = time.perf_counter()
        loss = objective(denoiser, x0, drop_labels(labels, 0.1, net.null_label), ema=ema, step=1000)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    def one_step() -> float:
        noise = torch.randn(256, 1, 8, 8)
        start = time.perf_counter()
        with torch.no_grad():
            sampler(Guidance().model_fn(denoiser, labels[:1].expand(256)), denoiser.process, noise)
        return (time.perf_counter() - start) / 256

    return train_step, one_step, denoiser


def meanflow_parts(denoiser: Denoiser, batch: int, rounds: int) -> dict:
    """Median seconds of MeanFlow's parts: the target's JVP (no gradient), the loss's forward, its backward."""
    x0, labels = torch.randn(batch, 1, 8, 8).clamp(-1, 1), torch.randint(0, 10, (batch,))
    objective, process = MeanFlow(), denoiser.process
    times = {"jvp (target)": [], "forward (loss)": [], "backward": []}
    for round_ in range(5 + rounds):
        t, r = objective.draw_times(batch, "cpu")
        alpha, sigma = process.alpha_sigma(t)
        eps = torch.randn_like(x0)
        z = alpha.float().view(-1, 1, 1, 1) * x0 + sigma.float().view(-1, 1, 1, 1) * eps
        v = process.velocity(x0, eps, t)
        start = time.perf_counter()
        target = objective.target(denoiser, z, v, t, r, labels)
        middle = time.perf_counter()
        loss = (denoiser.output(z, t, labels, None, r) - target).square().mean()
        forward = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        if round_ >= 5:
            for key, seconds in zip(times, (middle - start, forward - middle, end - forward)):
                times[key].append(seconds)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="training batch (the digits preset's)")
    parser.add_argument("--rounds", type=int, default=40, help="timed training rounds after 5 warm-up rounds")
    parser.add_argument("--sample-rounds", type=int, default=10, help="timed one-step sampling rounds")
    parser.add_argument("--json", default="objectives_bench.json")
    args = parser.parse_args(argv)
    arms = {name: arm(name, args.batch) for name in ARMS}
    train = {name: [] for name in arms}
    for round_ in range(5 + args.rounds):
        for name, (step, _, _) in arms.items():
            seconds = step()
            if round_ >= 5:
                train[name].append(seconds)
    sampling = {name: [] for name in arms}
    for round_ in range(1 + args.sample_rounds):
        for name, (_, sample, _) in arms.items():
            seconds = sample()
            if round_ >= 1:
                sampling[name].append(seconds)
    rows = []
    for name in arms:
        base = ARMS[name][3]
        rows.append({"objective": name, "train_step_ms": 1e3 * statistics.median(train[name]),
                     "vs_denoising": statistics.median(a / b for a, b in zip(train[name], train[base])),
                     "one_step_ms_per_image": 1e3 * statistics.median(sampling[name])})
    parts = meanflow_parts(arms["meanflow (flow)"][2], args.batch, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds\n")
    print("| objective | training step (ms) | vs denoising on its process | 1 NFE, ms per image (256 images) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['train_step_ms']:.2f} | {r['vs_denoising']:.3f} | {r['one_step_ms_per_image']:.4f} |")
    total = sum(parts.values())
    print("\nWhere MeanFlow's step goes (ms, share of these three):\n\n| part | ms | share |\n|---|---|---|")
    for key, seconds in parts.items():
        print(f"| {key} | {1e3 * seconds:.2f} | {seconds / total:.0%} |")
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "meanflow_parts_ms": {k: 1e3 * v for k, v in parts.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
