"""Schedules against their closed forms, in float64."""

import math

import pytest
import torch

from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.schedules import cosine_betas, linear_betas


def test_linear_betas_closed_form():
    T, b1, bT = 1000, 1e-4, 0.02
    betas = linear_betas(T, b1, bT)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    for t in (1, 2, 500, 999, 1000):  # the paper's t, 1-based
        assert betas[t - 1].item() == pytest.approx(b1 + (bT - b1) * (t - 1) / (T - 1), rel=1e-12)


def test_linear_alphas_cumprod_is_product_of_one_minus_beta():
    betas = linear_betas(1000)
    alphas_cumprod = DDPMProcess(betas).alphas_cumprod
    for t in (1, 10, 300, 1000):
        expected = math.prod(1.0 - (1e-4 + (0.02 - 1e-4) * (s - 1) / 999) for s in range(1, t + 1))
        assert alphas_cumprod[t - 1].item() == pytest.approx(expected, rel=1e-10)
    # Ho et al. chose these so that x_T is nearly pure noise: alpha_bar_T ~ 4e-5.
    assert alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_cosine_alphas_cumprod_follows_eq_17():
    T, s = 1000, 0.008
    alphas_cumprod = DDPMProcess(cosine_betas(T, s)).alphas_cumprod
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 100, 500, 900, 990):  # below the clipped tail
        assert alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)


def test_cosine_betas_clipped_at_max_beta():
    betas = cosine_betas(1000, 0.008, max_beta=0.999)
    assert betas.dtype == torch.float64
    assert betas.max().item() == 0.999  # the unclipped last beta is 1
    assert betas[-1].item() == 0.999
    assert (betas[:-1] < 0.999).all()
    assert (betas[1:] >= betas[:-1]).all()  # monotone


def test_timesteps_sets_length():
    assert len(linear_betas(50)) == 50 and len(cosine_betas(50)) == 50


def test_diffusion_rejects_betas_outside_unit_interval():
    with pytest.raises(ValueError, match="betas"):
        DDPMProcess(torch.tensor([1.0, 0.1]))  # beta = 1 only as beta_T (zero terminal SNR), never before it
    with pytest.raises(ValueError, match="betas"):
        DDPMProcess(torch.tensor([0.1, 1.5]))
    assert DDPMProcess(torch.tensor([0.1, 1.0])).alphas_cumprod[-1] == 0
