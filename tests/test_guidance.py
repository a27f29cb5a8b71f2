"""Classifier-free guidance: label dropout rate and the guided eps (Ho & Salimans 2022)."""

import math

import pytest
import torch

from ddpm.core.guidance import check_guidance, drop_labels, guided_model_fn
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


def test_guidance_scale_zero_is_exactly_the_conditional_prediction(net):
    x, t, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (6,)), torch.randint(0, 10, (6,))
    with torch.no_grad():
        assert torch.equal(guided_model_fn(net, y, 0.0)(x, t), net(x, t, y))


@pytest.mark.parametrize("w", [0.5, 1.0, 4.0])
def test_guided_eps_is_one_plus_w_cond_minus_w_uncond(net, w):
    x, t, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (6,)), torch.randint(0, 10, (6,))
    with torch.no_grad():
        eps_c, eps_u = net(x, t, y), net(x, t, torch.full_like(y, net.null_label))
        torch.testing.assert_close(guided_model_fn(net, y, w)(x, t), (1 + w) * eps_c - w * eps_u, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(eps_c, eps_u)  # otherwise the check above proves nothing


def test_guidance_needs_a_model_trained_with_label_dropout():
    check_guidance(0.1, 2.0)
    check_guidance(0.0, 0.0)
    with pytest.raises(ValueError, match=r"guidance.scale=2.0 needs a model trained with guidance.p_uncond > 0"):
        check_guidance(0.0, 2.0)
    with pytest.raises(ValueError, match=r"guidance.scale=-1"):
        check_guidance(0.1, -1)
