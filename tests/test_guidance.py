"""Classifier-free guidance: label dropout rate and the guided eps (Ho & Salimans 2022)."""

import math

import pytest
import torch

from ddpm.core.denoiser import Denoiser
from ddpm.core.diffusion import DDPMProcess
from ddpm.core.guidance import check_guidance, drop_labels, guided
from ddpm.core.schedules import linear_betas
from ddpm.core.unet import UNet


@pytest.mark.parametrize("p_uncond", [0.1, 0.2, 0.5])
def test_label_dropout_happens_at_the_configured_rate(p_uncond):
    torch.manual_seed(0)
    n, null = 200_000, 10
    labels = torch.randint(0, 10, (n,))
    dropped = drop_labels(labels, p_uncond, null)
    is_null = dropped == null
    # Binomial(n, p): the observed rate lies within 5 standard errors of p.
    assert abs(is_null.float().mean().item() - p_uncond) < 5 * math.sqrt(p_uncond * (1 - p_uncond) / n)
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others are untouched


def test_no_dropout_at_p_zero():
    labels = torch.randint(0, 10, (1000,))
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


@pytest.fixture
def net():
    torch.manual_seed(0)
    net = UNet(8, 1, 16, (1, 2), 1, (), 0.0, norm_groups=4, num_classes=10).double().eval()
    for p in net.parameters():  # zero-initialised output layers would make every prediction 0
        torch.nn.init.normal_(p, std=0.05)
    return net


@pytest.fixture(params=["eps", "x0", "v"])
def denoiser(net, request):
    return Denoiser(net, DDPMProcess(linear_betas(1000)), request.param)


def test_guidance_scale_zero_is_exactly_the_conditional_prediction(denoiser):
    x, t, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (6,)), torch.randint(0, 10, (6,))
    with torch.no_grad():
        x0, eps = guided(denoiser, y, 0.0, rescale=0.7, interval=(0.28, 5.42))(x, t)
        x0_c, eps_c = denoiser(x, t, y)
        assert torch.equal(x0, x0_c) and torch.equal(eps, eps_c)


@pytest.mark.parametrize("w", [0.5, 1.0, 4.0])
def test_guided_eps_is_one_plus_w_cond_minus_w_uncond(denoiser, w):
    """Ho & Salimans eq. 6, for eps and (the same affine rule) for x_0, whatever the network predicts."""
    x, t, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (6,)), torch.randint(0, 10, (6,))
    with torch.no_grad():
        (x0_c, eps_c), (x0_u, eps_u) = denoiser(x, t, y), denoiser(x, t, torch.full_like(y, denoiser.net.null_label))
        x0, eps = guided(denoiser, y, w)(x, t)
        torch.testing.assert_close(eps, (1 + w) * eps_c - w * eps_u, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x0, (1 + w) * x0_c - w * x0_u, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(eps_c, eps_u)  # otherwise the check above proves nothing


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_rescaled_guidance_is_lin_et_al_eq_15_16(denoiser, phi):
    """x_cfg = x_u + (1 + w)(x_c - x_u); x_rescaled = x_cfg std(x_c)/std(x_cfg) per sample; x = phi x_rescaled +
    (1 - phi) x_cfg; written out here with numpy-style sums, not with the function under test."""
    w = 2.0
    x, t, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (6,)), torch.randint(0, 10, (6,))
    with torch.no_grad():
        (x0_c, _), (x0_u, _) = denoiser(x, t, y), denoiser(x, t, torch.full_like(y, denoiser.net.null_label))
        x0, eps = guided(denoiser, y, w, rescale=phi)(x, t)
    cfg = x0_u + (1 + w) * (x0_c - x0_u)
    n = cfg[0].numel()
    std = lambda a: ((a - a.mean(dim=(1, 2, 3), keepdim=True)) ** 2).sum(dim=(1, 2, 3), keepdim=True).div(n - 1).sqrt()  # noqa: E731
    expected = phi * cfg * std(x0_c) / std(cfg) + (1 - phi) * cfg
    torch.testing.assert_close(x0, expected, rtol=1e-10, atol=1e-12)
    alpha, sigma = denoiser.alpha_sigma(t, x)
    torch.testing.assert_close(eps, (x - alpha * expected) / sigma, rtol=1e-8, atol=1e-10)  # consistent with x0
    if phi == 1.0:
        torch.testing.assert_close(std(x0), std(x0_c), rtol=1e-10, atol=1e-12)


def test_guidance_interval_guides_only_inside_it(denoiser):
    """Kynkaanniemi et al. 2024: the guided prediction for sigma = sigma_t/alpha_t in (lo, hi], the conditional outside."""
    w, interval = 2.0, (0.5, 3.0)
    abar = denoiser.process.alphas_cumprod
    sigma = ((1 - abar) / abar).sqrt()
    t = torch.tensor([0, int((sigma <= 0.5).sum()), int((sigma <= 3.0).sum()) - 1, int((sigma <= 3.0).sum()), 999])
    inside = torch.tensor([False, True, True, False, False])
    assert ((sigma[t] > 0.5) & (sigma[t] <= 3.0)).tolist() == inside.tolist()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    with torch.no_grad():
        x0, eps = guided(denoiser, y, w, interval=interval)(x, t)
        plain_x0, plain_eps = guided(denoiser, y, w)(x, t)
        cond_x0, cond_eps = denoiser(x, t, y)
        for i, guided_here in enumerate(inside):
            want_x0, want_eps = (plain_x0, plain_eps) if guided_here else (cond_x0, cond_eps)
            torch.testing.assert_close(x0[i], want_x0[i], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(eps[i], want_eps[i], rtol=1e-10, atol=1e-12)
        outside = torch.tensor([999, 999])
        assert torch.equal(guided(denoiser, y[:2], w, interval=interval)(x[:2], outside)[0], denoiser(x[:2], outside, y[:2])[0])


def test_guidance_needs_a_model_trained_with_label_dropout():
    check_guidance(0.1, 2.0)
    check_guidance(0.0, 0.0)
    with pytest.raises(ValueError, match=r"guidance.scale=2.0 needs a model trained with guidance.p_uncond > 0"):
        check_guidance(0.0, 2.0)
    with pytest.raises(ValueError, match=r"guidance.scale=-1"):
        check_guidance(0.1, -1)
    with pytest.raises(ValueError, match=r"guidance.rescale=1.5"):
        check_guidance(0.1, 1.0, rescale=1.5)
    with pytest.raises(ValueError, match=r"guidance.interval"):
        check_guidance(0.1, 1.0, interval=(3.0, 1.0))
