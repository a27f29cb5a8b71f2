"""Sampler steps against Ho et al. Algorithm 2, and end-to-end with exact eps oracles, in float64."""

import math

import pytest
import torch

from ddpm.core.diffusion import GaussianDiffusion, respace, spaced_timesteps
from ddpm.core.samplers.ddpm import ddpm_step, sample_ddpm
from ddpm.core.schedules import cosine_betas, linear_betas


@pytest.fixture(params=["linear", "cosine"])
def diffusion(request):
    return GaussianDiffusion(linear_betas(1000) if request.param == "linear" else cosine_betas(1000))


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
        got, _ = ddpm_step(diffusion, i, x, eps, z, variance=variance, x0_clip="none")
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def one_point_oracle(diffusion, point):
    """The exact eps for data that is a single point: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
    def model_fn(x, t):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * point) / (1 - a).sqrt()
    return model_fn


@pytest.mark.parametrize("steps", [1000, 50, 7])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_with_perfect_oracle_lands_on_the_one_point_dataset(diffusion, steps, variance):
    point = torch.tensor([0.5, -0.25, 0.9, -1.0], dtype=torch.float64).view(1, 1, 2, 2)
    noise = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_ddpm(one_point_oracle(diffusion, point), diffusion, noise, steps=steps, variance=variance,
                      x0_clip="none", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-9)


def gaussian_oracle(diffusion, mu, s):
    """Exact eps for data ~ N(mu, s^2): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar), and
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
    def model_fn(x, t):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
    return model_fn


def sample_gaussian(schedule, steps, variance, mu=0.3, s=0.2, n=40_000):
    diffusion = GaussianDiffusion(schedule(1000))
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
    diffusion = GaussianDiffusion(linear_betas(100))
    model_fn = gaussian_oracle(diffusion, 0.0, 0.5)
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    a = sample_ddpm(model_fn, diffusion, noise, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(model_fn, diffusion, noise, generator=torch.Generator().manual_seed(3))
    c = sample_ddpm(model_fn, diffusion, noise, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddpm_rejects_unknown_variance():
    diffusion = GaussianDiffusion(linear_betas(10))
    with pytest.raises(ValueError, match="sampler.variance"):
        sample_ddpm(lambda x, t: x, diffusion, torch.zeros(1, 1, 2, 2), variance="large")


def test_respaced_step_uses_respaced_betas(diffusion):
    ts = spaced_timesteps(1000, 10)
    spaced = respace(diffusion, ts)
    x, eps = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    i = 5
    beta = 1 - diffusion.alphas_cumprod[ts[i]].item() / diffusion.alphas_cumprod[ts[i - 1]].item()
    expected = (x - beta / math.sqrt(1 - diffusion.alphas_cumprod[ts[i]].item()) * eps) / math.sqrt(1 - beta)
    got, _ = ddpm_step(spaced, i, x, eps, None, x0_clip="none")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# --- DDIM and DPM-Solver++(2M) -------------------------------------------------------------------------

from ddpm.core.samplers.ddim import ddim_step, sample_ddim  # noqa: E402
from ddpm.core.samplers.dpmpp_2m import dpmpp_2m_step, sample_dpmpp_2m  # noqa: E402


def test_ddim_step_eta_0_is_eq_12(diffusion):
    """x_prev = sqrt(abar_prev) (x - sqrt(1 - abar) eps)/sqrt(abar) + sqrt(1 - abar_prev) eps."""
    x, eps = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    a, a_prev = diffusion.alphas_cumprod[600], diffusion.alphas_cumprod[400]
    expected = math.sqrt(a_prev) * (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + math.sqrt(1 - a_prev) * eps
    got, _ = ddim_step(a, a_prev, x, eps, None, eta=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_ddim_step_eta_1_is_the_ddpm_posterior_step(diffusion):
    """With eta = 1 and consecutive timesteps, sigma^2 = beta-tilde_t and the mean is eq. 7's."""
    x, eps, z = (torch.randn(3, 1, 2, 2, dtype=torch.float64) for _ in range(3))
    for i in (1, 2, 300, 999):
        got, _ = ddim_step(diffusion.alphas_cumprod[i], diffusion.alphas_cumprod[i - 1], x, eps, z, eta=1.0)
        expected, _ = ddpm_step(diffusion, i, x, eps, z, variance="posterior", x0_clip="none")
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_dpmpp_first_order_step_is_ddim(diffusion):
    """Lu et al. 2022: DPM-Solver++(1) coincides with DDIM (eta = 0)."""
    x, x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    a, a_next = diffusion.alphas_cumprod[700].item(), diffusion.alphas_cumprod[500].item()
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    expected, _ = ddim_step(torch.tensor(a, dtype=torch.float64), torch.tensor(a_next, dtype=torch.float64), x, eps, None)
    torch.testing.assert_close(dpmpp_2m_step(x, x0, None, a, a_next, None), expected, rtol=1e-10, atol=1e-12)


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
    torch.testing.assert_close(dpmpp_2m_step(x, x0, x0_last, a, a_next, a_last), expected, rtol=1e-10, atol=1e-12)


SAMPLERS = {
    "ddim_eta0": lambda m, d, n, **k: sample_ddim(m, d, n, steps=1000, eta=0.0, x0_clip="none", **k),
    "ddim_eta1": lambda m, d, n, **k: sample_ddim(m, d, n, steps=1000, eta=1.0, x0_clip="none", **k),
    "dpmpp_2m": lambda m, d, n, **k: sample_dpmpp_2m(m, d, n, steps=20, x0_clip="none", **k),
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
    diffusion = GaussianDiffusion(linear_betas(1000))
    noise = torch.randn(40_000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[name](gaussian_oracle(diffusion, 0.3, 0.2), diffusion, noise, generator=torch.Generator().manual_seed(1))
    assert out.mean().item() == pytest.approx(0.3, abs=0.005)
    assert out.std().item() == pytest.approx(0.2, abs=0.005)


def test_ddim_eta_0_is_deterministic_given_the_noise():
    diffusion = GaussianDiffusion(linear_betas(100))
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
    from ddpm.core.diffusion import logsnr_spaced_timesteps

    diffusion = GaussianDiffusion(linear_betas(1000))
    ts = logsnr_spaced_timesteps(diffusion.alphas_cumprod, 20)
    assert ts[0] == 0 and ts[-1] == 999 and (ts[1:] > ts[:-1]).all() and 18 <= len(ts) <= 20
    lam = 0.5 * torch.log(diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))[ts]
    gaps = lam[:-1] - lam[1:]
    assert gaps.max() < 1.5 * gaps.mean()  # evenly spread in lambda, unlike time-uniform steps


def test_logsnr_spacing_of_the_cosine_schedule_is_not_eaten_by_its_clipped_last_step():
    """Cosine's beta_T is clipped at 0.999: lambda falls from -6.5 to -9.9 in the last step. Spaced down to -9.9, 20
    steps gave 17 distinct timesteps, 5 of them at t >= 990. With the floor at -5.1: 20 distinct, evenly spread in lambda."""
    from ddpm.core.diffusion import logsnr_spaced_timesteps
    from ddpm.core.schedules import cosine_betas

    alphas_cumprod = GaussianDiffusion(cosine_betas(1000)).alphas_cumprod
    lam = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod))
    unfloored = logsnr_spaced_timesteps(alphas_cumprod, 20)
    assert len(unfloored) == 17 and (unfloored >= 990).sum() == 5  # the defect, as measured
    ts = logsnr_spaced_timesteps(alphas_cumprod, 20, lambda_min=-5.1)
    assert len(ts) == 20 and (ts >= 990).sum() <= 2 and ts[0] == 0  # even in lambda, which cosine drops fast near T
    assert lam[ts[-1]] >= -5.1 > lam[ts[-1] + 1]  # it starts at the last timestep above the floor
    gaps = lam[ts][:-1] - lam[ts][1:]
    assert gaps.max() < 1.5 * gaps.mean()
    linear = GaussianDiffusion(linear_betas(1000)).alphas_cumprod  # lambda_T = -5.06: the floor changes nothing
    assert torch.equal(logsnr_spaced_timesteps(linear, 20, lambda_min=-5.1), logsnr_spaced_timesteps(linear, 20))


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_is_accurate_in_few_steps(steps):
    diffusion = GaussianDiffusion(linear_betas(1000))
    noise = torch.randn(40_000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_dpmpp_2m(gaussian_oracle(diffusion, 0.3, 0.2), diffusion, noise, steps=steps, x0_clip="none")
    assert out.std().item() == pytest.approx(0.2, rel=0.03)
    assert out.mean().item() == pytest.approx(0.3, abs=0.005)
