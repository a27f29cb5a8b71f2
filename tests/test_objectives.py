"""Training objectives (issue 31), against closed forms in float64.

Gaussian data N(mu, s^2 I) on the flow path x_t = (1 - t) x_0 + t eps has Gaussian marginals N((1 - t) mu, sd_t^2 I),
sd_t^2 = (1 - t)^2 s^2 + t^2, so its probability-flow map is affine: Phi_{t->r}(z) = m_r + (sd_r / sd_t)(z - m_t).
The exact average velocity is then u(z, r, t) = (z - Phi_{t->r}(z)) / (t - r), and the exact velocity
v(z, t) = m'_t + (sd'_t / sd_t)(z - m_t). An oracle network that outputs them makes MeanFlow's one-step sample an
exact data sample and its target equal u; with s = 0 (one point) the conditional velocity is the marginal one, so
MeanFlow's loss is exactly zero, and on EDM the consistency function mu + (t_min / t)(x - mu) makes ECT's loss zero.
"""

import json
import math

import pytest
import torch
from conftest import TINY, run_cli
from torch import nn

from ddpm.config import compose
from ddpm.core.denoiser import Denoiser
from ddpm.core.errors import ConfigError
from ddpm.core.guidance import Guidance
from ddpm.core.objectives import OBJECTIVES
from ddpm.core.objectives.consistency import Consistency
from ddpm.core.objectives.denoising import Denoising
from ddpm.core.objectives.meanflow import MeanFlow
from ddpm.core.objectives.shortcut import Shortcut
from ddpm.core.prediction import boundary_skip
from ddpm.core.processes.edm import EDMProcess
from ddpm.core.processes.flow import FlowProcess
from ddpm.core.processes.trigflow import TrigFlowProcess
from ddpm.core.samplers.consistency import ConsistencySampler
from ddpm.core.samplers.meanflow import MeanFlowSampler
from ddpm.core.unet import UNet
from ddpm.validation import validate

SHAPE = (6, 1, 4, 4)


class GaussianFlowOracle(nn.Module):
    """The exact average velocity u(z, r, t) of N(mu, s^2 I) data on the flow path (module docstring), as a backbone."""

    in_channels, image_size, num_classes, null_label, second_time = 1, 4, None, None, True

    def __init__(self, mu: torch.Tensor, s: float, scale: float = 1000.0):
        super().__init__()
        self.mu, self.s, self.scale = mu, s, scale

    def m_sd(self, t):
        t = t.view(-1, 1, 1, 1)
        return (1 - t) * self.mu, ((1 - t) ** 2 * self.s**2 + t**2).sqrt()

    def forward(self, z, c_noise, labels=None, c_noise_r=None):
        t = c_noise / self.scale
        r = t if c_noise_r is None else c_noise_r / self.scale
        (m_t, sd_t), (m_r, sd_r) = self.m_sd(t), self.m_sd(r)
        gap = (t - r).view(-1, 1, 1, 1)
        tt = t.view(-1, 1, 1, 1)
        velocity = -self.mu + (tt - (1 - tt) * self.s**2) / sd_t**2 * (z - m_t)  # r = t: v(z, t) itself
        average = (z - (m_r + sd_r / sd_t * (z - m_t))) / torch.where(gap == 0, 1.0, gap)
        return torch.where(gap == 0, velocity, average)


def gaussian(s=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn((1, *SHAPE[1:]), generator=generator, dtype=torch.float64) * 0.3
    return mu, Denoiser(GaussianFlowOracle(mu, s), FlowProcess(), "velocity")


# --- the processes' derivatives --------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [FlowProcess(), TrigFlowProcess(), EDMProcess()], ids=lambda p: p.name)
def test_d_alpha_sigma_is_the_derivative_of_the_path(process):
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64) * (process.t_max if process.name == "edm" else 1)
    h = 1e-6
    (a_hi, s_hi), (a_lo, s_lo) = process.alpha_sigma(t + h), process.alpha_sigma(t - h)
    d_alpha, d_sigma = process.d_alpha_sigma(t)
    torch.testing.assert_close(d_alpha, (a_hi - a_lo) / (2 * h), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(d_sigma, (s_hi - s_lo) / (2 * h), rtol=1e-7, atol=1e-8)


def test_the_trigflow_velocity_is_pi_over_two_times_v():
    """Lu & Song: d/dt of cos(pi t / 2) x_0 + sin(pi t / 2) eps is (pi / 2)(alpha eps - sigma x_0) = (pi / 2) v."""
    process, t = TrigFlowProcess(), torch.tensor([0.3, 0.7], dtype=torch.float64)
    x0, eps = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in process.alpha_sigma(t))
    torch.testing.assert_close(process.velocity(x0, eps, t), math.pi / 2 * (alpha * eps - sigma * x0))


# --- MeanFlow ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_meanflow_sampling_with_the_exact_average_velocity_gives_exact_data_samples(steps):
    """z_0 = Phi_{1->0}(z_1) = mu + s z_1: every jump is exact, so any number of steps lands on the same data sample."""
    mu, denoiser = gaussian(s=0.5)
    noise = torch.randn(SHAPE, dtype=torch.float64)
    out = MeanFlowSampler(steps=steps)(Guidance().model_fn(denoiser, None), denoiser.process, noise)
    torch.testing.assert_close(out, mu + 0.5 * noise, rtol=0, atol=1e-12)


def test_the_meanflow_target_equals_the_exact_average_velocity():
    """u_tgt = v - (t - r)(v d_z u + d_t u), with the marginal velocity v, is u itself (the MeanFlow identity, eq. 6)."""
    mu, denoiser = gaussian(s=0.7)
    t = torch.tensor([0.9, 0.6, 0.5, 0.3, 0.95, 0.2], dtype=torch.float64)
    r = torch.tensor([0.1, 0.0, 0.45, 0.29, 0.5, 0.2], dtype=torch.float64)
    z = (1 - t.view(-1, 1, 1, 1)) * mu + torch.randn(SHAPE, dtype=torch.float64)
    v = denoiser.output(z, t)  # r = t: the marginal velocity
    target = MeanFlow().target(denoiser, z, v, t, r, None)
    torch.testing.assert_close(target[:5], denoiser.output(z, t, r=r)[:5], rtol=0, atol=1e-10)
    torch.testing.assert_close(target[5:], v[5:], rtol=0, atol=1e-12)  # r = t: the target is v


def test_meanflow_loss_is_zero_at_the_exact_model_of_one_point():
    """With s = 0 the conditional velocity eps - x_0 is the marginal one, so the exact u gives a zero loss."""
    mu, denoiser = gaussian(s=0.0)
    x0 = mu.expand(SHAPE).clone()
    objective = MeanFlow(adaptive_p=0.0)
    t, r = objective.draw_times(SHAPE[0], "cpu")
    t, r = t.clamp(0.01, 0.99), r.clamp(0.0, 0.99)
    r = torch.minimum(r, t)
    assert objective.loss(denoiser, x0, None, t, r, torch.randn(SHAPE, dtype=torch.float64)).item() < 1e-20


def random_unet(second_time=True, dtype=torch.float64, seed=0):
    """A tiny U-Net with every weight drawn (its zero-initialised layers too), so each input moves the output."""
    torch.manual_seed(seed)
    net = UNet(image_size=4, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0, norm_groups=4, second_time=second_time).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net


class Smooth(nn.Module):
    """A nonlinear float64 backbone of (z, t, r) (the U-Net embeds its times in float32, too coarse for differences)."""

    in_channels, image_size, num_classes, null_label, second_time = 1, 4, None, None, True

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.w = nn.Parameter(torch.randn(16, 16, generator=generator, dtype=torch.float64) * 0.4)

    def forward(self, z, c_noise, labels=None, c_noise_r=None):
        t = (c_noise / 1000).view(-1, 1)
        r = t if c_noise_r is None else (c_noise_r / 1000).view(-1, 1)
        h = torch.tanh(z.flatten(1) @ self.w) * torch.sin(3 * t) + torch.cos(2 * r * t) * z.flatten(1) ** 2
        return h.view_as(z)


def test_the_meanflow_jvp_equals_central_finite_differences():
    """d/dt u(z_t, r, t) along (v, 1, 0), taken by torch.func.jvp, against (u(+h) - u(-h)) / 2h in float64."""
    denoiser = Denoiser(Smooth(), FlowProcess(), "velocity")
    generator = torch.Generator().manual_seed(1)
    z, v = torch.randn(SHAPE, generator=generator, dtype=torch.float64), torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.4, 0.8, 0.6], dtype=torch.float64)
    r = t * 0.5
    h = 1e-6
    u = lambda dz, dt: denoiser.output(z + dz * v, t + dt, None, None, r)  # noqa: E731
    with torch.no_grad():
        finite = (u(h, h) - u(-h, -h)) / (2 * h)
        target = MeanFlow().target(denoiser, z, v, t, r, None)
    torch.testing.assert_close(target, v - (t - r).view(-1, 1, 1, 1) * finite, rtol=1e-7, atol=1e-8)


def test_the_meanflow_jvp_under_bf16_autocast_is_the_float32_one_within_bf16_precision():
    denoiser = Denoiser(random_unet(dtype=torch.float32), FlowProcess(), "velocity")
    z, v = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0.9, 0.7, 0.5, 0.4, 0.8, 0.6], dtype=torch.float64)
    exact = MeanFlow().target(denoiser, z, v, t, t * 0.5, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = MeanFlow().target(denoiser, z, v, t, t * 0.5, None)
    assert torch.isfinite(low).all()
    assert (low.float() - exact).norm() / exact.norm() < 0.05


def test_meanflow_draws_r_below_t_and_equal_to_it_for_the_set_share():
    t, r = MeanFlow(ratio_r_neq_t=0.25).draw_times(20000, "cpu")
    assert (r <= t).all() and ((t > 0) & (t < 1)).all()
    assert abs((r != t).double().mean().item() - 0.25) < 0.02


def test_guidance_folded_into_the_meanflow_target_mixes_with_the_unconditional_velocity():
    """omega v + (1 - omega) u(z, t, t | null) where the label was kept (eq. 16); v where it was dropped."""
    class Labelled(GaussianFlowOracle):
        num_classes, null_label = 3, 3

        def forward(self, z, c_noise, labels=None, c_noise_r=None):
            return super().forward(z, c_noise, None, c_noise_r) + (labels == 3).view(-1, 1, 1, 1).to(z.dtype)

    mu = torch.zeros((1, *SHAPE[1:]), dtype=torch.float64)
    denoiser = Denoiser(Labelled(mu, 0.5), FlowProcess(), "velocity")
    z, v = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t = torch.full((SHAPE[0],), 0.5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3, 2, 3, 0])
    mixed = MeanFlow(guidance_omega=2.0).guided_velocity(denoiser, z, v, t, labels)
    unconditional = denoiser.output(z, t, torch.full_like(labels, 3))
    kept = (labels != 3).view(-1, 1, 1, 1)
    torch.testing.assert_close(mixed, torch.where(kept, 2 * v - unconditional, v))


# --- shortcut models --------------------------------------------------------------------------------------------------
def test_two_exact_half_jumps_are_the_exact_shortcut_target():
    """With the exact average velocity the mean of two half jumps is the full jump: the self-consistency target is u."""
    mu, denoiser = gaussian(s=0.6)
    t = torch.tensor([1.0, 0.5, 0.75, 0.25, 1.0, 0.125], dtype=torch.float64)
    jump = torch.tensor([1.0, 0.5, 0.25, 0.25, 0.5, 0.125], dtype=torch.float64)
    x0, eps = mu + 0.6 * torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    objective = Shortcut(base_steps=16)
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    exact = denoiser.output(z, t, r=t - jump)
    half = jump / 2
    u_1 = denoiser.output(z, t, r=t - half)
    u_2 = denoiser.output(z - half.view(-1, 1, 1, 1) * u_1, t - half, r=t - jump)
    torch.testing.assert_close((u_1 + u_2) / 2, exact, rtol=0, atol=1e-12)
    loss = objective.loss(denoiser, x0, None, t, jump, eps)  # every sample a jump larger than 1 / M: exact targets
    assert loss.item() < 1e-24


def test_the_shortcut_loss_is_zero_at_the_exact_model_of_one_point_and_draws_jumps_on_their_grid():
    mu, denoiser = gaussian(s=0.0)
    objective = Shortcut(base_steps=8)
    t_jump, jump = objective.draw_jumps(4000, "cpu")
    assert set(jump.tolist()) == {1.0, 0.5, 0.25, 0.125} and ((t_jump - jump) >= 0).all() and (t_jump <= 1).all()
    assert torch.equal(torch.remainder(t_jump, jump), torch.zeros_like(t_jump))
    t = torch.cat([torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64), t_jump[:3]])
    jumps = torch.cat([torch.zeros(3, dtype=torch.float64), jump[:3]])
    loss = objective.loss(denoiser, mu.expand(SHAPE).clone(), None, t, jumps, torch.randn(SHAPE, dtype=torch.float64))
    assert loss.item() < 1e-24


# --- consistency (ECT) ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [EDMProcess(sigma_data=0.5), FlowProcess(), TrigFlowProcess()], ids=lambda p: p.name)
def test_the_consistency_function_is_exactly_the_identity_at_the_least_noisy_level(process):
    prediction = process.predictions[0]
    denoiser = Denoiser(random_unet(second_time=False), process, prediction, boundary=True)
    x = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.full((SHAPE[0],), process.t_min, dtype=torch.float64)
    with torch.no_grad():
        f, _ = denoiser(x, t)
    alpha, _ = process.alpha_sigma(t[:1])
    expected = x if process.name == "edm" else x / alpha.item()
    assert torch.equal(f, expected)


def test_ect_r_of_t_is_the_papers_mapping():
    """r = t (1 - q^-(stage + 1) (1 + k sigmoid(-b t))), at least 0 (Geng et al. 2024, eq. 11 and their code)."""
    objective = Consistency(q=2.0, stage_steps=100, k=8.0, b=1.0)
    t = torch.tensor([0.01, 0.5, 1.0, 5.0, 80.0], dtype=torch.float64)
    for step in (0, 99, 100, 350, 1000):
        stage = step // 100
        expected = [max(0.0, x * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + math.exp(x))))) for x in t.tolist()]
        torch.testing.assert_close(objective.r_of(t, step), torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0)
    assert (objective.r_of(t, 0)[:3] == 0).all()  # stage 0: r = 0 below t = ln 7 (a denoising loss on x_0), t / 2 far above
    assert objective.r_of(t, 0)[-1] == pytest.approx(40.0, rel=1e-6)
    assert objective.r_of(t, 10**6)[-1] > 79.99  # late stages: r -> t


def test_the_ect_loss_is_the_papers_formula_on_fixed_inputs():
    """A fresh U-Net outputs exactly zero (its last layer is zero-initialised), so with the x0 target on EDM the
    consistency function is f(x, t) = b(t) x, b = sd^2 / ((t - t_min)^2 + sd^2); the loss is then, in closed form,
    mean over samples of (sqrt(||b(t) x_t - b(r) x_r||^2 + c^2) - c) / (t - r), with the target x_0 where r <= t_min."""
    process = EDMProcess(sigma_data=0.5)
    net = UNet(image_size=4, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), norm_groups=4).double()
    denoiser = Denoiser(net, process, "x0", boundary=True)
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(SHAPE, generator=generator, dtype=torch.float64), torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.5, 2.0, 10.0, 0.01, 1.0, 40.0], dtype=torch.float64)
    r = torch.tensor([0.3, 1.9, 0.0, 0.001, 0.999, 20.0], dtype=torch.float64)
    objective = Consistency(huber_c=0.03)
    b = lambda s: 0.25 / ((s - 0.002) ** 2 + 0.25)  # noqa: E731
    expected = []
    for i in range(SHAPE[0]):
        f_t = b(t[i].item()) * (x0[i] + t[i].item() * eps[i])
        f_r = b(r[i].item()) * (x0[i] + r[i].item() * eps[i]) if r[i] > 0.002 else x0[i]
        expected.append((math.sqrt(((f_t - f_r) ** 2).sum().item() + 0.03**2) - 0.03) / (t[i] - r[i]).item())
    loss = objective.loss(denoiser, x0, None, t, r, eps)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert Consistency().c_of(x0) == pytest.approx(0.00054 * 4)  # 16 pixels: Song & Dhariwal's c = 0.00054 sqrt(d)


def test_the_ect_loss_is_zero_at_the_exact_consistency_function_of_one_point():
    """Data at one point mu on EDM: the PF-ODE carries x_t = mu + t eps to mu + t_min eps, so the exact consistency
    function is f(x, t) = mu + (t_min / t)(x - mu), and two levels of one noise direction agree exactly."""
    process = EDMProcess(sigma_data=0.5)
    mu = torch.randn((1, *SHAPE[1:]), dtype=torch.float64)

    class Exact(nn.Module):
        in_channels, image_size, num_classes, null_label = 1, 4, None, None

        def forward(self, x, c_noise, labels=None):  # the x0 target F with b x + (1 - b) F = f
            sigma = torch.exp(c_noise / process.c_noise_scale * 4).view(-1, 1, 1, 1)
            x = x * (sigma**2 + 0.25).sqrt()  # the network sees c_in x
            b = boundary_skip(torch.ones_like(sigma), sigma, torch.ones(1, dtype=torch.float64),
                              torch.full((1,), 0.002, dtype=torch.float64), 0.5)
            return (mu + 0.002 / sigma * (x - mu) - b * x) / (1 - b)

    denoiser = Denoiser(Exact(), process, "x0", boundary=True)
    t = torch.tensor([0.5, 2.0, 10.0, 0.01, 1.0, 40.0], dtype=torch.float64)
    loss = Consistency(huber_c=0.01).loss(denoiser, mu.expand(SHAPE).clone(), None, t, t * 0.7, torch.randn(SHAPE, dtype=torch.float64))
    assert 0 <= loss.item() < 1e-12


def test_consistency_sampling_with_the_exact_consistency_function_is_exact():
    """One step from sigma_max: f(x_T, T) = mu + (t_min / T)(x_T - mu) for data at mu, x_T = T z (the sampler starts
    from noise alone); two steps re-noise and land within t_min z' of mu too."""
    process = EDMProcess(sigma_data=0.5)
    mu = torch.randn((1, *SHAPE[1:]), dtype=torch.float64)

    def model_fn(x, t):
        x0 = mu + 0.002 / t.view(-1, 1, 1, 1) * (x - mu)
        return x0, (x - x0) / t.view(-1, 1, 1, 1)

    noise = torch.randn(SHAPE, dtype=torch.float64)
    one = ConsistencySampler(steps=1, x0_clip="none")(model_fn, process, noise)
    torch.testing.assert_close(one, mu + 0.002 / 80 * (80 * noise - mu), rtol=0, atol=1e-12)
    two = ConsistencySampler(steps=2, sigmas=(0.821,), x0_clip="none")(model_fn, process, noise, generator=torch.Generator().manual_seed(0))
    assert (two - mu).abs().max() < 0.002 * 6  # mu + t_min z' for a fresh z'


# --- the design: one call, refusals in one line -----------------------------------------------------------------------
def test_the_objectives_register_themselves_in_order():
    assert list(OBJECTIVES) == ["denoising", "consistency", "meanflow", "shortcut"]
    assert [o.second_time for o in OBJECTIVES.values()] == [False, False, True, True]


@pytest.mark.parametrize("overrides, message", [
    (["objective=meanflow"], "objective=meanflow with process=ddpm"),
    (["objective=meanflow", "process=edm"], "objective=meanflow with process=edm"),
    (["objective=meanflow", "process=flow", "diffusion.prediction=x0"], "objective=meanflow with diffusion.prediction=x0"),
    (["objective=consistency", "process=edm", "sampler=ddpm"], "sampler=ddpm with process=edm"),
    (["objective=consistency", "sampler=ddim"], "objective=consistency with process=ddpm"),
    (["process=flow", "sampler=meanflow"], "sampler=meanflow needs a model trained with objective=meanflow"),
    (["objective=consistency", "process=edm", "objective.q=1"], "objective.q=1: must be"),
    (["objective=meanflow", "process=flow", "objective.ratio_r_neq_t=2"], "objective.ratio_r_neq_t=2: must be"),
    (["objective=consistency", "process=edm", "sampler.steps=2", "sampler.sigmas=[90]"], "sampler.sigmas="),
    (["objective=meanflow", "process=flow", "guidance.method=cfgpp", "guidance.scale=0.5"], "guidance.method=cfgpp with sampler=meanflow"),
])
def test_an_objective_without_meaning_for_an_option_is_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as refused:
        validate(compose([*TINY[:1], *overrides], output_dir=tmp_path), "train")
    assert message in str(refused.value) and "\n" not in str(refused.value)


CONTINUOUS = [o for o in TINY if not o.startswith("schedule.")] + ["callbacks.sample_grid.per_class=1"]


@pytest.mark.parametrize("objective, process", [("meanflow", "flow"), ("consistency", "edm"), ("shortcut", "flow")])
def test_a_few_step_run_trains_and_its_checkpoint_samples_at_one_and_two_steps(objective, process, tmp_path):
    """Acceptance 1 in miniature, in process: train (its grid drawn at 1 NFE), then ddpm.load(...).sample at 1 and 2."""
    from ddpm import load
    from ddpm.train import train

    run = tmp_path / "run"
    train(compose([*CONTINUOUS, f"objective={objective}", f"process={process}", "trainer.max_steps=3"], output_dir=run))
    assert (run / "samples" / "final.png").is_file()
    model = load(run / "checkpoints" / "last.ckpt")
    for steps in (1, 2):
        out = model.draw(4, steps=steps, seed=0)
        assert out["images"].shape == (4, 1, 8, 8) and torch.isfinite(out["images"]).all() and out["nfe"] == steps


def test_the_commands_sample_and_evaluate_a_consistency_checkpoint_in_one_step(tmp_path):
    from ddpm.train import train

    run = tmp_path / "run"
    train(compose([*CONTINUOUS, "objective=consistency", "process=edm", "trainer.max_steps=2", "~callbacks.sample_grid"],
                  output_dir=run))
    ckpt = run / "checkpoints" / "last.ckpt"
    result = run_cli("ddpm.sample", f"ckpt_path={ckpt}", "sampler=consistency", "sampler.steps=2", "num_samples=10",
                     f"hydra.run.dir={tmp_path / 'sample'}", cwd=tmp_path)
    assert result.returncode == 0 and "2 network evaluations each" in result.stderr + result.stdout, result.stderr[-2000:]
    result = run_cli("ddpm.evaluate", f"ckpt_path={ckpt}", "sampler=consistency", "sampler.steps=1", "num_samples=20",
                     f"hydra.run.dir={tmp_path / 'evaluate'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert record["protocol"]["sampler"]["name"] == "consistency" and record["metrics"]["nfe"] == 1


# --- DDP: two gloo ranks give the gradients of one process on the global batch ----------------------------------------
def _ddp_rank(rank: int, store: str, inputs: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    denoiser = Denoiser(random_unet(), FlowProcess(), "velocity")

    class Step(nn.Module):  # what Lightning's DDP wraps: the module whose forward computes the loss
        def __init__(self):
            super().__init__()
            self.net = denoiser.net

        def forward(self, x0, t, r, eps):
            return MeanFlow().loss(denoiser, x0, None, t, r, eps)

    model = DistributedDataParallel(Step())
    half = slice(rank * 3, rank * 3 + 3)
    model(*(inputs[k][half] for k in ("x0", "t", "r", "eps"))).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.net.named_parameters()}, out)
    dist.barrier()  # neither rank leaves while the other still talks to it (gloo aborts a rank whose peer has gone)
    dist.destroy_process_group()


def test_two_ddp_ranks_training_meanflow_give_the_gradients_of_one_process(tmp_path):
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    inputs = {"x0": torch.randn(SHAPE, generator=generator, dtype=torch.float64),
              "eps": torch.randn(SHAPE, generator=generator, dtype=torch.float64),
              "t": torch.tensor([0.9, 0.7, 0.5, 0.4, 0.8, 0.6], dtype=torch.float64)}
    inputs["r"] = inputs["t"] * torch.tensor([0.5, 1.0, 0.2, 0.9, 1.0, 0.0], dtype=torch.float64)
    mp.spawn(_ddp_rank, args=(str(tmp_path / "store"), inputs, str(tmp_path / "grads.pt")), nprocs=2, join=True)
    denoiser = Denoiser(random_unet(), FlowProcess(), "velocity")
    MeanFlow().loss(denoiser, inputs["x0"], None, inputs["t"], inputs["r"], inputs["eps"]).backward()
    ranks = torch.load(tmp_path / "grads.pt")
    for name, p in denoiser.net.named_parameters():
        torch.testing.assert_close(ranks[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


# --- consistency tuning from a denoising checkpoint (ECT) -------------------------------------------------------------
def test_init_from_starts_a_consistency_run_from_a_denoising_runs_ema_weights(tmp_path):
    from ddpm.train import train
    from ddpm.training.assemble import build_module, start_from

    common = [o for o in CONTINUOUS if "per_class" not in o] + ["process=edm", "~callbacks.sample_grid"]
    train(compose([*common, "trainer.max_steps=2"], output_dir=tmp_path / "denoising"))
    ckpt = str(tmp_path / "denoising" / "checkpoints" / "last.ckpt")
    cfg = compose([*common, "objective=consistency", f"init_from={ckpt}"], output_dir=tmp_path / "tuned")
    validate(cfg, "train")
    module = build_module(cfg)
    start_from(module, ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in module.net.state_dict().items():
        assert torch.equal(value, saved["ema.module." + name]) and torch.equal(module.ema.module.state_dict()[name], value)
    other = compose([*common, "objective=consistency", f"init_from={ckpt}", "model.base_channels=8"], output_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"init_from=.*: its network differs from this run's at"):
        start_from(build_module(other), ckpt)
    with pytest.raises(ConfigError, match=r"init_from='nowhere.ckpt': must be null or an existing checkpoint file"):
        validate(compose([*common, "init_from=nowhere.ckpt"], output_dir=tmp_path / "y"), "train")
