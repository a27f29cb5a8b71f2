"""How fast ddpm.sample / ddpm.evaluate sample with sampler.precision and sampler.compile, side by side.

    python benchmarks/sampling_speed.py [--repeats 3] [--networks unet_tiny,unet_cifar10]

For each network (random weights: speed does not depend on them), guided DPM-Solver++(2M) with 20 steps (w = 1, so
40 network evaluations per image batch) in the four settings float32 / bf16 autocast x eager / torch.compile, run
one after another in one process. Prints the median time over ``--repeats`` (after one warm-up call, which also
compiles) and the speed ratio against float32 eager. A benchmark, not a test: the numbers depend on the machine.
Whether bf16 changes the quality is the other half, measured on a trained checkpoint with ddpm.evaluate
(evaluations=fast_sampling_check; docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from hydra.utils import instantiate

from ddpm.build import build_module
from ddpm.config import compose, native_bf16

NETWORKS = {  # model option -> (overrides, batch)
    "unet_tiny": (["model=unet_tiny", "data=digits"], 500),
    "unet_cifar10": (["model=unet_cifar10", "data=cifar10"], 16),
}
SETTINGS = [("float32", False), ("bf16", False), ("float32", True), ("bf16", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--batch", type=int, default=None, help="images per draw (default: 500 digits, 16 CIFAR-10)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampler = compose(["sampler=dpmpp_2m"], output_dir=tempfile.mkdtemp()).sampler
    print(f"device {device} (bf16 native: {native_bf16()}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    lines = ["| network | batch | precision | compile | seconds (median) | images/s | speed-up vs float32 eager |",
             "|---|---:|---|---|---:|---:|---:|"]
    for name in args.networks.split(","):
        overrides, batch = NETWORKS[name]
        batch = args.batch or batch
        module = build_module(compose([*overrides, "logger=none"], output_dir=tempfile.mkdtemp())).to(device).eval()
        run = instantiate(sampler)
        model = module.model()
        labels = torch.arange(batch) % model.num_classes
        baseline = None
        for precision, compiled in SETTINGS:
            def draw():
                model.sample(labels, guidance=1.0, seed=0, sampler=run, precision=precision, compile=compiled)
                if device == "cuda":
                    torch.cuda.synchronize()
            draw()  # warm-up (and compilation)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                draw()
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            baseline = baseline or median
            lines.append(f"| {name} | {batch} | {precision} | {'yes' if compiled else 'no'} | {median:.2f} | {batch / median:.1f} | "
                         f"{baseline / median:.2f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
