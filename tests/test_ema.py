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
from ddpm.training.snapshots import posthoc_state_dict


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
