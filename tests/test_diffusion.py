"""The forward process and its posterior against Ho et al. eq. 4, 6-7, in float64."""

import math

import pytest
import torch

from ddpm.core.objectives.denoising import Denoising
from ddpm.core.processes.ddpm import DDPMProcess, extract, respace
from ddpm.core.denoiser import Denoiser
from ddpm.core.prediction import to_x0_eps
from ddpm.core.samplers import sampling_timesteps
from ddpm.core.schedules import cosine_betas, linear_betas

T = 1000


@pytest.fixture(params=["linear", "cosine"])
def diffusion(request):
    return DDPMProcess(linear_betas(T) if request.param == "linear" else cosine_betas(T))


def abar(diffusion, t):
    """alpha_bar_t for the paper's 1-based t from the betas alone (abar_0 = 1)."""
    return math.prod(1.0 - b for b in diffusion.betas[:t].tolist())


def test_q_mean_variance_closed_form(diffusion):
    x0 = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    for t in (1, 2, 250, 1000):
        mean, var = diffusion.q_mean_variance(x0, torch.full((5,), t - 1))
        torch.testing.assert_close(mean, math.sqrt(abar(diffusion, t)) * x0, rtol=1e-10, atol=0)
        torch.testing.assert_close(var, torch.full_like(x0, 1 - abar(diffusion, t)), rtol=1e-10, atol=0)


def test_q_sample_has_the_forward_marginal():
    diffusion = DDPMProcess(linear_betas(T))
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64).view(-1, 1, 1, 1)
    t = torch.full((len(x0),), 399)
    xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
    a = abar(diffusion, 400)
    n = len(x0)
    assert abs(xt.mean().item() - math.sqrt(a) * 0.7) < 5 * math.sqrt((1 - a) / n)
    assert abs(xt.var().item() - (1 - a)) < 5 * (1 - a) * math.sqrt(2 / n)


def test_posterior_coefficients_eq_7(diffusion):
    for t in (2, 3, 100, 999, 1000):
        i, beta, alpha = t - 1, diffusion.betas[t - 1].item(), 1 - diffusion.betas[t - 1].item()
        a_t, a_prev = abar(diffusion, t), abar(diffusion, t - 1)
        assert diffusion.posterior_mean_coef1[i].item() == pytest.approx(math.sqrt(a_prev) * beta / (1 - a_t), rel=1e-10)
        assert diffusion.posterior_mean_coef2[i].item() == pytest.approx(math.sqrt(alpha) * (1 - a_prev) / (1 - a_t), rel=1e-10)
        assert diffusion.posterior_variance[i].item() == pytest.approx((1 - a_prev) / (1 - a_t) * beta, rel=1e-10)


def test_posterior_is_the_bayes_product_of_two_gaussians(diffusion):
    """Independently of eq. 7: q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1-abar_{t-1});
    completing the square gives precision alpha_t/beta_t + 1/(1-abar_{t-1})."""
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    xt = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    for t in (2, 50, 700, 1000):
        beta = diffusion.betas[t - 1].item()
        alpha, a_prev = 1 - beta, abar(diffusion, t - 1)
        precision = alpha / beta + 1 / (1 - a_prev)
        expected_mean = (math.sqrt(alpha) / beta * xt + math.sqrt(a_prev) / (1 - a_prev) * x0) / precision
        mean, var = diffusion.q_posterior(x0, xt, torch.full((3,), t - 1))
        torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var, torch.full_like(xt, 1 / precision), rtol=1e-9, atol=0)


def test_posterior_at_t1_is_x0(diffusion):
    x0, xt = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64)
    mean, var = diffusion.q_posterior(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=1e-12, atol=1e-12)
    assert (var == 0).all()


def test_predict_x0_inverts_q_sample(diffusion):
    x0, noise = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = extract(diffusion.sqrt_alphas_cumprod, t, x0), extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0)
    predicted, _ = to_x0_eps("eps", noise, diffusion.q_sample(x0, t, noise), alpha, sigma)  # the one eps -> x0 inverse
    torch.testing.assert_close(predicted, x0, rtol=1e-8, atol=1e-8)


def test_training_loss_is_zero_for_the_true_noise_and_draws_t_over_1_to_T():
    diffusion = DDPMProcess(linear_betas(5))
    x0 = torch.randn(4096, 1, 2, 2, dtype=torch.float64)
    seen = []

    def oracle(xt, t):  # knows x0, so it recovers the noise exactly
        seen.append(t)
        return (xt - diffusion.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0) / diffusion.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)

    assert Denoising()(Denoiser(Bare(oracle), diffusion), x0).item() < 1e-20  # the loss is the denoiser's, for every process
    t = torch.cat(seen)
    assert set(t.tolist()) == {0, 1, 2, 3, 4}  # uniform over all of 1..T (indices 0..T-1)
    wrong = lambda xt, t: torch.zeros_like(xt)  # noqa: E731
    assert Denoising()(Denoiser(Bare(wrong), diffusion), x0).item() == pytest.approx(1.0, abs=0.05)  # E||eps||^2 / d = 1


class Bare(torch.nn.Module):
    """A function of (x_t, t) as an unconditional backbone."""
    in_channels, image_size, num_classes, null_label = 1, 2, None, None

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, labels=None):
        return self.fn(x, t)


def spaced_timesteps(num_timesteps, steps):
    """Time spacing depends only on T."""
    return sampling_timesteps(torch.linspace(0.99, 0.01, num_timesteps, dtype=torch.float64), steps)


def test_spaced_timesteps():
    assert spaced_timesteps(1000, 1000).tolist() == list(range(1000))
    ts = spaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999 and (ts[1:] > ts[:-1]).all()
    with pytest.raises(ValueError, match="sampler.steps"):
        spaced_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="sampler.steps"):
        spaced_timesteps(1000, 0)


def test_respacing_keeps_alpha_bar_at_the_kept_steps(diffusion):
    """Nichol & Dhariwal sec. 4: the respaced process has the same alpha_bar at the kept timesteps."""
    ts = spaced_timesteps(T, 37)
    spaced = respace(diffusion, ts)
    torch.testing.assert_close(spaced.alphas_cumprod, diffusion.alphas_cumprod[ts], rtol=1e-9, atol=0)
    torch.testing.assert_close(respace(diffusion, torch.arange(T)).betas, diffusion.betas, rtol=1e-10, atol=1e-15)
