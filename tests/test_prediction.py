"""Prediction targets and loss weightings against their closed forms (Salimans & Ho 2022; Hang et al. 2023), in
float64, and the one-point perfect-oracle test for every target through every sampler."""


import pytest
import torch

from ddpm.core.objectives.denoising import Denoising
from ddpm.core.denoiser import Denoiser
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.errors import ConfigError
from ddpm.core.prediction import PREDICTIONS, loss_weight, network_target, to_x0_eps
from ddpm.core.samplers.ddim import sample_ddim
from ddpm.core.samplers.ddpm import sample_ddpm
from ddpm.core.samplers.dpmpp_2m import sample_dpmpp_2m
from ddpm.core.samplers.heun import sample_heun
from ddpm.core.schedules import cosine_betas, linear_betas, rescale_zero_terminal_snr

from test_samplers import Oracle, one_point_oracle


def draw(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(5, 1, 3, 3, dtype=torch.float64, generator=g), torch.randn(5, 1, 3, 3, dtype=torch.float64, generator=g)
    abar = torch.tensor([0.9999, 0.9, 0.5, 0.01, 4e-5], dtype=torch.float64).view(-1, 1, 1, 1)
    return x0, eps, abar.sqrt(), (1 - abar).sqrt()


def test_targets_are_their_closed_forms():
    x0, eps, alpha, sigma = draw()
    assert torch.equal(network_target("eps", x0, eps, alpha, sigma), eps)
    assert torch.equal(network_target("x0", x0, eps, alpha, sigma), x0)
    torch.testing.assert_close(network_target("v", x0, eps, alpha, sigma), alpha * eps - sigma * x0, rtol=0, atol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_each_target_converts_back_to_x0_and_eps(prediction):
    """x_t = alpha x_0 + sigma eps; from the exact target, every parameterisation recovers both (Salimans & Ho, eq. 9-11:
    x_0 = alpha x_t - sigma v, eps = sigma x_t + alpha v)."""
    x0, eps, alpha, sigma = draw()
    x_t = alpha * x0 + sigma * eps
    got_x0, got_eps = to_x0_eps(prediction, network_target(prediction, x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9 / alpha.min().item())
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)


def test_v_rotation_by_hand():
    """One scalar worked out: alpha = 0.6, sigma = 0.8, x_0 = 1, eps = -2: x_t = -1, v = 0.6*-2 - 0.8*1 = -2."""
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    v = network_target("v", torch.tensor(1.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64), a, s)
    assert v.item() == pytest.approx(-2.0, abs=1e-15)
    x0, eps = to_x0_eps("v", v, torch.tensor(-1.0, dtype=torch.float64), a, s)
    assert (x0.item(), eps.item()) == (pytest.approx(1.0, abs=1e-15), pytest.approx(-2.0, abs=1e-15))


def test_min_snr_weights_are_hang_et_al():
    """w_eps = min(SNR, g)/SNR, w_x0 = min(SNR, g), w_v = min(SNR, g)/(SNR + 1), g = 5: at SNR 0.5 and 20."""
    snr = torch.tensor([0.5, 20.0], dtype=torch.float64)
    alpha, sigma = (snr / (1 + snr)).sqrt(), (1 / (1 + snr)).sqrt()  # a VP process at those SNRs
    torch.testing.assert_close(loss_weight("min_snr", "eps", alpha, sigma, 5.0), torch.tensor([1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(loss_weight("min_snr", "x0", alpha, sigma, 5.0), torch.tensor([0.5, 5.0], dtype=torch.float64))
    torch.testing.assert_close(loss_weight("min_snr", "v", alpha, sigma, 5.0), torch.tensor([0.5 / 1.5, 5.0 / 21], dtype=torch.float64))
    assert torch.equal(loss_weight("uniform", "v", alpha, sigma), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_makes_every_target_the_same_x0_loss(prediction):
    """The reason for the three forms: weight * ||target error||^2 = min(SNR, g) ||x_0 error||^2 at a fixed x_t."""
    x0, eps, alpha, sigma = draw(1)
    x_t = alpha * x0 + sigma * eps
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    eps_hat = (x_t - alpha * x0_hat) / sigma
    error = (network_target(prediction, x0_hat, eps_hat, alpha, sigma) - network_target(prediction, x0, eps, alpha, sigma)).square()
    snr = (alpha / sigma) ** 2
    torch.testing.assert_close(loss_weight("min_snr", prediction, alpha, sigma) * error, snr.clamp(max=5) * (x0_hat - x0).square(),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("prediction", DDPMProcess.predictions)
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_loss_is_zero_at_a_perfect_prediction(prediction, weighting):
    diffusion = DDPMProcess(linear_betas(50))
    x0 = torch.randn(512, 1, 2, 2, dtype=torch.float64)

    def exact(x_t, t):  # knows x_0, so it recovers eps (and hence any target) exactly
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return x0, (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    denoiser = Denoiser(Oracle(exact, diffusion, prediction), diffusion, prediction, weighting)
    assert Denoising()(denoiser, x0).item() < 1e-12
    wrong = Denoiser(Oracle(lambda x_t, t: (torch.zeros_like(x_t), torch.zeros_like(x_t)), diffusion, prediction),
                     diffusion, prediction, weighting)
    assert Denoising()(wrong, x0).item() > 0.01


def test_min_snr_loss_is_the_weighted_mean_of_the_per_sample_errors():
    """The denoiser's loss with a weight: mean over the batch of w(SNR_t) * mean-square error, t as drawn."""
    diffusion = DDPMProcess(linear_betas(10))
    x0 = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    seen = {}

    def net(x_t, t, labels=None):
        seen["t"] = t
        return torch.zeros_like(x_t)

    torch.manual_seed(0)
    net.in_channels, net.image_size, net.num_classes, net.null_label, net.forward = 1, 2, None, None, net
    loss = Denoising()(Denoiser(net, diffusion, "x0", "min_snr"), x0)
    snr = diffusion.alphas_cumprod[seen["t"]] / (1 - diffusion.alphas_cumprod[seen["t"]])
    expected = (snr.clamp(max=5) * x0.float().square().flatten(1).mean(1).double()).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_zero_terminal_snr_with_eps_is_refused():
    diffusion = DDPMProcess(rescale_zero_terminal_snr(cosine_betas(100)))
    oracle = Oracle(lambda x, t: (x, x), diffusion, "eps")
    with pytest.raises(ConfigError, match="diffusion.prediction=eps with a zero-terminal-SNR schedule.*Use diffusion.prediction=v"):
        Denoiser(oracle, diffusion, "eps")
    Denoiser(oracle, diffusion, "v")
    with pytest.raises(ConfigError, match="diffusion.prediction='eps2'"):
        Denoiser(oracle, diffusion, "eps2")
    with pytest.raises(ConfigError, match="diffusion.loss_weight='snr'"):
        Denoiser(oracle, diffusion, "v", "snr")


def test_a_backbone_must_meet_the_contract():
    with pytest.raises(ConfigError, match=r"is not a backbone: it lacks \['image_size', 'num_classes', 'null_label'"):
        class Half(torch.nn.Module):
            in_channels = 1

            def forward(self, x, t, labels=None):
                return x
        Denoiser(Half(), DDPMProcess(linear_betas(10)))


SAMPLERS = {
    "ddpm": lambda m, d, n, **k: sample_ddpm(m, d, n, steps=50, x0_clip="none", **k),
    "ddim": lambda m, d, n, **k: sample_ddim(m, d, n, steps=20, x0_clip="none", **k),
    "dpmpp_2m": lambda m, d, n, **k: sample_dpmpp_2m(m, d, n, steps=20, x0_clip="none", **k),
    "heun": lambda m, d, n, **k: sample_heun(m, d, n, steps=19, x0_clip="none", **k),
}
SCHEDULES = {
    "linear": lambda: linear_betas(1000),
    "cosine": lambda: cosine_betas(1000),
    "cosine_zero_terminal_snr": lambda: rescale_zero_terminal_snr(cosine_betas(1000)),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", DDPMProcess.predictions)
def test_every_target_and_sampler_lands_on_the_one_point_dataset(prediction, sampler, schedule):
    diffusion = DDPMProcess(SCHEDULES[schedule]())
    if prediction == "eps" and schedule == "cosine_zero_terminal_snr":
        pytest.skip("refused: eps is undefined at zero terminal SNR (test_zero_terminal_snr_with_eps_is_refused)")
    point = torch.tensor([0.5, -0.25, 0.9, -1.0], dtype=torch.float64).view(1, 1, 2, 2)
    noise = torch.randn(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[sampler](one_point_oracle(diffusion, point, prediction), diffusion, noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-9)
