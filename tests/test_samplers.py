"""Sampler steps against Ho et al. Algorithm 2, and end-to-end with exact oracles, in float64.

An oracle is a network that knows the answer: it outputs the exact x_0/eps/v for its data (one point, or a Gaussian),
in whichever prediction target it is asked for, and the ``Denoiser`` turns that into (x_0, eps) as for a real network."""

import math

import pytest
import torch

from ddpm.core.denoiser import Denoiser
from ddpm.core.processes.ddpm import DDPMProcess, respace
from ddpm.core.prediction import network_target
from ddpm.core.samplers import sampling_timesteps
from ddpm.core.samplers.ddpm import ddpm_step, sample_ddpm
from ddpm.core.schedules import cosine_betas, linear_betas


def spaced_timesteps(num_timesteps, steps):
    """Time spacing depends only on T."""
    return sampling_timesteps(torch.linspace(0.99, 0.01, num_timesteps, dtype=torch.float64), steps)


def vp(alpha_bar):
    """(alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)), the step functions' noise level, for a tensor or float."""
    if isinstance(alpha_bar, float):
        return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def x0_from_eps(diffusion, i, x, eps):
    a = diffusion.alphas_cumprod[i].item()
    return (x - math.sqrt(1 - a) * eps) / math.sqrt(a)


class Oracle(torch.nn.Module):
    """A backbone whose output is the exact ``prediction`` target for the (x_0, eps) that ``exact(x_t, t)`` gives."""
    in_channels, image_size, num_classes, null_label = 1, 2, None, None

    def __init__(self, exact, diffusion, prediction):
        super().__init__()
        self.exact, self.diffusion, self.prediction = exact, diffusion, prediction

    def forward(self, x, t, labels=None):
        x0, eps = self.exact(x, t)
        a = self.diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return network_target(self.prediction, x0, eps, a.sqrt(), (1 - a).sqrt())


def oracle_model_fn(exact, diffusion, prediction="eps"):
    return Denoiser(Oracle(exact, diffusion, prediction), diffusion, prediction)


@pytest.fixture(params=["linear", "cosine"])
def diffusion(request):
    return DDPMProcess(linear_betas(1000) if request.param == "linear" else cosine_betas(1000))


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_step_is_algorithm_2(diffusion, variance):
    """x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps) + sigma_t z, sigma_t^2 = beta_t or beta-tilde_t."""
    x, eps, z = (torch.randn(4, 1, 3, 3, dtype=torch.float64) for _ in range(3))
    for i in (1, 10, 500, 999):
        beta = diffusion.betas[i].item()
        alpha, a_t = 1 - beta, diffusion.alphas_cumprod[i].item()
        a_prev = diffusion.alphas_cumprod[i - 1].item()
        sigma2 = beta if variance == "beta" else beta * (1 - a_prev) / (1 - a_t)
        expected = (x - beta / math.sqrt(1 - a_t) * eps) / math.sqrt(alpha) + math.sqrt(sigma2) * z
        got, _ = ddpm_step(diffusion, i, x, x0_from_eps(diffusion, i, x, eps), z, variance=variance, x0_clip="none")
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def one_point_oracle(diffusion, point, prediction="eps"):
    """The exact answer for data that is a single point: x_0 = x*, eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
    def exact(x, t):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return point.expand_as(x), (x - a.sqrt() * point) / (1 - a).sqrt()
    return oracle_model_fn(exact, diffusion, prediction)


@pytest.mark.parametrize("steps", [1000, 50, 7])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_with_perfect_oracle_lands_on_the_one_point_dataset(diffusion, steps, variance):
    point = torch.tensor([0.5, -0.25, 0.9, -1.0], dtype=torch.float64).view(1, 1, 2, 2)
    noise = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_ddpm(one_point_oracle(diffusion, point), diffusion, noise, steps=steps, variance=variance,
                      x0_clip="none", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-9)


def gaussian_oracle(diffusion, mu, s, prediction="eps"):
    """Exact answer for data ~ N(mu, s^2): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar), and
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), E[x_0 | x_t] from x_t = alpha x_0 + sigma eps."""
    def exact(x, t):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return (x - (1 - a).sqrt() * eps) / a.sqrt(), eps
    return oracle_model_fn(exact, diffusion, prediction)


def sample_gaussian(schedule, steps, variance, mu=0.3, s=0.2, n=40_000):
    diffusion = DDPMProcess(schedule(1000))
    noise = torch.randn(n, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sample_ddpm(gaussian_oracle(diffusion, mu, s), diffusion, noise, steps=steps, variance=variance,
                       x0_clip="none", generator=torch.Generator().manual_seed(1)).flatten()


@pytest.mark.parametrize("schedule", [linear_betas, cosine_betas])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_samples_a_gaussian_with_the_exact_score(schedule, variance):
    out = sample_gaussian(schedule, 1000, variance)
    # Standard errors of mean and std at n = 40k are 0.001 and 0.0007; the rest of the tolerance is the
    # sampler's own discretisation error at T = 1000 (measured: under 0.003 for either variance).
    assert out.mean().item() == pytest.approx(0.3, abs=0.005)
    assert out.std().item() == pytest.approx(0.2, abs=0.005)


def test_the_two_variances_bracket_the_truth_with_few_steps():
    """Ho et al. sec. 3.2: sigma^2 = beta_t and beta-tilde_t are the upper and lower bounds on the reverse
    variance; with 100 respaced steps the sample spread lands on either side of the data's."""
    assert sample_gaussian(linear_betas, 100, "beta").std().item() > 0.205
    assert sample_gaussian(linear_betas, 100, "posterior").std().item() < 0.195


def test_sampler_is_reproducible_given_the_generator():
    diffusion = DDPMProcess(linear_betas(100))
    model_fn = gaussian_oracle(diffusion, 0.0, 0.5)
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    a = sample_ddpm(model_fn, diffusion, noise, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(model_fn, diffusion, noise, generator=torch.Generator().manual_seed(3))
    c = sample_ddpm(model_fn, diffusion, noise, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddpm_rejects_unknown_variance():
    diffusion = DDPMProcess(linear_betas(10))
    with pytest.raises(ValueError, match="sampler.variance"):
        sample_ddpm(lambda x, t: (x, x), diffusion, torch.zeros(1, 1, 2, 2), variance="large")


def test_respaced_step_uses_respaced_betas(diffusion):
    ts = spaced_timesteps(1000, 10)
    spaced = respace(diffusion, ts)
    x, eps = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    i = 5
    beta = 1 - diffusion.alphas_cumprod[ts[i]].item() / diffusion.alphas_cumprod[ts[i - 1]].item()
    expected = (x - beta / math.sqrt(1 - diffusion.alphas_cumprod[ts[i]].item()) * eps) / math.sqrt(1 - beta)
    got, _ = ddpm_step(spaced, i, x, x0_from_eps(spaced, i, x, eps), None, x0_clip="none")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# --- DDIM and DPM-Solver++(2M) -------------------------------------------------------------------------

from ddpm.core.samplers.ddim import ddim_step, sample_ddim  # noqa: E402
from ddpm.core.samplers.dpmpp_2m import dpmpp_2m_step, sample_dpmpp_2m  # noqa: E402
from ddpm.core.samplers.heun import noise_levels, sample_heun  # noqa: E402


def test_ddim_step_eta_0_is_eq_12(diffusion):
    """x_prev = sqrt(abar_prev) (x - sqrt(1 - abar) eps)/sqrt(abar) + sqrt(1 - abar_prev) eps."""
    x, eps = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    a, a_prev = diffusion.alphas_cumprod[600], diffusion.alphas_cumprod[400]
    expected = math.sqrt(a_prev) * (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + math.sqrt(1 - a_prev) * eps
    got, _ = ddim_step(*vp(a), *vp(a_prev), x, x0_from_eps(diffusion, 600, x, eps), None, eta=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_ddim_step_eta_1_is_the_ddpm_posterior_step(diffusion):
    """With eta = 1 and consecutive timesteps, sigma^2 = beta-tilde_t and the mean is eq. 7's."""
    x, eps, z = (torch.randn(3, 1, 2, 2, dtype=torch.float64) for _ in range(3))
    for i in (1, 2, 300, 999):
        x0 = x0_from_eps(diffusion, i, x, eps)
        got, _ = ddim_step(*vp(diffusion.alphas_cumprod[i]), *vp(diffusion.alphas_cumprod[i - 1]), x, x0, z, eta=1.0)
        expected, _ = ddpm_step(diffusion, i, x, x0, z, variance="posterior", x0_clip="none")
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_dpmpp_first_order_step_is_ddim(diffusion):
    """Lu et al. 2022: DPM-Solver++(1) coincides with DDIM (eta = 0)."""
    x, x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    a, a_next = diffusion.alphas_cumprod[700].item(), diffusion.alphas_cumprod[500].item()
    expected, _ = ddim_step(*vp(torch.tensor(a, dtype=torch.float64)), *vp(torch.tensor(a_next, dtype=torch.float64)), x, x0, None)
    torch.testing.assert_close(dpmpp_2m_step(x, x0, None, vp(a), vp(a_next), None), expected, rtol=1e-10, atol=1e-12)


def test_dpmpp_2m_step_is_algorithm_2(diffusion):
    """x_i = (sigma_i/sigma_{i-1}) x - alpha_i (e^{-h_i} - 1) D_i, D_i = (1 + 1/(2 r_i)) x0_i - x0_{i-1}/(2 r_i),
    r_i = h_{i-1}/h_i, with lambda = log(alpha) - log(sigma) (Lu et al. 2022, Algorithm 2)."""
    x, x0, x0_last = (torch.randn(3, 1, 2, 2, dtype=torch.float64) for _ in range(3))
    a_last, a, a_next = (diffusion.alphas_cumprod[i].item() for i in (900, 700, 500))
    alpha = {k: math.sqrt(v) for k, v in (("last", a_last), ("now", a), ("next", a_next))}
    sigma = {k: math.sqrt(1 - v) for k, v in (("last", a_last), ("now", a), ("next", a_next))}
    lam = {k: math.log(alpha[k]) - math.log(sigma[k]) for k in alpha}
    h, h_last = lam["next"] - lam["now"], lam["now"] - lam["last"]
    r = h_last / h
    d = (1 + 1 / (2 * r)) * x0 - x0_last / (2 * r)
    expected = sigma["next"] / sigma["now"] * x - alpha["next"] * (math.exp(-h) - 1) * d
    torch.testing.assert_close(dpmpp_2m_step(x, x0, x0_last, vp(a), vp(a_next), vp(a_last)), expected, rtol=1e-10, atol=1e-12)


SAMPLERS = {
    "ddim_eta0": lambda m, d, n, **k: sample_ddim(m, d, n, steps=1000, eta=0.0, x0_clip="none", **k),
    "ddim_eta1": lambda m, d, n, **k: sample_ddim(m, d, n, steps=1000, eta=1.0, x0_clip="none", **k),
    "dpmpp_2m": lambda m, d, n, **k: sample_dpmpp_2m(m, d, n, steps=20, x0_clip="none", **k),
    "heun": lambda m, d, n, **k: sample_heun(m, d, n, steps=199, x0_clip="none", **k),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_fast_samplers_land_on_the_one_point_dataset(diffusion, name):
    point = torch.tensor([0.5, -0.25, 0.9, -1.0], dtype=torch.float64).view(1, 1, 2, 2)
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](one_point_oracle(diffusion, point), diffusion, noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", SAMPLERS)
def test_fast_samplers_sample_a_gaussian_with_the_exact_score(name):
    """ddim with eta = 1 over all T steps is DDPM in distribution; eta = 0 and DPM-Solver++(2M) solve the
    probability-flow ODE, which maps N(0, 1) onto the data distribution."""
    diffusion = DDPMProcess(linear_betas(1000))
    noise = torch.randn(40_000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](gaussian_oracle(diffusion, 0.3, 0.2), diffusion, noise, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(0.3, abs=0.005)
    assert out.std().item() == pytest.approx(0.2, abs=0.005)


def test_ddim_eta_0_is_deterministic_given_the_noise():
    diffusion = DDPMProcess(linear_betas(100))
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    model_fn = gaussian_oracle(diffusion, 0.0, 0.5)
    a = sample_ddim(model_fn, diffusion, noise, steps=10, generator=torch.Generator().manual_seed(0))
    b = sample_ddim(model_fn, diffusion, noise, steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = sample_ddim(model_fn, diffusion, noise, steps=10, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


def test_dynamic_thresholding():
    from ddpm.core.samplers import clip_x0

    x0 = torch.tensor([[0.5, -0.2], [3.0, -1.5]], dtype=torch.float64).view(2, 1, 1, 2)
    out = clip_x0(x0, "dynamic", percentile=1.0)
    torch.testing.assert_close(out[0], x0[0])  # within [-1, 1]: untouched (s = 1)
    torch.testing.assert_close(out[1], x0[1] / 3.0)  # s = max |x0| = 3: rescaled, not clipped
    assert torch.equal(clip_x0(x0, "clip"), x0.clamp(-1, 1))
    with pytest.raises(ValueError, match="sampler.x0_clip"):
        clip_x0(x0, "soft")


def test_logsnr_spacing():
    diffusion = DDPMProcess(linear_betas(1000))
    ts = sampling_timesteps(diffusion.alphas_cumprod, 20, "logsnr")
    assert ts[0] == 0 and ts[-1] == 999 and (ts[1:] > ts[:-1]).all() and 18 <= len(ts) <= 20
    lam = 0.5 * torch.log(diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))[ts]
    gaps = lam[:-1] - lam[1:]
    assert gaps.max() < 1.5 * gaps.mean()  # evenly spread in lambda, unlike time-uniform steps


def test_logsnr_spacing_of_the_cosine_schedule_is_not_eaten_by_its_clipped_last_step():
    """Cosine's beta_T is clipped at 0.999: lambda falls from -6.5 to -9.9 in the last step. Spaced down to -9.9, 20
    steps gave 17 distinct timesteps, 5 of them at t >= 990. With the floor at -5.1: 20 distinct, evenly spread in lambda."""
    alphas_cumprod = DDPMProcess(cosine_betas(1000)).alphas_cumprod
    lam = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod))
    unfloored = sampling_timesteps(alphas_cumprod, 20, 'logsnr')
    assert len(unfloored) == 17 and (unfloored >= 990).sum() == 5  # the defect, as measured
    ts = sampling_timesteps(alphas_cumprod, 20, 'logsnr', lambda_min=-5.1)
    assert len(ts) == 20 and (ts >= 990).sum() <= 2 and ts[0] == 0  # even in lambda, which cosine drops fast near T
    assert lam[ts[-1]] >= -5.1 > lam[ts[-1] + 1]  # it starts at the last timestep above the floor
    gaps = lam[ts][:-1] - lam[ts][1:]
    assert gaps.max() < 1.5 * gaps.mean()
    linear = DDPMProcess(linear_betas(1000)).alphas_cumprod  # lambda_T = -5.06: the floor changes nothing
    assert torch.equal(sampling_timesteps(linear, 20, 'logsnr', lambda_min=-5.1), sampling_timesteps(linear, 20, 'logsnr'))


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_is_accurate_in_few_steps(steps):
    diffusion = DDPMProcess(linear_betas(1000))
    noise = torch.randn(40_000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_dpmpp_2m(gaussian_oracle(diffusion, 0.3, 0.2), diffusion, noise, steps=steps, x0_clip="none")
    assert out.std().item() == pytest.approx(0.2, rel=0.03)
    assert out.mean().item() == pytest.approx(0.3, abs=0.005)


def test_heun_step_is_edm_algorithm_1():
    """Two levels and the end, written out: sigma = sqrt((1 - abar)/abar), x~ = x_t / alpha; d_i = (x~ - D_i)/sigma_i;
    x~' = x~ + (s_next - s) d_i; x~_next = x~ + (s_next - s)(d_i + d'_next)/2; the last step, to sigma = 0, is Euler's."""
    diffusion = DDPMProcess(linear_betas(1000))
    calls = []

    def model_fn(x, t):  # an arbitrary smooth "denoiser": D(x_t) = 0.3 x_t + 0.1
        calls.append(t[0].item())
        return 0.3 * x + 0.1, None

    x_t = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    # euler_ratio=inf: Algorithm 1 as written, its correction on every step (the default takes a step over 100x in
    # sigma, as this one from t = 999 to t = 0 is, as Euler's: issue 29)
    out = sample_heun(model_fn, diffusion, x_t, steps=3, spacing="time", lambda_min=None, x0_clip="none", euler_ratio=math.inf)
    assert calls == [999, 0, 0]  # levels t = 999 and t = 0: 2 levels, 2*2 - 1 = 3 evaluations
    abar = diffusion.alphas_cumprod[[999, 0]].tolist()
    alpha = [math.sqrt(a) for a in abar]
    s = [math.sqrt((1 - a) / a) for a in abar]
    D = lambda x_tilde, i: 0.3 * alpha[i] * x_tilde + 0.1  # noqa: E731
    x = x_t / alpha[0]
    d0 = (x - D(x, 0)) / s[0]
    x_euler = x + (s[1] - s[0]) * d0
    d1 = (x_euler - D(x_euler, 1)) / s[1]
    x = x + (s[1] - s[0]) * (d0 + d1) / 2
    expected = D(x, 1)  # x~ + (0 - s_1) (x~ - D)/s_1 = D
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert [noise_levels(n) for n in (10, 19, 20, 50)] == [5, 10, 10, 25]


def test_heun_converges_at_second_order():
    """Doubling the levels cuts Heun's error about 4x (measured 0.0151 -> 0.0047 in std at 39 -> 79 evaluations), where
    Euler's (DDIM) only halves. Heun is not DPM-Solver++: at 19 evaluations it overshoots the std by a third on this
    Gaussian (0.27 for 0.2), which the quality-vs-NFE table in docs/ shows on digits as well."""
    diffusion = DDPMProcess(linear_betas(1000))
    noise = torch.randn(40_000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    error = {steps: abs(sample_heun(gaussian_oracle(diffusion, 0.3, 0.2), diffusion, noise, steps=steps,
                                    x0_clip="none").std().item() - 0.2) for steps in (39, 79)}
    assert error[79] < 0.4 * error[39] and error[79] < 0.01


def test_karras_spacing_is_edm_eq_5_rounded_to_the_model_timesteps():
    diffusion = DDPMProcess(linear_betas(1000))
    abar = diffusion.alphas_cumprod
    ts = sampling_timesteps(abar, 10, "karras")
    sigma = ((1 - abar) / abar).sqrt()
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 10
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    want = (sigma[0] ** (1 / 7) + ramp * (sigma[-1] ** (1 / 7) - sigma[0] ** (1 / 7))) ** 7
    for got, target in zip(sigma[ts], want):  # each is the model level nearest (in log sigma) to the target
        assert abs(got.log() - target.log()) <= (sigma.log() - target.log()).abs().min() + 1e-12


def test_zero_terminal_snr_spacing_keeps_t_equal_T():
    from ddpm.core.schedules import rescale_zero_terminal_snr

    abar = DDPMProcess(rescale_zero_terminal_snr(linear_betas(1000))).alphas_cumprod
    for spacing in ("logsnr", "karras"):
        ts = sampling_timesteps(abar, 20, spacing)
        assert ts[-1] == 999 and ts[0] == 0 and 18 <= len(ts) <= 20


# --- every allowed step count turns noise into a sample (issue 20) --------------------------------------------
FEW_STEP_SAMPLERS = [("ddpm", "time"), ("ddim", "time"), *[(name, spacing) for name in ("dpmpp_2m", "heun")
                                                         for spacing in ("time", "logsnr", "karras")]]


FUNCTIONS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m, "heun": sample_heun}


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name,spacing", FEW_STEP_SAMPLERS)
def test_one_and_two_steps_start_from_t_T_and_land_on_the_one_point_dataset(diffusion, name, spacing, steps):
    """At steps = 1 (and 2, one level for Heun) a sampler starts at t = T, where pure noise is x_T, and ends on the data;
    it once evaluated only t-index 0 and returned the (clipped) starting noise."""
    point = torch.tensor([0.5, -0.25, 0.9, -1.0], dtype=torch.float64).view(1, 1, 2, 2)
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    oracle, visited = one_point_oracle(diffusion, point), []

    def model_fn(x, t):
        visited.append(int(t[0]))
        return oracle(x, t)

    options = {} if name in ("ddpm", "ddim") else {"spacing": spacing, "lambda_min": None}
    out = FUNCTIONS[name](model_fn, diffusion, noise, steps=steps, x0_clip="none", generator=torch.Generator().manual_seed(1),
                         **options)
    assert visited[0] == diffusion.num_timesteps - 1, visited
    assert len(visited) <= steps
    torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-9)


@pytest.mark.parametrize("lambda_min", [100, 0.0, -1.9, float("nan"), float("inf")])
def test_a_lambda_min_that_leaves_no_noisy_start_is_refused(lambda_min):
    from ddpm.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sampler.lambda_min=.*must be null or a log-SNR <= -2.0"):
        sampling_timesteps(cosine_betas(100).cumsum(0).clamp(max=0.99), 5, "logsnr", lambda_min)
