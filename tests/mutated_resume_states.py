"""The property of ``ddpm.training.resume.check_resume_state``, over mutated copies of a genuine checkpoint's training
state: each is refused in one line naming a field, or it restores as Lightning would restore it (model weights,
optimizer and a fused AdamW step, learning-rate schedule, RNGs, loops, ModelCheckpoint) without an error. A state
that reaches native code unchecked could crash this process (fused AdamW overruns its buffers): so it runs in a process
of its own, started by tests/test_resume_state.py, whose exit status says whether it crashed.

    python tests/mutated_resume_states.py CHECKPOINT CHECKPOINT_DIR [--examples N] [--seed S]
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY  # noqa: E402

from ddpm.training.assemble import build_module  # noqa: E402
from ddpm.config import compose  # noqa: E402
from ddpm.core.errors import ConfigError  # noqa: E402
from ddpm.training.resume import check_resume_state, reference_loops  # noqa: E402

FIELDS = ("optimizer_states", "lr_schedulers", "rng_states", "loops", "callbacks", "state_dict", "epoch", "global_step",
          "pytorch-lightning_version", "run_identity")


def paths(node, prefix=(), depth=0):
    """Every path to a value under ``node`` (mappings, lists and tuples walked; long lists sampled)."""
    out = [prefix] if prefix else []
    if depth > 8:
        return out
    if isinstance(node, dict):
        items = list(node.items())
        if len(items) > 12:  # the weights: a sample of them
            items = items[:4] + items[-4:]
        for key, value in items:
            out += paths(value, (*prefix, key), depth + 1)
    elif isinstance(node, (list, tuple)) and len(node) <= 8:
        for i, value in enumerate(node):
            out += paths(value, (*prefix, i), depth + 1)
    elif isinstance(node, (list, tuple)):
        out += paths(node[0], (*prefix, 0), depth + 1) + paths(node[-1], (*prefix, len(node) - 1), depth + 1)
    return out


def replacements(value):
    """Values to put where ``value`` was: other shapes, dtypes, types, non-finite and out-of-range numbers."""
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    candidates = [None, "x", True, -1, 0, 2**63, 1e308, math.nan, math.inf, [], {}, (), [0], {"k": 0},
                  torch.zeros(3), torch.zeros(()), torch.zeros(0), torch.zeros(shape, dtype=torch.int64),
                  torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.bfloat16),
                  torch.full(shape, math.nan), torch.zeros((*shape, 2)), torch.zeros(shape[::-1] or (1,)),
                  torch.zeros(shape, dtype=torch.uint8), torch.zeros(max(1, math.prod(shape)))[: max(1, math.prod(shape) // 2)]]
    if shape:
        candidates.append(torch.zeros(1).expand(shape))  # overlapping memory
        candidates.append(torch.randn(shape))  # other numbers of the right form: must restore
    if isinstance(value, int) and not isinstance(value, bool):
        candidates += [value + 1, max(value - 1, 0), value * 1000]
    if isinstance(value, float):
        candidates += [value * 2, -value]
    if isinstance(value, str):
        candidates += [value + "x", "", "../../x.ckpt", "/etc/passwd", "2.6.6.dev0", "abc"]
    return candidates


def get_at(root, path):
    for part in path:
        root = root[part]
    return root


def updated(node, path, value):
    """A copy of ``node`` with ``value`` at ``path``: the containers on the path copied (tuples stay tuples), the rest
    shared (the genuine checkpoint serves every example; deep-copying its weights each time costs more than the check)."""
    if not path:
        return value
    key, child = path[0], updated(node[path[0]], path[1:], value)
    if isinstance(node, dict):
        return {**node, key: child}
    items = list(node)
    items[key] = child
    return tuple(items) if isinstance(node, tuple) else items


class Drawn:
    """``random.Random``'s choice, random and randint, drawn through hypothesis (so a failure shrinks)."""

    def __init__(self, data):
        self.data = data

    def choice(self, items):
        return self.data.draw(st.sampled_from(list(items)))

    def random(self):
        return self.data.draw(st.floats(0, 1, exclude_max=True))

    def randint(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))


def mutate(checkpoint: dict, rng) -> tuple[dict, str]:
    """A copy of ``checkpoint`` with one to three mutations at random places (``rng``: a random.Random or Drawn); and
    what was done."""
    out = dict(checkpoint)
    done = []
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        if field not in out:
            out[field] = rng.choice(replacements(0))
            done.append(f"added {field}")
            continue
        candidates = paths(out[field], (field,)) or [(field,)]
        path = rng.choice(candidates)
        parent, key = get_at(out, path[:-1]), path[-1]
        kind = rng.random()
        if kind < 0.15 and isinstance(parent, dict):
            out = updated(out, path[:-1], {k: v for k, v in parent.items() if k != key})
            done.append(f"deleted {path}")
        elif kind < 0.25 and isinstance(parent, dict):
            extra = rng.choice(["extra", 7, "exp_avg", "step", "combined_loader", "best_k_models"])
            out = updated(out, path[:-1], {**parent, extra: rng.choice(replacements(0))})
            done.append(f"added a key beside {path}")
        elif kind < 0.3 and isinstance(parent, list):
            out = updated(out, path[:-1], [*parent, rng.choice(replacements(parent[0] if parent else 0))])
            done.append(f"appended to {path[:-1]}")
        else:
            out = updated(out, path, rng.choice(replacements(get_at(out, path))))
            done.append(f"replaced {path}")
    return out, "; ".join(done)


def restore(checkpoint: dict, module, checkpoint_dir: Path, loops_trainer) -> None:
    """What Lightning and ddpm do with an accepted checkpoint when a run resumes from it, and a training step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
    for p in module.net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    assert all(torch.isfinite(p).all() for p in module.net.parameters()), "the step made the weights non-finite"
    module.on_train_start()  # the RNG states
    for name in ("fit_loop", "validate_loop", "test_loop", "predict_loop"):
        getattr(loops_trainer, name).load_state_dict(checkpoint["loops"][name])
    callback = ModelCheckpoint(dirpath=str(checkpoint_dir))
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint"):
            callback.load_state_dict(copy.deepcopy(state))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="derandomized (the same examples every time) when given")
    args = parser.parse_args()
    import lightning as L

    genuine = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    cfg = compose([*TINY], output_dir=str(args.checkpoint_dir.parent))
    module = build_module(cfg)
    loops = reference_loops()
    loops_trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False, accelerator="cpu", devices=1)
    check_resume_state(genuine, module, "genuine", args.checkpoint_dir, loops)  # the unmutated file passes
    restore(copy.deepcopy(genuine), module, args.checkpoint_dir, loops_trainer)
    counts = {"refused": 0, "accepted": 0}

    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=args.seed is not None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def property_holds(data):
        mutated, what = mutate(genuine, Drawn(data))
        state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            check_resume_state(mutated, module, "ckpt_path='x.ckpt'", args.checkpoint_dir, loops)
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message and message.startswith("ckpt_path='x.ckpt': its training state"), (what, message)
            counts["refused"] += 1
            return
        try:
            restore(mutated, module, args.checkpoint_dir, loops_trainer)
        except Exception as error:
            raise AssertionError(f"accepted, then failed to restore ({what}): {type(error).__name__}: {error}") from None
        finally:
            torch.set_rng_state(state[0]), np.random.set_state(state[1]), random.setstate(state[2])
        counts["accepted"] += 1

    property_holds()
    print(f"mutated resume states: {counts['refused']} refused in one line, {counts['accepted']} accepted and restored")


if __name__ == "__main__":
    main()
