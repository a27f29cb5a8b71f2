"""The training spine end to end: outputs, resume, guidance refusal, loggers, multirun."""

import copy
import csv
import os
import random
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY, run_cli

from ddpm.training.assemble import build_module
from ddpm.inference import load
from ddpm.train import train


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from the CSV logger (logged every step by trainer=debug)."""
    rows = csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv"))))
    return {int(r["step"]) + 1: float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_train_writes_grid_checkpoints_and_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=5")
    train(cfg)
    run = tmp_path / "run"
    assert (run / "samples" / "final.png").is_file()
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"config.yaml", "last.ckpt", "step_0000005.ckpt", "step_0000010.ckpt"}
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 10
    assert checkpoint["config"]["schedule"]["timesteps"] == 100  # the resolved config travels inside

    # The checkpoint alone rebuilds the model, with the weights asked for, and it samples. (Premise changed, issue 22:
    # ddpm.load builds the inference model, one set of weights, not the whole LightningModule.)
    for ema, prefix in ((True, "ema.module."), (False, "net.")):
        model = load(run / "checkpoints" / "last.ckpt", ema=ema, device="cpu")
        chosen = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        assert chosen.keys() == model.net.state_dict().keys()
        for name, value in chosen.items():
            assert torch.equal(model.net.state_dict()[name], value), name
    images = model.sample(torch.arange(10), seed=0)
    assert images.shape == (10, 1, 8, 8) and torch.isfinite(images).all()


class CaptureAtStart(L.Callback):
    """The state a (resumed) run starts from, after Lightning has restored the checkpoint."""

    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.weights = copy.deepcopy(pl_module.state_dict())
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_resume_restores_everything_and_continues_the_same_run(tiny_cfg, tmp_path):
    """Train N steps, stop, resume to 2N, and compare with a 2N run that never stopped.

    What remains different, and why: nothing, at an epoch boundary (this test; in the middle of an epoch, the
    next). The shuffle order is a function of (seed, epoch) and the global RNG stream (t, noise, label dropout) is
    saved and restored, so the continuation is bit-identical."""
    N = 50  # one epoch: the digits training split is 50 batches of 32
    common = ["callbacks.model_checkpoint.every_n_train_steps=" + str(N), "~callbacks.sample_grid"]
    train(tiny_cfg(f"trainer.max_steps={2 * N}", *common, output_dir=tmp_path / "straight"))

    first = tmp_path / "first"
    train(tiny_cfg(f"trainer.max_steps={N}", *common, output_dir=first))
    ckpt_path = first / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, weights_only=False)

    capture = CaptureAtStart()
    resumed = tmp_path / "resumed"
    train(tiny_cfg(f"trainer.max_steps={2 * N}", *common, f"ckpt_path={ckpt_path}", output_dir=resumed), [capture])

    # 1. Step count, weights, EMA weights, optimizer state and RNG are exactly what the checkpoint holds.
    assert capture.global_step == checkpoint["global_step"] == N
    for name, value in checkpoint["state_dict"].items():
        assert torch.equal(capture.weights[name], value), name
    assert any(name.startswith("ema.") for name in checkpoint["state_dict"])
    saved_opt = checkpoint["optimizer_states"][0]
    for index, state in saved_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(capture.optimizer_state["state"][index][key], value), (index, key)
    assert set(checkpoint["rng_states"]) == {"torch", "cuda", "numpy", "python"}  # applied in on_train_start

    # 2. The loss continues where it was, not from scratch, and matches the uninterrupted run.
    straight, before, after = read_losses(tmp_path / "straight"), read_losses(first), read_losses(resumed)
    assert min(after) == N + 1
    assert before[N] == pytest.approx(straight[N], abs=0)
    assert sum(after[s] for s in range(N + 1, N + 11)) < 0.85 * sum(before[s] for s in range(1, 11))  # not from scratch
    # Restoring the RNG streams makes the continuation identical, step for step, to the run that never stopped.
    for step in range(N + 1, 2 * N + 1):
        assert after[step] == pytest.approx(straight[step], rel=1e-6), step
    final_straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    final_resumed = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in final_straight.items():
        torch.testing.assert_close(final_resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)


class KillAt(L.Callback):
    """SIGTERM to this very process once step ``step`` is trained: the preemption path (Lightning stops at the step
    boundary, LastCheckpoint writes last.ckpt, train() exits 128 + 15)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_killed_mid_epoch_three_times_ends_as_the_uninterrupted_run(tiny_cfg, tmp_path):
    """Issue 18, item 4. Killed by SIGTERM at 3 random steps in the middle of epochs and resumed each time (resume=auto
    in the same run directory, as a requeued job does), a run ends with the weights, EMA, power EMAs, optimizer state
    and step-by-step losses of the run that never stopped, exactly (CPU, float32, deterministic). The data loader's
    place in its epoch travels in the checkpoint (ResumableLoader), the RNG streams too."""
    per_epoch, total = 50, 130  # 50 batches of 32 per epoch (the digits training split): kills in epochs 0, 1 and 2
    kills = sorted(random.Random(18).sample([s for s in range(3, total - 3) if s % per_epoch], 3))
    assert len({k // per_epoch for k in kills}) >= 2 and all(k % per_epoch for k in kills)
    common = [f"trainer.max_steps={total}", "~callbacks.sample_grid", "trainer.deterministic=true"]
    train(tiny_cfg(*common, output_dir=tmp_path / "straight"))

    run = tmp_path / "killed"
    for step in kills:
        with pytest.raises(SystemExit) as stopped:
            train(tiny_cfg(*common, output_dir=run), [KillAt(step)])
        assert stopped.value.code == 128 + signal.SIGTERM
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    train(tiny_cfg(*common, output_dir=run))

    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == total
    assert any(k.startswith("ema.") for k in straight["state_dict"]) and any(k.startswith("power_ema.") for k in straight["state_dict"])
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    for index, state in straight["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer_states"][0]["state"][index][key], value), (index, key)
    # Every step's loss, across the four segments' CSV logs, is the uninterrupted run's.
    losses: dict[int, float] = {}
    for version in sorted((run / "csv").glob("version_*")):
        losses.update({int(r["step"]) + 1: float(r["train/loss"]) for r in csv.DictReader(open(version / "metrics.csv"))
                       if r.get("train/loss")})
    reference = read_losses(tmp_path / "straight")
    assert sorted(losses) == sorted(reference) == list(range(1, total + 1))
    assert all(losses[s] == reference[s] for s in reference), [s for s in reference if losses[s] != reference[s]][:5]


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_preemption_signal_before_the_first_step_is_held_and_stops_the_run_as_it_begins(tiny_cfg, tmp_path, offline_env,
                                                                                           signum):
    """USR2 (SLURM's warning through submitit) or SIGTERM (scancel, scontrol requeue) while the run is still setting
    up, after the wandb run started: the signal is held (LastCheckpoint.arm), the run stops before its first step with
    last.ckpt written and the wandb run finished, instead of submitit requeueing the job at once and leaving an
    unfinished wandb fragment (USR2), or training on until SIGKILL with nothing saved (SIGTERM, which submitit's
    handler only logs; found by tests/test_slurm.py)."""
    from wandb_files import run_segments

    class SignalDuringSetup(L.Callback):
        def setup(self, trainer, pl_module, stage):
            os.kill(os.getpid(), signum)

    with pytest.raises(SystemExit) as stopped:
        train(tiny_cfg("logger=wandb", "trainer.max_steps=5", "~callbacks.sample_grid"), [SignalDuringSetup()])
    assert stopped.value.code == 128 + signum
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 0
    (segment,) = run_segments(tmp_path / "run" / "wandb")
    assert segment["finished"] and not [row for row in segment["history"] if "train/loss" in row]


@pytest.mark.parametrize("when", ["requeue", "training", "unguarded"])
def test_slurms_signals_never_log_from_inside_a_log_write(tmp_path, capfd, when):
    """SLURM sends SIGCONT before each signal, and scontrol requeue (submitit's, on the preemption signal) sends the job
    SIGCONT and SIGTERM while submitit writes its "Requeued job" record. submitit's handlers for them log from inside
    the signal, into the file being written: the re-entered write printed a logging traceback into train.log
    (tests/test_slurm.py, in CI). Here the signals land in the middle of a record's emit, as they did there, in a job
    whose handlers ddpm.launchers.quiet_submitit_signals replaced, during training (LastCheckpoint armed) and in the
    requeue; ``unguarded`` is the same scene with submitit's handlers and must see the re-entry (the test can fail)."""
    import logging

    from submitit.core.job_environment import SignalHandler

    from ddpm.launchers import quiet_submitit_signals
    from ddpm.training.checkpoint import LastCheckpoint

    reentered: list[str] = []

    class LogFile(logging.Handler):
        depth = 0

        def emit(self, record):
            self.depth += 1
            try:
                if self.depth > 1:
                    reentered.append(record.getMessage())
                elif record.getMessage().startswith(("Requeued job", "step")):
                    for signum in (signal.SIGCONT, signal.SIGTERM):  # runs its Python handler before returning
                        signal.raise_signal(signum)
            finally:
                self.depth -= 1

    submitit_log = logging.getLogger("test_train.submitit")
    submitit_log.propagate, handler = False, LogFile()
    submitit_log.addHandler(handler)
    submitit = SignalHandler.__new__(SignalHandler)  # submitit's own handlers, logging into the file above
    submitit._logger = submitit_log

    def checkpoint_and_try_requeue(signum, frame):  # what submitit's handler for the preemption signal does
        submitit_log.warning("Requeued job 1 (3 remaining timeouts)")
        raise SystemExit(-1)

    before = {signum: signal.signal(signum, submitit.bypass) for signum in (signal.SIGCONT, signal.SIGTERM)}
    last = LastCheckpoint(str(tmp_path))
    try:
        if when != "unguarded":
            quiet_submitit_signals()  # as FinishTheSweep does when the job starts
        if when == "training":
            last.arm()
            submitit_log.warning("step 10: drawing a grid")
            assert last.received == "SIGTERM"  # held: the run stops at its step boundary
        else:
            last.received, last._previous_at_stop = "SIGUSR2", {signal.SIGUSR2: checkpoint_and_try_requeue}
            with pytest.raises(SystemExit):
                last.requeue()
            if when == "requeue":
                assert "SIGTERM: ignored, as submitit does" in capfd.readouterr().err
    finally:
        for signum, previous in {**last._previous, **before}.items():
            signal.signal(signum, previous)
        last._previous = {}
        submitit_log.removeHandler(handler)
    assert reentered == ([] if when != "unguarded" else ["Bypassing signal SIGCONT", "Bypassing signal SIGTERM"])


def test_only_submitits_own_signal_handlers_are_replaced():
    from ddpm.launchers import quiet_submitit_signals

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        quiet_submitit_signals()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_run_with_a_callback_of_its_own_resumes_from_its_own_checkpoint(tiny_cfg, tmp_path):
    """A user's own callback (+callbacks.NAME._target_=their.Class) is not one of conf/'s options. A checkpoint someone
    sends with such a target is refused (tests/test_checkpoint_trust.py), but the run's own last.ckpt, found in its
    directory on a requeue, is only compared with the command line's config, never built from: the run resumes from
    it instead of starting again (which the SLURM tests found: a requeued job retrained from step 0)."""
    own = ["+callbacks.mine._target_=test_train.KillAt", "+callbacks.mine.step=1000", "trainer.max_steps=12"]
    with pytest.raises(SystemExit):
        train(tiny_cfg(*own), [KillAt(7)])
    capture = CaptureAtStart()
    train(tiny_cfg(*own), [capture])
    assert capture.global_step == 7
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


def test_guided_sampling_from_a_model_without_label_dropout_fails_before_training(tiny_cfg, tmp_path):
    cfg = tiny_cfg("guidance.p_uncond=0", "guidance.scale=1.0")
    with pytest.raises(ValueError, match=r"guidance.scale=1.0: must be 0 when guidance.p_uncond=0"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unconditional_training(tiny_cfg, tmp_path):
    module = train(tiny_cfg("guidance=none", "trainer.max_steps=3", "callbacks.sample_grid.num_samples=4"))
    assert module.net.class_embed is None and module.p_uncond == 0
    assert (tmp_path / "run" / "samples" / "final.png").is_file()


def test_wandb_logs_offline_without_an_account(tiny_cfg, tmp_path, offline_env):
    """No API key, no netrc, no WANDB_MODE: the default logger goes offline instead of prompting."""
    cfg = tiny_cfg("logger=wandb", "trainer.max_steps=3")
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    import wandb

    assert wandb.run is None  # finished, so the next job of a multirun starts its own run


def test_multirun_writes_one_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("ddpm.train", "--multirun", "schedule=linear,cosine", *TINY, "trainer.max_steps=3",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"sweep directory: {sweep}\nreport: python -m ddpm.report {sweep}" in result.stdout  # printed at the end
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "samples" / "final.png").is_file()
        config = (sweep / job / "checkpoints" / "config.yaml").read_text()
        assert f"ddpm.core.schedules.{schedule}_betas" in config


@pytest.mark.slow  # compiling takes a minute on 2 CPU cores
def test_compiled_training_keeps_plain_checkpoint_keys(tiny_cfg, tmp_path):
    train(tiny_cfg("model.compile=true", "trainer.max_steps=3", "~callbacks.sample_grid"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and not any("_orig_mod" in key for key in state)
    load(tmp_path / "run" / "checkpoints" / "last.ckpt")  # loads into an uncompiled net


def test_on_device_data_gives_the_same_batches(tiny_cfg, tmp_path):
    """data.on_device=true draws batches by gathering from one tensor on the model's device: the same indices as the
    ordinary loader, so the same losses step for step."""
    common = ["trainer.max_steps=8", "~callbacks.sample_grid"]
    train(tiny_cfg(*common, output_dir=tmp_path / "loader"))
    class Gathered(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.cached = trainer.datamodule._device_data  # the whole set, on the model's device

    gathered = Gathered()
    train(tiny_cfg(*common, "data.on_device=true", output_dir=tmp_path / "device"), [gathered])
    assert gathered.cached is not None and len(gathered.cached[0]) == 1617
    loader, device = read_losses(tmp_path / "loader"), read_losses(tmp_path / "device")
    assert len(loader) == 8 and loader == device


def test_gradients_are_clipped_under_bf16_with_the_fused_optimizer(tiny_cfg):
    """Lightning's mixed-precision plugin refuses to clip for fused optimizers; the module clips itself when no loss
    scaler is involved (bf16), so trainer.gradient_clip_val still holds with the default fused AdamW."""
    module = build_module(tiny_cfg())
    module.trainer = L.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"]
    for p in module.net.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(optimizer, 1.0, "norm")
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.net.parameters()]))
    assert total.item() == pytest.approx(1.0, rel=1e-4)


def test_ema_step_is_the_exponential_moving_average():
    """With the network held at p and the average started at e0, k steps give p + decay^k (e0 - p) (float64)."""
    from torch.optim.swa_utils import AveragedModel

    from ddpm.training.module import ema_step

    net = torch.nn.Linear(3, 2).double()
    ema = AveragedModel(net, use_buffers=True)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for _ in range(5):
        ema_step(ema, net, decay=0.9)
    for e0, e, p in zip(start, ema.module.parameters(), net.parameters()):
        torch.testing.assert_close(e, p + 0.9**5 * (e0 - p), rtol=1e-12, atol=1e-12)
    assert int(ema.n_averaged) == 5


def test_training_steps_read_nothing_from_the_device_between_log_intervals(tiny_cfg, monkeypatch):
    """No host-device synchronisation on the hot path: between logging intervals, a whole step (forward, loss,
    backward, clipping, AdamW, EMA, non-finite tracking, logging, callbacks, progress bar) reads no tensor value on
    the host. Nothing syncs on a CPU, so this counts the calls that would on a GPU."""
    reads = []  # [global step when the window opened, reads in it, where the first read came from]

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            reads.append([trainer.global_step, 0, None])

    import traceback

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        def counting(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            if reads:
                reads[-1][1] += 1
                reads[-1][2] = reads[-1][2] or f"{_name} at {traceback.extract_stack(limit=3)[0]}"
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)

    # one snapshot, at the end, as before snapshots were counted per run (a 40-step run would write one every step)
    train(tiny_cfg("trainer.max_steps=40", "trainer.log_every_n_steps=10", "trainer.enable_progress_bar=true",
                   "ema.snapshot_count=1"), [Window()])
    assert len(reads) == 40
    # the step that logs (global step 9 -> 10, 19 -> 20, ...) and its neighbour may read; the other 7 of 10 may not
    between = [(step, n, where) for step, n, where in reads[1:-1] if step % 10 not in (8, 9, 0)]
    assert len(between) >= 20 and all(n == 0 for _, n, _ in between), [r for r in between if r[1]]


def test_quick_preset_is_a_smoke_run_with_a_summary(tmp_path):
    """experiments=quick: 50 steps, the final grid, no quality measurement, no metrics.json; the console and
    train.log end with where everything is and what to run next; progress lines reach train.log."""
    run = tmp_path / "run"
    result = run_cli("ddpm.train", "experiments=quick", "logger=csv", "model.base_channels=16", "model.norm_groups=4",
                     "callbacks.progress_log.every_n_steps=25", f"hydra.run.dir={run}", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "samples" / "final.png").is_file() and not (run / "metrics.json").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 50
    log = (run / "train.log").read_text()
    assert "step 25/50 (50%) loss" in log and "left" in log and "step 50/50 (100%)" in log
    assert f"finished 50 steps in" in log and f"everything is in {run}" in log
    for line in (f"python -m ddpm.sample ckpt_path={run}/checkpoints/last.ckpt", "python -m ddpm.evaluate ckpt_path=",
                 "trainer.max_steps=100"):
        assert line in log and line in result.stdout
    assert "drawing final.png" in log and "done in" in log
    noise = ("anonymous setting", "weights_only` was not set", "LeafSpec", "litlogger", "model summary")
    assert not [n for n in noise if n in result.stdout + result.stderr]


def test_a_refused_command_leaves_no_run_directory(tmp_path):
    result = run_cli("ddpm.train", *TINY, "data.batch_size=5000", "hydra.run.dir=outputs/${now:%Y}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "data.batch_size=5000" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()  # it made outputs/ and outputs/<year>, and removes both (issue 20)


def test_flips_are_a_function_of_seed_epoch_and_image_and_survive_a_mid_epoch_resume():
    """random_flip: each image of an epoch is mirrored or not by a bit drawn with the shuffle from (seed, epoch), so the
    ordinary loader (any number of workers) and data.on_device give the same flipped batches, about half the images
    are mirrored, another epoch flips others, and a loader restored at batch k of an epoch hands over exactly the
    batches k, k+1, ... that the uninterrupted loader did."""
    from ddpm.data import Digits
    from ddpm.training.data import DataModule

    def epoch_batches(on_device: bool, workers: int, epoch: int, skip: int = 0) -> list[torch.Tensor]:
        data = Digits(root=".", batch_size=64, num_workers=workers, image_size=8, channels=1, num_classes=10,
                      on_device=on_device)
        data.random_flip = True
        module = DataModule(data)
        module.setup()
        torch.manual_seed(5)  # the run's seed, as seed_everything sets it
        loader = module.train_dataloader()
        loader.sampler.set_epoch(epoch)
        loader.load_state_dict({"batches_done": skip})
        return [module.on_after_batch_transfer(batch, 0)[0] for batch in loader]

    plain = epoch_batches(False, 0, 0)
    assert len(plain) == 1617 // 64
    for other in (epoch_batches(True, 0, 0), epoch_batches(False, 2, 0)):
        assert all(torch.equal(a, b) for a, b in zip(plain, other, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain[7:], epoch_batches(False, 0, 0, skip=7), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain[7:], epoch_batches(True, 0, 0, skip=7), strict=True))

    unflipped = Digits(root=".", batch_size=64, num_workers=0, image_size=8, channels=1, num_classes=10)
    unflipped.setup()
    images = torch.stack([unflipped.train_set[i][0] for i in range(len(unflipped.train_set))])
    keys = list(iter(DataModule(unflipped).train_dataloader().sampler.__class__(len(images), 5, flips=True)))
    flipped = torch.tensor([flip for _, flip in keys])
    assert 0.45 < flipped.float().mean() < 0.55
    order = torch.tensor([i for i, _ in keys])[: len(plain) * 64]
    expected = torch.where(flipped[: len(order), None, None, None], images[order].flip(-1), images[order])
    assert torch.equal(torch.cat(plain), expected)
    assert not torch.equal(torch.cat(epoch_batches(False, 0, 1)), torch.cat(plain))


@pytest.mark.parametrize("state,expected", [
    ({"batches_done": 7, "batch_size": 64}, 7),
    ({"batches_done": 7, "batch_size": 128}, 14),   # resumed with half the batch size: the same images skipped
    ({"batches_done": 7, "batch_size": 16}, 1),     # four times the batch size: to the nearest whole batch below
    ({"batches_done": 10**9, "batch_size": 64}, 25),  # more than the epoch has: the epoch is over
    ({"batches_done": -3, "batch_size": 64}, 0), ({"batches_done": "7"}, 0), ({"batches_done": True}, 0), ({}, 0),
])
def test_a_loader_state_from_a_checkpoint_is_an_input(state, expected):
    """The loader state travels in checkpoints, which are inputs: a changed data.batch_size, a count past the epoch
    or a value that is not a count never crashes the resume (a StopIteration would have, inside the generator)."""
    from ddpm.data import Digits
    from ddpm.training.data import DataModule

    module = DataModule(Digits(root=".", batch_size=64, num_workers=0, image_size=8, channels=1, num_classes=10))
    module.setup()
    loader = module.train_dataloader()
    loader.load_state_dict(state)
    assert len(list(loader)) == len(loader) - expected
