"""A checkpoint's training state is data (issue 29, item 1): a crafted optimizer, schedule, RNG, loop or callback state
is refused in one line naming the field, before a logger starts or a step runs; it never reaches native code."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli

from ddpm.config import compose
from ddpm.core.errors import ConfigError
from ddpm.train import train


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    run = tmp_path_factory.mktemp("genuine") / "run"
    train(compose([*TINY, "trainer.max_steps=3", "~callbacks.sample_grid"], output_dir=run))
    return run / "checkpoints" / "last.ckpt"


def _crafted(genuine: Path, tmp_path: Path, change) -> Path:
    checkpoint = torch.load(genuine, weights_only=True)
    change(checkpoint)
    path = tmp_path / "sent.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_moment_buffer_of_the_wrong_size_never_reaches_fused_adamw(genuine, tmp_path):
    """The case of the issue: exp_avg of 3 elements where the parameter has 1,024. Fused AdamW (the default) reads and
    writes past that buffer at the first step: a segmentation fault (exit 139) before this check existed."""
    sent = _crafted(genuine, tmp_path, lambda c: c["optimizer_states"][0]["state"][0].update(exp_avg=torch.zeros(3)))
    result = run_cli("ddpm.train", *TINY, "trainer.max_steps=6", "~callbacks.sample_grid", f"ckpt_path={sent}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optimizer_states.0.state.0.exp_avg has shape (3,)" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written: no checkpoint, no record, no log


def _set(path, value):
    def change(checkpoint):
        node = checkpoint
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return change


CRAFTED = [  # (what is changed, the field the one line names)
    (_set(("optimizer_states", 0, "state", 1, "exp_avg_sq"), torch.zeros(())), "optimizer_states.0.state.1.exp_avg_sq"),
    (_set(("optimizer_states", 0, "state", 0, "step"), torch.zeros(3)), "optimizer_states.0.state.0.step"),
    (_set(("optimizer_states", 0, "state", 0, "exp_avg_sq"), None), "optimizer_states.0.state.0.exp_avg_sq"),
    (_set(("optimizer_states",), None), "optimizer_states"),
    (_set(("optimizer_states", 0, "param_groups", 0, "lr"), "fast"), "optimizer_states.0.param_groups.0.lr"),
    (_set(("lr_schedulers",), [{}, {}]), "lr_schedulers"),
    (_set(("lr_schedulers", 0, "last_epoch"), 2.5), "lr_schedulers.0.last_epoch"),
    (_set(("rng_states", "torch"), torch.zeros(7, dtype=torch.uint8)), "rng_states.torch"),
    (_set(("rng_states", "numpy"), "MT19937"), "rng_states.numpy"),
    (_set(("rng_states", "python"), (3, (0,) * 10, None)), "rng_states.python"),
    (_set(("loops", "fit_loop", "state_dict", "combined_loader"), "abc"), "combined_loader"),
    (_set(("loops", "fit_loop", "epoch_progress"), 7), "loops.fit_loop.epoch_progress"),
    (_set(("callbacks",), ["x"]), "callbacks"),
    (_set(("state_dict",), [1, 2]), "state_dict"),
    (_set(("state_dict",), {0: torch.zeros(1)}), "state_dict"),
    (_set(("pytorch-lightning_version",), "abc"), "pytorch-lightning_version"),
    (_set(("epoch",), -1), "epoch"),
    (_set(("surprise",), 1), "surprise"),
]


@pytest.mark.parametrize("change,field", CRAFTED, ids=[field for _, field in CRAFTED])
def test_a_crafted_training_state_is_refused_in_one_line_naming_its_field(genuine, tmp_path, change, field):
    sent = _crafted(genuine, tmp_path, change)
    cfg = compose([*TINY, "trainer.max_steps=6", "~callbacks.sample_grid", f"ckpt_path={sent}"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as refused:
        train(cfg)
    message = str(refused.value)
    assert "\n" not in message and field in message and "refusing to resume" in message, message
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_a_checkpoint_naming_files_outside_its_folder_is_refused(genuine, tmp_path):
    """ModelCheckpoint removes the earlier last.ckpt it remembers: a state whose paths lead out of the run's checkpoint
    folder (Lightning's own check compares unnormalised paths) would make it remove a file of yours."""
    run = tmp_path / "run"
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")

    def change(checkpoint):
        key = next(k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint"))
        folder = str((run / "checkpoints").resolve())
        checkpoint["callbacks"][key].update(dirpath=folder, last_model_path=f"{folder}/../../notes.txt")

    sent = _crafted(genuine, tmp_path, change)
    with pytest.raises(ConfigError, match=r"callbacks.ModelCheckpoint names .*notes.txt"):
        train(compose([*TINY, "trainer.max_steps=6", "~callbacks.sample_grid", f"ckpt_path={sent}"], output_dir=run))
    assert victim.read_text() == "mine"


def test_a_genuine_checkpoint_resumes_through_the_checked_copy(genuine, tmp_path):
    """What Lightning restores is the dict that was checked: the file is not read a second time."""
    from ddpm.training.checkpoint import AtomicCheckpointIO

    reads = []
    original = AtomicCheckpointIO.load_checkpoint

    def counting(self, path, *args, **kwargs):
        reads.append((path, bool(self._expected)))
        return original(self, path, *args, **kwargs)

    AtomicCheckpointIO.load_checkpoint = counting
    try:
        module = train(compose([*TINY, "trainer.max_steps=5", "~callbacks.sample_grid", f"ckpt_path={genuine}"],
                               output_dir=tmp_path / "run"))
    finally:
        AtomicCheckpointIO.load_checkpoint = original
    assert module.global_step == 5 and reads == [(str(genuine), True)]


def test_mutated_resume_states_are_refused_or_restore_cleanly(genuine, tmp_path):
    """The property (tests/mutated_resume_states.py), in a process of its own: a crash there fails this test, not the
    suite. `make test` runs 150 examples; the `slow` mark below runs 3,000."""
    _property(genuine, 150)


@pytest.mark.slow
def test_mutated_resume_states_many(genuine):
    _property(genuine, 3000)


def _property(genuine: Path, examples: int) -> None:
    script = Path(__file__).parent / "mutated_resume_states.py"
    result = subprocess.run([sys.executable, str(script), str(genuine), str(genuine.parent), "--examples", str(examples)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.returncode, result.stderr[-4000:])
    assert "refused in one line" in result.stdout, result.stdout[-2000:]
