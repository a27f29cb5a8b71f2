"""Sampler steps against Ho et al. Algorithm 2, and end-to-end with exact eps oracles, in float64."""

import math

import pytest
import torch

from ddpm.diffusion import GaussianDiffusion, respace, spaced_timesteps
from ddpm.samplers.ddpm import ddpm_step, sample_ddpm
from ddpm.schedules import cosine_betas, linear_betas


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
        got, _ = ddpm_step(diffusion, i, x, eps, z, variance=variance, clip_x0=False)
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
                      clip_x0=False, generator=torch.Generator().manual_seed(1))
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
                       clip_x0=False, generator=torch.Generator().manual_seed(1)).flatten()


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
    got, _ = ddpm_step(spaced, i, x, eps, None, clip_x0=False)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
