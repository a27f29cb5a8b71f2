"""EMAs: the power-function EMA against its closed form, the post-hoc reconstruction against an EMA tracked directly
(Karras et al. 2024), snapshots across a resume, the classic EMA's warm-up, and sampling with ema.sigma_rel."""

import json
import math

import pytest
import torch
from conftest import run_cli

from ddpm.core.ema import (PowerEMA, ema_warmup_decay, gamma_to_sigma_rel, posthoc_coefficients, profile_fit_error,
                           profile_inner_product, sigma_rel_to_gamma)
from ddpm.train import train
from ddpm.snapshots import posthoc_state_dict


def test_sigma_rel_to_gamma_matches_edm2():
    """EDM2 sec. 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.05, 0.1, 0.25):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    with pytest.raises(ValueError, match="ema.sigma_rel=0.3"):
        sigma_rel_to_gamma(0.3)


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))


def test_power_ema_is_its_closed_form_on_a_scalar_sequence():
    """beta_t = (1 - 1/t)^(gamma+1) telescopes: after t updates the weight of theta_tau is
    (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), a discrete tau^gamma profile."""
    net = Scalar()
    ema = PowerEMA(net, [0.05, 0.10])
    thetas = [math.sin(0.1 * tau) + 0.01 * tau for tau in range(1, 501)]
    for tau, value in enumerate(thetas, start=1):
        net.theta.data.fill_(value)
        ema.update(net, tau)
    t = len(thetas)
    for average, gamma in zip(ema.averages, ema.gammas):
        expected = sum((tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1) * value
                       for tau, value in enumerate(thetas, start=1))
        assert average.theta.item() == pytest.approx(expected, rel=1e-10)


def test_profile_inner_product_is_the_integral():
    """<p_a, p_b> = integral over [0, min(t_a, t_b)] of the two normalised power profiles (midpoint rule, 10^6 points)."""
    for t_a, g_a, t_b, g_b in ((100.0, 6.94, 100.0, 16.97), (60.0, 6.94, 100.0, 16.97), (100.0, 2.0, 40.0, 6.94)):
        n = 1_000_000
        tau = (torch.arange(n, dtype=torch.float64) + 0.5) * min(t_a, t_b) / n
        p = lambda t, g: (g + 1) * tau**g / t ** (g + 1)  # noqa: E731
        integral = (p(t_a, g_a) * p(t_b, g_b)).sum() * min(t_a, t_b) / n
        assert profile_inner_product(t_a, g_a, t_b, g_b).item() == pytest.approx(integral.item(), rel=1e-6)


def test_posthoc_profile_fit_shrinks_with_denser_snapshots():
    """The L2 error of the rebuilt profile of sigma_rel 0.2 from 0.05/0.10 snapshots over 600 steps: every 50 steps
    3.8%, every 25 1.1%, every 6 0.07% (computed here, not measured on weights)."""
    def fit(every):
        steps = [s for s in range(every, 601, every) for _ in (0, 1)]
        gammas = [sigma_rel_to_gamma(w) for _ in range(every, 601, every) for w in (0.05, 0.10)]
        x = posthoc_coefficients(steps, gammas, 600, sigma_rel_to_gamma(0.2))
        return profile_fit_error(steps, gammas, 600, sigma_rel_to_gamma(0.2), x)
    errors = [fit(every) for every in (50, 25, 6)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.002 and 0.02 < errors[0] < 0.06


def test_posthoc_coefficients_rebuild_a_profile_exactly_when_it_is_a_snapshot():
    x = posthoc_coefficients([50, 100, 50, 100], [6.94, 6.94, 16.97, 16.97], 100, 16.97)
    torch.testing.assert_close(x, torch.tensor([0, 0, 0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)  # the Gram matrix is ill-conditioned


def flat(state):
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def test_posthoc_ema_rebuilds_an_ema_tracked_directly(tiny_cfg, tmp_path):
    """300 steps tracking sigma_rel 0.05, 0.10 and 0.15, snapshots every 10: sigma_rel = 0.15 rebuilt from the 0.05 and
    0.10 snapshots alone lands within 1% of the directly tracked 0.15, measured against how far that EMA is from the
    raw weights (measured: 0.13%). For scale: the tracked 0.05 and 0.10 EMAs are ~35% of that distance apart, so an
    error 35x smaller than the gap between the two lengths Karras et al. compare cannot change which one wins."""
    module = train(tiny_cfg("trainer.max_steps=300", "ema.snapshot_every=10", "ema.sigma_rels=[0.05,0.1,0.15]"))
    direct = {s: flat(a.state_dict()) for s, a in zip(module.power_ema.sigma_rels, module.power_ema.averages)}
    raw = flat(module.net.state_dict())
    rebuilt, info = posthoc_state_dict(tmp_path / "run" / "ema_snapshots", 0.15, sources=[0.05, 0.10])
    assert info["snapshots"] == 30 and info["profiles"] == 60 and info["step"] == 300 and info["profile_fit_error"] < 0.02
    scale = (direct[0.15] - raw).norm()
    assert (flat(rebuilt) - direct[0.15]).norm() < 0.01 * scale
    assert (direct[0.05] - direct[0.10]).norm() > 0.2 * scale  # the lengths differ: the check above has teeth


def test_snapshots_survive_a_resume(tiny_cfg, tmp_path):
    """Stopped at step 50 (an epoch boundary, where a resume is bit-identical: tests/test_train.py) and rerun to 100, a
    run has every snapshot, and the power EMAs continue as if never stopped: the step-100 snapshot equals an
    uninterrupted run's."""
    common = ["ema.snapshot_every=25", "callbacks.model_checkpoint.every_n_train_steps=50", "~callbacks.sample_grid"]
    train(tiny_cfg("trainer.max_steps=50", *common, output_dir=tmp_path / "resumed"))
    train(tiny_cfg("trainer.max_steps=100", *common, output_dir=tmp_path / "resumed"))
    train(tiny_cfg("trainer.max_steps=100", *common, output_dir=tmp_path / "straight"))
    names = sorted(p.name for p in (tmp_path / "resumed" / "ema_snapshots").iterdir())
    assert names == ["ema_0000025.pt", "ema_0000050.pt", "ema_0000075.pt", "ema_0000100.pt"]
    a = torch.load(tmp_path / "resumed" / "ema_snapshots" / "ema_0000100.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "ema_snapshots" / "ema_0000100.pt", weights_only=True)
    for state_a, state_b in zip(a["state_dicts"], b["state_dicts"]):
        torch.testing.assert_close(flat(state_a), flat(state_b), rtol=1e-5, atol=1e-6)


def test_classic_ema_warmup():
    assert [ema_warmup_decay(0.999, t) for t in (1, 10, 90)] == [2 / 11, 11 / 20, 91 / 100]
    assert ema_warmup_decay(0.995, 100_000) == 0.995


def test_sample_and_evaluate_take_ema_sigma_rel(tiny_cfg, tmp_path):
    train(tiny_cfg("trainer.max_steps=30", "ema.snapshot_every=10"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    outputs = {}
    for sigma_rel in ("null", "0.1", "0.07"):
        out = tmp_path / f"eval_{sigma_rel}"
        result = run_cli("ddpm.evaluate", f"ckpt_path={ckpt}", f"ema.sigma_rel={sigma_rel}", "num_samples=20",
                         "metrics.reference_size=200", "sampler.steps=5", f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outputs[sigma_rel] = json.loads((out / "metrics.json").read_text())["protocol"]["weights"]
    assert outputs["null"] == "ema"
    assert outputs["0.1"] == {"power_ema": {"sigma_rel": 0.1, "source": "tracked"}}
    assert outputs["0.07"]["power_ema"]["source"] == "posthoc" and outputs["0.07"]["power_ema"]["snapshots"] == 3
    bad = run_cli("ddpm.sample", f"ckpt_path={ckpt}", "ema.sigma_rel=0.5", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ema.sigma_rel=0.5: must be") and bad.stderr.count("\n") == 1


def test_resuming_with_other_power_emas_starts_them_from_the_weights(tiny_cfg, tmp_path, caplog):
    """A run from before ema.sigma_rels (or with other widths) resumes: the EMAs asked for start from its weights."""
    train(tiny_cfg("trainer.max_steps=10", "ema.sigma_rels=[]"))
    module = train(tiny_cfg("trainer.max_steps=12", "ema.sigma_rels=[0.05]"))
    assert module.power_ema is not None and module.global_step == 12
    assert "the power EMAs start from the checkpoint's weights" in caplog.text
    module = train(tiny_cfg("trainer.max_steps=14", "ema.sigma_rels=[]"))  # and back: the saved ones are dropped
    assert module.power_ema is None and module.global_step == 14


# --- snapshots are data with a step and a model (issue 20) ---------------------------------------------------------
@pytest.fixture(scope="module")
def snapshotted(tmp_path_factory):
    """A 20-step run: checkpoints at 10 and 20, snapshots every 5 steps."""
    from conftest import TINY

    from ddpm.config import compose

    run = tmp_path_factory.mktemp("snapshotted") / "run"
    train(compose([*TINY, "trainer.max_steps=20", "ema.snapshot_every=5", "callbacks.model_checkpoint.every_n_train_steps=10",
                   "~callbacks.sample_grid"], output_dir=run))
    return run


def test_a_snapshot_count_spreads_over_the_run():
    from ddpm.training.snapshots import snapshot_interval

    assert snapshot_interval(40, 2000) == 50 and snapshot_interval(40, 800_000) == 20_000
    assert snapshot_interval(40, 10) == 1 and snapshot_interval(0, 2000) == 0 and snapshot_interval(40, 2000, 7) == 7


def test_posthoc_ema_stops_at_the_step_of_the_checkpoint_asked_for(snapshotted, tmp_path):
    from ddpm.config import compose
    from ddpm.evaluate import evaluate

    for name, step in (("step_0000010.ckpt", 10), ("last.ckpt", 20)):
        cfg = compose([f"ckpt_path={snapshotted / 'checkpoints' / name}", "ema.sigma_rel=0.07", "num_samples=20",
                       "metrics.reference_size=200", "sampler.steps=3"], config_name="evaluate", output_dir=tmp_path / name)
        record = evaluate(cfg)
        weights = record["protocol"]["weights"]["power_ema"]
        assert record["protocol"]["checkpoint"]["global_step"] == step
        assert weights["step"] == step and weights["last_snapshot_step"] == step and weights["snapshots"] == step // 5


def test_a_resume_removes_the_snapshots_an_aborted_attempt_wrote_past_it(snapshotted, tmp_path):
    """The README's NaN recovery: an attempt stopped past its last checkpoint left snapshots beyond it (here planted,
    non-finite, at step 15 after a checkpoint at 10); the rerun removes them before it goes on, and sampling from the
    finished run rebuilds finite weights."""
    import shutil

    from conftest import TINY

    from ddpm.config import compose
    from ddpm.sample import sample

    run = tmp_path / "run"
    shutil.copytree(snapshotted, run)
    for name in ("last.ckpt", "step_0000020.ckpt"):  # the attempt never reached them
        (run / "checkpoints" / name).unlink()
    for name in ("ema_0000020.pt",):
        (run / "ema_snapshots" / name).unlink()
    poisoned = torch.load(run / "ema_snapshots" / "ema_0000015.pt", weights_only=True)
    poisoned["state_dicts"] = [{k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
                               for sd in poisoned["state_dicts"]]
    torch.save(poisoned, run / "ema_snapshots" / "ema_0000015.pt")
    train(compose([*TINY, "trainer.max_steps=12", "ema.snapshot_every=5", "callbacks.model_checkpoint.every_n_train_steps=10",
                   "~callbacks.sample_grid"], output_dir=run))
    assert sorted(p.name for p in (run / "ema_snapshots").glob("*.pt")) == ["ema_0000005.pt", "ema_0000010.pt", "ema_0000012.pt"]
    out = sample(compose([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "ema.sigma_rel=0.07", "num_samples=10",
                          "sampler=ddim", "sampler.steps=3"], config_name="sample", output_dir=tmp_path / "s"))
    assert torch.isfinite(out["images"]).all() and out["images"].std() > 0


def test_non_finite_power_emas_stop_the_run_instead_of_a_snapshot(tmp_path):
    from types import SimpleNamespace

    from ddpm.training.module import NonFiniteLossError
    from ddpm.training.snapshots import EMASnapshots

    ema = PowerEMA(torch.nn.Linear(2, 2), [0.05])
    with torch.no_grad():
        ema.averages[0].weight.fill_(float("nan"))
    callback = EMASnapshots(str(tmp_path), every_n_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite power-EMA weights \(weight\) at step 3: training stopped"):
        callback.write(SimpleNamespace(is_global_zero=True), SimpleNamespace(power_ema=ema), 3)
    assert not list(tmp_path.iterdir())


def _planted(snapshotted, tmp_path, make):
    folder = tmp_path / "snaps"
    folder.mkdir()
    good = torch.load(snapshotted / "ema_snapshots" / "ema_0000005.pt", weights_only=True)
    make(folder / "ema_0000005.pt", good)
    return folder


class NotData:
    pass


BAD_SNAPSHOTS = [
    ("zero bytes", lambda p, good: p.write_bytes(b""), "not a readable EMA snapshot"),
    ("a raw pickle", lambda p, good: torch.save({"x": NotData()}, p), "not a readable EMA snapshot"),
    ("missing keys", lambda p, good: torch.save({"step": 5}, p), "not an EMA snapshot of ddpm.train"),
    ("a string step", lambda p, good: torch.save({**good, "step": "5"}, p), "not an EMA snapshot of ddpm.train"),
    ("another model", lambda p, good: torch.save({**good, "state_dicts": [PowerEMA(torch.nn.Linear(2, 2), [0.05]).averages[0]
                                                                          .state_dict()] * 2}, p),
     "not a snapshot of this checkpoint's model"),
    ("non-finite", lambda p, good: torch.save({**good, "state_dicts": [{k: v * float("inf") for k, v in sd.items()}
                                                                       for sd in good["state_dicts"]]}, p), "non-finite"),
    ("widths and states apart", lambda p, good: torch.save({**good, "gammas": [1.0]}, p), "do not match one to one"),
    ("a gamma of another width", lambda p, good: torch.save({**good, "gammas": [-5.0, good["gammas"][1]]}, p),
     "which do not belong together"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_SNAPSHOTS], ids=[b[0] for b in BAD_SNAPSHOTS])
def test_a_snapshot_that_is_not_one_of_this_model_is_refused_in_one_line(snapshotted, tmp_path, make, message):
    from ddpm.config import compose
    from ddpm.sample import sample
    from ddpm.validation import ConfigError

    folder = _planted(snapshotted, tmp_path, make)
    cfg = compose([f"ckpt_path={snapshotted / 'checkpoints' / 'last.ckpt'}", "ema.sigma_rel=0.07", f"ema.snapshots={folder}",
                   "num_samples=10"], config_name="sample", output_dir=tmp_path / "s")
    with pytest.raises(ConfigError) as error:
        sample(cfg)
    assert message in str(error.value) and "\n" not in str(error.value) and "ema_0000005.pt" in str(error.value)


# --- snapshots prove which run they belong to, and are read as plain files, bounded (issue 29, items 4 and 6) ----
def _copy_run(snapshotted, tmp_path, name="copy"):
    import shutil

    copy = tmp_path / name
    shutil.copytree(snapshotted, copy)
    return copy


def test_snapshots_of_another_run_are_refused(snapshotted, tmp_path):
    """Another run's snapshots (same model, same steps) in this run's folder, or its folder linked in: the post-hoc EMA
    would be that run's, without a word. Each snapshot carries its run's identity, which must be the checkpoint's."""
    import shutil

    import ddpm
    from ddpm.config import compose
    from ddpm.validation import ConfigError
    from conftest import TINY

    other = tmp_path / "other"
    train(compose([*TINY, "trainer.max_steps=20", "ema.snapshot_every=5", "callbacks.model_checkpoint.every_n_train_steps=10",
                   "~callbacks.sample_grid", "seed=1"], output_dir=other))
    mine = _copy_run(snapshotted, tmp_path)
    shutil.rmtree(mine / "ema_snapshots")
    (mine / "ema_snapshots").symlink_to(other / "ema_snapshots", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"ema_snapshots is a link, not this run's own folder"):
        ddpm.load(mine / "checkpoints" / "last.ckpt", ema=0.07, device="cpu")
    (mine / "ema_snapshots").unlink()
    shutil.copytree(other / "ema_snapshots", mine / "ema_snapshots")
    with pytest.raises(ConfigError, match=r"ema_0000005.pt: written by another training run"):
        ddpm.load(mine / "checkpoints" / "last.ckpt", ema=0.07, device="cpu")
    ddpm.load(other / "checkpoints" / "last.ckpt", ema=0.07, device="cpu", snapshots=mine / "ema_snapshots")  # its own


def test_a_fifo_among_the_snapshots_is_refused_not_waited_on(snapshotted, tmp_path):
    import os

    import ddpm
    from ddpm.validation import ConfigError

    mine = _copy_run(snapshotted, tmp_path)
    (mine / "ema_snapshots" / "ema_0000005.pt").unlink()
    os.mkfifo(mine / "ema_snapshots" / "ema_0000005.pt")
    with pytest.raises(ConfigError, match=r"ema_0000005.pt: not a snapshot file of its own \(a FIFO\)"):
        ddpm.load(mine / "checkpoints" / "last.ckpt", ema=0.07, device="cpu")


def test_a_snapshot_listing_one_state_thousands_of_times_is_refused_at_once(snapshotted, tmp_path):
    """Pickle stores a repeated object once: 8,000 references to one state dict make a small file whose rebuild cost
    minutes and gigabytes (it grows with the square of the count). A snapshot holds one state per tracked width."""
    import time

    import ddpm
    from ddpm.validation import ConfigError

    mine = _copy_run(snapshotted, tmp_path)
    path = mine / "ema_snapshots" / "ema_0000005.pt"
    good = torch.load(path, weights_only=True)
    state = good["state_dicts"][0]
    torch.save({**good, "state_dicts": [state] * 8000, "sigma_rels": [0.05] * 8000, "gammas": [good["gammas"][0]] * 8000}, path)
    assert path.stat().st_size < 5_000_000
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"lists 8000 state dicts; a snapshot holds one per tracked width"):
        ddpm.load(mine / "checkpoints" / "last.ckpt", ema=0.07, device="cpu")
    assert time.perf_counter() - start < 60  # a hang guard, not a speed claim (it took 57 s and 3.7 GB before)
