"""Likelihood (issue 34, item 5 in part): the Gaussian KL, the discretized decoder, DDPM's bound and the probability-flow
ODE's likelihood against closed forms in float64. For Gaussian data N(mu, s^2 I) the Bayes-optimal denoiser is known,
E[x_0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), and so is every marginal density."""

import math

import pytest
import torch
from scipy import integrate, stats

from ddpm.core.likelihood import (discretized_gaussian_log_likelihood, divergence, dequantize, normal_kl,
                                  ode_bits_per_dim, ode_log_likelihood, vlb_term, vlb_terms)
from ddpm.core.processes.ddpm import DDPMProcess, respace
from ddpm.core.processes.edm import EDMProcess
from ddpm.core.processes.flow import FlowProcess
from ddpm.core.processes.trigflow import TrigFlowProcess
from ddpm.core.schedules import linear_betas
from ddpm.core.variance import fixed_log_variance as reverse_log_variance


def gaussian_denoiser(process, mu: float, s: float):
    """The Bayes-optimal (x0, eps) for data N(mu, s^2 I) on ``process``'s path."""
    def denoise(x_t, t):
        alpha, sigma = (v.to(x_t).view(-1, *([1] * (x_t.ndim - 1))) for v in process.alpha_sigma(t))
        x0 = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x_t - alpha * mu)
        return x0, (x_t - alpha * x0) / sigma
    return denoise


def test_normal_kl_is_the_closed_form_and_an_integral():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()), torch.distributions.Normal(m2, v2.sqrt()))
    torch.testing.assert_close(normal_kl(m1, v1.log(), m2, v2.log()), expected, rtol=1e-12, atol=1e-14)
    p, q = stats.norm(0.3, 0.7), stats.norm(-0.2, 1.3)
    numeric = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -20, 20)[0]
    got = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (0.3, math.log(0.49), -0.2, math.log(1.69))))
    assert got.item() == pytest.approx(numeric, rel=1e-9)


def test_the_discretized_decoder_integrates_each_bin_and_sums_to_one():
    k = torch.arange(256, dtype=torch.float64)
    x = 2 * k / 255 - 1
    mean, log_scale = torch.full_like(x, 0.1), torch.full_like(x, math.log(0.3))
    log_p = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    edges = [(-math.inf if i == 0 else x[i].item() - 1 / 255, math.inf if i == 255 else x[i].item() + 1 / 255)
             for i in range(256)]
    expected = torch.tensor([stats.norm(0.1, 0.3).cdf(b) - stats.norm(0.1, 0.3).cdf(a) for a, b in edges], dtype=torch.float64)
    middle = expected > 1e-200
    torch.testing.assert_close(log_p[middle], expected[middle].log(), rtol=1e-9, atol=1e-9)


def test_the_reverse_variances_are_beta_tilde_and_beta_with_ddpms_first_step():
    process = DDPMProcess(linear_betas(1000))
    small, large = reverse_log_variance(process, "fixed_small").exp(), reverse_log_variance(process, "fixed_large").exp()
    torch.testing.assert_close(small[1:], process.posterior_variance[1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(large[1:], process.betas[1:], rtol=1e-12, atol=0)
    assert small[0].item() == pytest.approx(process.posterior_variance[1].item(), rel=1e-14) and small[0] == large[0]


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_each_kl_term_of_the_bound_is_its_closed_form(variance):
    """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) at a given x_t: the means differ by coef1 (x0_hat - x0), so per dim
    it is (coef1^2 (x0_hat - x0)^2 / v_p + v_q / v_p - 1 - log(v_q / v_p)) / 2, written out here from scalars."""
    process, mu, s = DDPMProcess(linear_betas(50)), 0.2, 0.6
    denoise = gaussian_denoiser(process, mu, s)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) * s + mu
    for i in (1, 7, 49):
        index = torch.full((3,), i)
        x_t = process.q_sample(x0, index, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        abar, abar_prev, beta = (process.alphas_cumprod[i].item(), process.alphas_cumprod_prev[i].item(), process.betas[i].item())
        v_q = beta * (1 - abar_prev) / (1 - abar)
        v_p = v_q if variance == "fixed_small" else beta
        coef1 = beta * math.sqrt(abar_prev) / (1 - abar)
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x0_hat = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x_t - alpha * mu)
        expected = (0.5 * (coef1**2 * (x0_hat - x0) ** 2 / v_p + v_q / v_p - 1 - math.log(v_q / v_p))).flatten(1).sum(1)
        torch.testing.assert_close(vlb_term(process, denoise, x0, x_t, index, variance, x0_clip="none"), expected, rtol=1e-10,
                                   atol=1e-12)


def test_the_decoder_term_and_the_prior_are_their_closed_forms():
    process, mu, s = DDPMProcess(linear_betas(50)), 0.0, 0.5
    denoise = gaussian_denoiser(process, mu, s)
    x0 = (2 * torch.tensor([0.0, 17, 128, 255], dtype=torch.float64) / 255 - 1).view(4, 1, 1, 1)
    x_t = process.q_sample(x0, torch.zeros(4, dtype=torch.long), torch.full_like(x0, 0.3))
    alpha, sigma = process.sqrt_alphas_cumprod[0].item(), process.sqrt_one_minus_alphas_cumprod[0].item()
    x0_hat = alpha * s**2 / (alpha**2 * s**2 + sigma**2) * x_t  # the posterior mean at t = 1 is x0_hat itself
    std = math.sqrt(process.posterior_variance[1].item())
    lo, hi = x0 - 1 / 255, x0 + 1 / 255
    p = [stats.norm(m, std).cdf(h if k < 3 else math.inf) - stats.norm(m, std).cdf(l if k > 0 else -math.inf)
         for k, (m, l, h) in enumerate(zip(x0_hat.flatten().tolist(), lo.flatten().tolist(), hi.flatten().tolist()))]
    got = vlb_term(process, denoise, x0, x_t, torch.zeros(4, dtype=torch.long), x0_clip="none")  # the closed form's model
    torch.testing.assert_close(got, -torch.tensor(p, dtype=torch.float64).log(), rtol=1e-9, atol=1e-12)
    bound = vlb_terms(process, denoise, x0, generator=torch.Generator().manual_seed(0))
    abar_T = process.alphas_cumprod[-1].item()
    prior = 0.5 * (-math.log(1 - abar_T) + (1 - abar_T) + abar_T * x0.flatten() ** 2 - 1)
    torch.testing.assert_close(bound.prior, prior, rtol=1e-10, atol=1e-14)
    assert bound.terms.shape == (4, 50) and torch.equal(bound.total, bound.prior + bound.terms.sum(1))


def test_the_bound_in_expectation_is_its_closed_form_also_on_a_respaced_process():
    """The full and iDDPM's strided bound (a respaced process: 10 of 100 steps). For the Bayes-optimal denoiser the
    expectation over x_t of every KL term is a closed form; the mean over 400 images' draws approaches their sum."""
    full, mu, s = DDPMProcess(linear_betas(100)), 0.1, 0.4
    strided = respace(full, torch.arange(9, 100, 10))
    g = torch.Generator().manual_seed(2)
    x0 = (torch.round((torch.randn(400, 1, 1, 2, generator=g, dtype=torch.float64) * s + mu).clamp(-1, 1) * 127.5 + 127.5) / 127.5 - 1)

    def expected_kl(process):  # sum over t >= 2 of E_{x_t | x_0}[KL], per image
        total = torch.zeros(len(x0), dtype=torch.float64)
        for i in range(1, process.num_timesteps):
            abar, abar_prev, beta = (process.alphas_cumprod[i].item(), process.alphas_cumprod_prev[i].item(), process.betas[i].item())
            alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
            k = alpha * s**2 / (alpha**2 * s**2 + sigma**2)
            coef1 = beta * math.sqrt(abar_prev) / (1 - abar)
            mse = (mu - x0) ** 2 * (1 - k * alpha) ** 2 + k**2 * sigma**2  # E (x0_hat - x0)^2 over x_t | x_0
            total += (0.5 * coef1**2 * mse / (beta * (1 - abar_prev) / (1 - abar))).flatten(1).sum(1)
        return total

    for process in (full, strided):
        bound = vlb_terms(process, gaussian_denoiser(process, mu, s), x0, generator=g, x0_clip="none")  # the closed form's
        measured = bound.terms[:, 1:].sum(1)
        assert measured.mean().item() == pytest.approx(expected_kl(process).mean().item(), rel=0.05)


@pytest.mark.parametrize("process, mu, s", [(FlowProcess(), 0.3, 0.5), (TrigFlowProcess(sigma_data=0.5), -0.2, 0.7),
                                            (EDMProcess(sigma_data=0.5), 0.0, 0.5)])
def test_the_ode_likelihood_of_gaussian_data_is_the_exact_log_density(process, mu, s):
    """log p_{t_min}(x) by the probability-flow ODE equals log N(x; alpha mu, (alpha^2 s^2 + sigma^2) I) at t_min, to
    the solver's tolerance, with the exact divergence (the prior is exact: flow and TrigFlow end at alpha = 0; on
    EDM the data are N(0, sigma_data^2), the prior's assumption)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) * s + mu
    result = ode_log_likelihood(process, gaussian_denoiser(process, mu, s), x, estimator="exact", rtol=1e-9, atol=1e-9)
    alpha, sigma = (v.item() for v in process.alpha_sigma(torch.tensor([process.t_min], dtype=torch.float64)))
    exact = torch.distributions.Normal(alpha * mu, math.sqrt(alpha**2 * s**2 + sigma**2)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(result.log_likelihood, exact, rtol=0, atol=1e-5)
    assert result.nfe > 10


def test_hutchinsons_estimate_averages_to_the_exact_divergence():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(12, 12, generator=g, dtype=torch.float64)
    velocity = lambda y: torch.tanh(y.flatten(1) @ weight).view(y.shape)  # noqa: E731
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    _, exact = divergence(velocity, x, "exact")
    probes = torch.randint(0, 2, (20000, *x.shape), generator=g).double() * 2 - 1
    _, estimate = divergence(velocity, x, "hutchinson", probes)
    _, one = divergence(velocity, x, "hutchinson", probes[:1])
    assert not torch.allclose(one, exact)  # one probe is an estimate, not the answer
    torch.testing.assert_close(estimate, exact, rtol=0, atol=0.05)


def test_bits_per_dim_of_a_uniform_density_is_eight_and_dequantization_stays_in_its_bins():
    """A model uniform on [-1, 1]^D has log p = -D log 2; the 8-bit values it implies have 256 equally likely values
    each: 8 bits per dimension, exactly (the +7 offset of [-1, 1] data)."""
    dims = 3 * 32 * 32
    assert ode_bits_per_dim(torch.tensor([-dims * math.log(2.0)], dtype=torch.float64), dims).item() == pytest.approx(8.0, abs=1e-12)
    k = torch.arange(256, dtype=torch.float64).repeat(40)
    y = dequantize(2 * k / 255 - 1, torch.Generator().manual_seed(5))
    assert torch.equal(torch.floor((y + 1) * 128), k) and y.min() >= -1 and y.max() < 1


# --- where users find it: Pipeline.bits_per_dim and ddpm.evaluate's bpd (every process) ------------------------------
@pytest.mark.parametrize("process", ["ddpm", "ddpm_learned", "flow", "edm", "trigflow"])
def test_ddpm_evaluate_reports_bits_per_dim_for_every_process(process, tmp_path):
    """A few steps of training on digits, then ``ddpm.evaluate likelihood.num_images=4``: a finite bpd (the bound for
    DDPM, the PF-ODE for the others) with its protocol; the Python API gives the same number. ``ddpm_learned``:
    ``diffusion.variance=learned_range`` trains, evaluates its bound with the learned variance, and samples."""
    from ddpm.config import compose
    from ddpm.evaluate import evaluate
    from ddpm.inference import load
    from ddpm.train import train

    from conftest import TINY

    learned = process == "ddpm_learned"
    if process.startswith("ddpm"):
        overrides = TINY + (["diffusion.variance=learned_range"] if learned else [])
    else:
        overrides = [o for o in TINY if not o.startswith("schedule.")] + [f"process={process}"]
    train(compose([*overrides, "trainer.max_steps=3", "~callbacks.sample_grid", "ema.snapshot_count=0"],
                  output_dir=tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    settings = ["likelihood.num_images=4", "likelihood.rtol=1e-3", "likelihood.atol=1e-3", "likelihood.conditional=true"]
    record = evaluate(compose([f"ckpt_path={checkpoint}", "num_samples=4", "sampler.steps=2", *settings,
                               f"paths.cache_dir={tmp_path / 'cache'}", "metrics.reference_size=100"],
                              config_name="evaluate", output_dir=tmp_path / "eval"))
    bpd, protocol = record["metrics"]["bpd"], record["protocol"]["likelihood"]
    assert math.isfinite(bpd) and bpd > 0 and protocol["num_images"] == 4 and protocol["split"] == "test"
    assert protocol["method"] == ("vlb" if process.startswith("ddpm") else "ode") and protocol["nfe_per_batch"] > 0
    if process.startswith("ddpm"):
        assert protocol["variance"] == ("learned_range" if learned else "fixed_small")
    from ddpm.data import Digits, stack_dataset

    digits = Digits(root=".", batch_size=4, num_workers=0, image_size=8, channels=1, num_classes=10)
    images, labels = stack_dataset(digits.reference_set("test"), 4)
    model = load(checkpoint, device="cpu")
    python = model.bits_per_dim(images, labels, rtol=1e-3, atol=1e-3)
    assert python["mean"] == pytest.approx(bpd, rel=1e-9)
    if learned:  # the learned variance changes the bound (fixed_small is not what it measured) and sampling runs
        assert model.bits_per_dim(images, labels, variance="fixed_small")["mean"] != pytest.approx(bpd, rel=1e-6)
        assert torch.isfinite(model.sample([0, 1], sampler="ddpm", steps=5)).all()


def test_a_model_whose_velocity_overflows_gets_one_line_not_a_traceback():
    from ddpm.core.likelihood import NonFiniteLikelihood

    def exploding(x_t, t):
        return x_t * math.inf + 1, x_t * math.inf + 1  # NaN at 0, inf elsewhere

    with pytest.raises(NonFiniteLikelihood, match="did not solve to t_max") as error:
        ode_log_likelihood(FlowProcess(), exploding, torch.zeros(1, 1, 2, 2, dtype=torch.float64), estimator="exact")
    assert "\n" not in str(error.value)


def test_the_bound_clips_the_predicted_x0_as_the_samplers_do_unless_told_not_to():
    """x0_clip="clip" (the default, iDDPM's clip_denoised=True): the step's mean is the posterior mean at the predicted
    x_0 clamped to [-1, 1], so a wild x_0 costs what x_0 = +-1 costs; "none" uses the raw prediction."""
    process = DDPMProcess(linear_betas(50))
    g = torch.Generator().manual_seed(4)
    x0 = torch.round((torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1) * 127.5) / 127.5
    x_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 30])
    wild = lambda x, t: (torch.full_like(x, 7.0), torch.zeros_like(x))  # noqa: E731
    edge = lambda x, t: (torch.ones_like(x), torch.zeros_like(x))  # noqa: E731
    torch.testing.assert_close(vlb_term(process, wild, x0, x_t, index), vlb_term(process, edge, x0, x_t, index, x0_clip="none"),
                               rtol=1e-12, atol=0)
    kl = torch.tensor([10, 30])  # KL terms: the wild mean is further from the posterior's than the clamped one
    assert (vlb_term(process, wild, x0, x_t, kl, x0_clip="none") > vlb_term(process, wild, x0, x_t, kl)).all()
