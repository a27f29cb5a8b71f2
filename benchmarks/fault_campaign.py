"""Fault campaign: SIGKILL a short training run at random moments, several of them in the middle of a checkpoint
write, and each time run the same command again. Every restart must resume from the newest complete checkpoint
that was on disk when the kill landed, and the run must end at max_steps with its step count, EMA and optimizer
consistent. Prints one row per kill and how many of them the run recovered from (all must).

    python benchmarks/fault_campaign.py                 # 10 kills, a checkpoint every step
    python benchmarks/fault_campaign.py --kills 20 --seed 1

The run is the tiny digits network of the test suite with a checkpoint (step file and last.ckpt) every step, so a
good share of the run is spent writing checkpoints. Kills cycle through three kinds of moment: the instant a
checkpoint's temporary file appears (mid-write), a random moment of training, a random moment of start-up.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# A U-Net narrower than unet_tiny, named as such: the campaign kills and resumes runs, any backbone would do
TINY = ["logger=csv", "trainer=debug", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=10",
        "model=unet_tiny", "model.base_channels=16", "model.norm_groups=4", "data.batch_size=32", "schedule.timesteps=100",
        "~callbacks.sample_grid", "~callbacks.sample_quality", "~callbacks.evaluate_at_end"]
RESUMED = re.compile(r"resuming from this run directory's newest checkpoint .*?(\S+\.ckpt) \(step (\d+)")


def command(run: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "ddpm.train", *TINY, f"trainer.max_steps={steps}",
            "callbacks.model_checkpoint.every_n_train_steps=1", "callbacks.model_checkpoint.save_top_k=1",
            f"hydra.run.dir={run}"]


def newest_step(checkpoints: Path) -> int | None:
    """The largest step of a complete checkpoint on disk (what a restart must resume from), without touching it."""
    steps = []
    for path in checkpoints.glob("*.ckpt") if checkpoints.is_dir() else []:
        try:
            steps.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception:
            pass
    return max(steps) if steps else None


def kill_at(process: subprocess.Popen, moment: str, checkpoints: Path, rng: random.Random, log: Path) -> bool:
    """SIGKILL ``process`` at ``moment``; True if it was still running when the kill landed."""
    deadline = time.time() + 300
    if moment == "startup":
        time.sleep(rng.uniform(0.0, 4.0))
    else:
        while "Seed set" not in log.read_text() and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # training is starting
        if moment == "training":
            time.sleep(rng.uniform(0.2, 3.0))
        else:  # "write": while the n-th checkpoint write of this invocation is in flight (its temporary file exists)
            seen, n = set(), rng.randint(1, 8)
            while len(seen) < n and process.poll() is None and time.time() < deadline:
                seen.update(p.name for p in checkpoints.glob(".*.ckpt.tmp"))
                time.sleep(0.0005)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return alive


def consistent(last: Path, steps: int) -> list[str]:
    """What is wrong with the final checkpoint (nothing: an empty list)."""
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    problems = []
    if checkpoint["global_step"] != steps:
        problems.append(f"global_step {checkpoint['global_step']} != {steps}")
    adam_steps = {int(state["step"]) for state in checkpoint["optimizer_states"][0]["state"].values()}
    if adam_steps != {steps}:
        problems.append(f"optimizer step counts {sorted(adam_steps)} != {steps}")
    if int(checkpoint["state_dict"]["ema.n_averaged"]) != steps:
        problems.append(f"EMA updates {int(checkpoint['state_dict']['ema.n_averaged'])} != {steps}")
    if checkpoint["lr_schedulers"][0]["last_epoch"] != steps:
        problems.append(f"lr scheduler at {checkpoint['lr_schedulers'][0]['last_epoch']} != {steps}")
    if not all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point()):
        problems.append("non-finite weights")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=400, help="trainer.max_steps of the run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--dir", type=Path, default=None, help="where the run goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="ddpm_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    run, rng = root / "run", random.Random(args.seed)
    checkpoints = run / "checkpoints"
    moments = ["write", "training", "write", "startup"]
    rows, recovered = [], 0
    expected = None  # the step the next invocation must resume from (None: a fresh start)
    for k in range(args.kills + 1):
        log = root / f"invocation_{k}.log"
        with open(log, "w") as out:
            # Unbuffered, so the log shows each line as it happens ("Seed set" comes after the resume has removed
            # the temporaries an earlier kill left, which the "write" moment must not mistake for a new write).
            process = subprocess.Popen(command(run, args.steps), cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if k < args.kills:
                moment = moments[k % len(moments)]
                alive = kill_at(process, moment, checkpoints, rng, log)
            else:
                process.wait(timeout=1800)
        text = log.read_text()
        resumed = RESUMED.search(text)
        resumed_step = int(resumed.group(2)) if resumed else None
        # A kill during start-up may land before the run even looked for a checkpoint: nothing to check then.
        looked = resumed is not None or "Seed set" in text or k == args.kills
        resumed_ok = resumed_step == expected if looked else True
        if k > 0:
            rows[-1]["next run resumed at"] = resumed_step if looked else "(killed in start-up)"
            rows[-1]["ok"] = resumed_ok and rows[-1]["still running"]  # a run that had died by itself is a failure
            recovered += rows[-1]["ok"]
        if k == args.kills:
            final_ok = process.returncode == 0
            break
        torn = [p.name for p in checkpoints.glob(".*.ckpt.tmp")] if checkpoints.is_dir() else []
        expected = newest_step(checkpoints)
        rows.append({"kill": k + 1, "moment": moment, "still running": alive, "torn temporary left": ", ".join(torn) or "-",
                     "newest complete step": expected})
    problems = consistent(checkpoints / "last.ckpt", args.steps) if final_ok else [f"final run exited {process.returncode}"]
    leftovers = [p.name for p in checkpoints.glob("*") if p.name.startswith(".") or p.name.startswith("last-v")]
    if leftovers:
        problems.append(f"left behind: {leftovers}")

    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row.get(h, "")) for h in header) + " |")
    print(f"\nrun directory: {run}")
    print(f"final run: {'consistent' if not problems else '; '.join(problems)} (step, optimizer steps, EMA updates, "
          f"scheduler at {args.steps}; finite weights; no temporaries or last-vN left)")
    ok = recovered == args.kills and not problems
    print(f"recovered: {recovered}/{args.kills}{'' if ok else '  FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
