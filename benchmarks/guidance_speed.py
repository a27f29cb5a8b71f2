"""What each guidance method costs per image, side by side: cfg, apg, cfgpp, autoguidance and no guidance.

    python benchmarks/guidance_speed.py [--repeats 4] [--batch 500] [--steps 50]

The digits U-Net (conf/model/unet_tiny.yaml, random weights: speed does not depend on them), T = 1000, guided DDIM
with ``--steps`` steps at w = 1 (cfgpp: lambda = 0.5), in float32 on this machine's device. cfg, apg and cfgpp run the
conditional and unconditional halves as one forward pass of twice the batch; autoguidance runs the model and its
guide (a second network of the same layout) as two forward passes of the batch. The settings alternate within each
repeat, so they see the same machine state; prints the median time of the repeats after the first (a warm-up) and
the ratio to cfg. A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ddpm.config import build_network
from ddpm.core.denoiser import Denoiser
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.guidance import Guidance
from ddpm.core.schedules import linear_betas
from ddpm.inference import Pipeline


def network(seed: int, device: str) -> torch.nn.Module:
    """The default run's network (conf/model/unet_tiny.yaml on the digits), as ddpm.train builds it."""
    torch.manual_seed(seed)
    return build_network("model=unet_tiny").to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    process = DDPMProcess(linear_betas(1000)).to(device)
    model = Pipeline(Denoiser(network(0, device), process), p_uncond=0.1)
    guide = Denoiser(network(1, device), process)
    settings = {"cfg": Guidance(1.0), "apg": Guidance(1.0, method="apg"), "cfgpp": Guidance(0.5, method="cfgpp"),
                "autoguidance": Guidance(1.0, method="autoguidance", guide=guide), "none (w = 0)": Guidance(0.0)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, guidance in settings.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.sample(args.batch, sampler="ddim", steps=args.steps, guidance=guidance, batch_size=args.batch)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts[1:] if len(ts) > 1 else ts) for name, ts in times.items()}
    print(f"{args.batch} digits, DDIM-{args.steps}, float32, {device}, median of {max(args.repeats - 1, 1)} repeats\n")
    print("| guidance | network passes per step | seconds | images/s | time / cfg |\n|---|---|---|---|---|")
    passes = {"cfg": "1 (2x batch)", "apg": "1 (2x batch)", "cfgpp": "1 (2x batch)", "autoguidance": "2 (two networks)",
              "none (w = 0)": "1"}
    for name, seconds in median.items():
        print(f"| {name} | {passes[name]} | {seconds:.2f} | {args.batch / seconds:.0f} | {seconds / median['cfg']:.2f} |")


if __name__ == "__main__":
    main()
