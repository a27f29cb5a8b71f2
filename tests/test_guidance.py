"""Classifier-free guidance: label dropout rate and the guided eps (Ho & Salimans 2022)."""

import math

import pytest
import torch

from ddpm.core.denoiser import Denoiser
from ddpm.core.processes.ddpm import DDPMProcess
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


# --- guidance methods (issue 19) ------------------------------------------------------------------------------------
from ddpm.core.guidance import APG, GUIDANCE_METHODS, Guidance, guidance_usable  # noqa: E402


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=g), torch.randint(0, 1000, (6,), generator=g),
            torch.randint(0, 10, (6,), generator=g))


def _apg_by_hand(x0_c, x0_u, w, r, eta, previous=None, beta=0.0):
    """Sadat et al. 2024, Algorithm 1, one sample at a time with plain dot products (not the code under test)."""
    out, averages = [], []
    for i in range(len(x0_c)):
        c, delta = x0_c[i].flatten(), (x0_c[i] - x0_u[i]).flatten()
        if previous is not None:
            delta = delta + beta * previous[i].flatten()
        averages.append(delta.view_as(x0_c[i]))
        norm = math.sqrt(float(delta @ delta))
        if r > 0 and norm > r:
            delta = delta * (r / norm)
        parallel = float(delta @ c) / float(c @ c) * c
        out.append((c + w * ((delta - parallel) + eta * parallel)).view_as(x0_c[i]))
    return torch.stack(out), torch.stack(averages)


@pytest.mark.parametrize("r, eta", [(0.0, 0.0), (0.0, 0.5), (1.0, 0.0), (1e6, 1.0)])
def test_apg_splits_the_update_into_parts_parallel_and_orthogonal_to_the_conditional_prediction(denoiser, r, eta):
    w = 3.0
    x, t, y = _inputs()
    with torch.no_grad():
        (x0_c, _), (x0_u, _) = denoiser(x, t, y), denoiser(x, t, torch.full_like(y, denoiser.net.null_label))
        x0, eps = guided(denoiser, y, w, method="apg", apg=APG(momentum=0.0, norm_threshold=r, eta=eta))(x, t)
    expected, _ = _apg_by_hand(x0_c, x0_u, w, r, eta)
    torch.testing.assert_close(x0, expected, rtol=1e-10, atol=1e-12)
    alpha, sigma = denoiser.alpha_sigma(t, x)
    torch.testing.assert_close(eps, (x - alpha * x0) / sigma, rtol=1e-8, atol=1e-10)  # eps consistent with x0
    if r == 1.0:  # the cap binds: the update's norm is at most r per sample
        assert ((x0 - x0_c) / w).flatten(1).norm(dim=1).max() <= 1.0 + 1e-9
    if r == 1e6 and eta == 1.0:  # no cap, the whole parallel part: plain CFG
        torch.testing.assert_close(x0, (1 + w) * x0_c - w * x0_u, rtol=1e-10, atol=1e-12)


def test_apgs_update_with_eta_zero_is_orthogonal_to_the_conditional_prediction(denoiser):
    x, t, y = _inputs()
    with torch.no_grad():
        x0_c, _ = denoiser(x, t, y)
        x0, _ = guided(denoiser, y, 2.0, method="apg", apg=APG(momentum=0.0, norm_threshold=0.0, eta=0.0))(x, t)
    update, c = (x0 - x0_c).flatten(1), x0_c.flatten(1)
    cosine = (update * c).sum(1) / (update.norm(dim=1) * c.norm(dim=1))
    assert cosine.abs().max() < 1e-12 and update.abs().max() > 1e-5  # orthogonal, and not zero


def test_apgs_momentum_adds_beta_times_the_running_average_of_earlier_steps(denoiser):
    beta, w, r = -0.75, 2.0, 0.5
    x, t, y = _inputs()
    model_fn = guided(denoiser, y, w, method="apg", apg=APG(momentum=beta, norm_threshold=r, eta=0.0))
    null = torch.full_like(y, denoiser.net.null_label)
    previous = None
    with torch.no_grad():
        for step in range(3):  # three calls of one sampling run, at three noise levels
            ts = (t - 100 * step).clamp(min=0)
            (x0_c, _), (x0_u, _) = denoiser(x, ts, y), denoiser(x, ts, null)
            expected, previous = _apg_by_hand(x0_c, x0_u, w, r, 0.0, previous, beta)
            torch.testing.assert_close(model_fn(x, ts)[0], expected, rtol=1e-10, atol=1e-12)
        fresh = guided(denoiser, y, w, method="apg", apg=APG(momentum=beta, norm_threshold=r, eta=0.0))
        first, _ = _apg_by_hand(*[denoiser(x, t, labels)[0] for labels in (y, null)], w, r, 0.0)
        torch.testing.assert_close(fresh(x, t)[0], first, rtol=1e-10, atol=1e-12)  # a new model_fn starts a new average


def test_autoguidance_is_one_plus_w_main_minus_w_guide(net, denoiser):
    """Karras et al. 2024, eq. 2 in this project's w: D = (1 + w) D_main(x; y) - w D_guide(x; y), both conditional."""
    torch.manual_seed(5)
    weaker = UNet(8, 1, 16, (1, 2), 1, (), 0.0, norm_groups=4, num_classes=10).double().eval()
    for p in weaker.parameters():
        torch.nn.init.normal_(p, std=0.05)
    guide = denoiser.with_net(weaker)
    x, t, y = _inputs()
    with torch.no_grad():
        for w in (0.5, 2.0):
            x0, eps = guided(denoiser, y, w, method="autoguidance", guide=guide)(x, t)
            (x0_m, eps_m), (x0_g, eps_g) = denoiser(x, t, y), guide(x, t, y)
            torch.testing.assert_close(x0, (1 + w) * x0_m - w * x0_g, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(eps, (1 + w) * eps_m - w * eps_g, rtol=1e-10, atol=1e-12)
        # the guide = the model itself: the conditional prediction, for every w
        for w in (0.5, 2.0, 7.0):
            x0, eps = guided(denoiser, y, w, method="autoguidance", guide=denoiser)(x, t)
            x0_c, eps_c = denoiser(x, t, y)
            torch.testing.assert_close(x0, x0_c, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(eps, eps_c, rtol=1e-10, atol=1e-10)


def test_w_zero_is_the_conditional_prediction_for_every_method(denoiser):
    """Premise changed by issue 29 (item 5): CFG++'s scale is its lambda, continuous at 0, so its 0 is the unconditional
    model (the next test); for every other method w = 0 is the conditional one, as before."""
    x, t, y = _inputs()
    with torch.no_grad():
        x0_c, eps_c = denoiser(x, t, y)
        for method in (m for m in GUIDANCE_METHODS if m != "cfgpp"):
            x0, eps = Guidance(0.0, method=method, guide=denoiser if method == "autoguidance" else None).model_fn(denoiser, y)(x, t)
            assert torch.equal(x0, x0_c) and torch.equal(eps, eps_c), method


def test_cfgpp_is_continuous_in_its_lambda_and_zero_is_the_unconditional_model(denoiser):
    """CFG++ (Chung et al. 2024) is DDIM from x0_u + lambda (x0_c - x0_u) renoised with eps_u: at lambda = 0 the
    unconditional model, and lambda = 1e-12 is within 1e-10 of it (once, w = 0 jumped to the conditional model)."""
    x, t, y = _inputs()
    with torch.no_grad():
        x0_u, eps_u = denoiser(x, t, torch.full_like(y, denoiser.net.null_label))
        at_zero = Guidance(0.0, method="cfgpp").model_fn(denoiser, y)(x, t)
        near_zero = Guidance(1e-12, method="cfgpp").model_fn(denoiser, y)(x, t)
    for got in (at_zero, near_zero):
        torch.testing.assert_close(got[0], x0_u, rtol=0, atol=1e-10)
        torch.testing.assert_close(got[1], eps_u, rtol=0, atol=1e-10)
    assert not guidance_usable(0.0, 0.0, True, "cfgpp")  # so it needs label dropout at every lambda


def test_guidance_methods_refuse_what_cannot_work(denoiser):
    with pytest.raises(ValueError, match=r"guidance.method='cfgg': must be one of \['cfg', 'apg', 'cfgpp', 'autoguidance'\]"):
        check_guidance(0.1, 1.0, method="cfgg")
    with pytest.raises(ValueError, match=r"guidance.apg.momentum=1.0: must be in \(-1, 1\)"):
        check_guidance(0.1, 1.0, method="apg", apg=APG(momentum=1.0))
    with pytest.raises(ValueError, match=r"guidance.apg.eta=2"):
        check_guidance(0.1, 1.0, method="apg", apg=APG(eta=2))
    check_guidance(0.0, 2.0, method="autoguidance")  # no unconditional branch: no label dropout needed
    with pytest.raises(ValueError, match="needs a guide"):
        Guidance(1.0, method="autoguidance").check(0.1)
    small = Denoiser(UNet(16, 1, 16, (1, 2), 1, (), 0.0, norm_groups=4, num_classes=10).double(), denoiser.process)
    with pytest.raises(ValueError, match="guidance.guide: its image_size is 16, the model's 8"):
        guided(denoiser, torch.zeros(2, dtype=torch.long), 1.0, method="autoguidance", guide=small)
    other = Denoiser(denoiser.net, DDPMProcess(linear_betas(500)), denoiser.prediction)
    with pytest.raises(ValueError, match="its process"):
        guided(denoiser, torch.zeros(2, dtype=torch.long), 1.0, method="autoguidance", guide=other)


def test_cfgpp_is_ddim_from_the_lambda_x0_renoised_with_the_unconditional_eps(denoiser):
    """Chung et al. 2024, Algorithm 1: x_prev = sqrt(abar_prev) (x0_u + lambda (x0_c - x0_u)) + sqrt(1 - abar_prev) eps_u,
    written out here for one DDIM step (no clipping) against what sample_ddim does with the cfgpp model_fn."""
    from ddpm.core.samplers.ddim import sample_ddim

    lam = 0.6
    x, _, y = _inputs()
    null = torch.full_like(y, denoiser.net.null_label)
    model_fn = guided(denoiser, y, lam, method="cfgpp")
    assert model_fn.renoise_with_eps
    t = torch.full((6,), 999)
    with torch.no_grad():
        (x0_c, _), (x0_u, eps_u) = denoiser(x, t, y), denoiser(x, t, null)
        x0, eps = model_fn(x, t)
        torch.testing.assert_close(x0, x0_u + lam * (x0_c - x0_u), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(eps, eps_u, rtol=1e-13, atol=1e-15)  # a batch of 12 vs 6: float64 rounding on some CPUs
        # two DDIM steps over t = 999 -> 0 -> data: the first step is the one CFG++ changes
        abar = denoiser.process.alphas_cumprod
        x_prev = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps_u
        (x0_c2, _), (x0_u2, _) = denoiser(x_prev, t * 0, y), denoiser(x_prev, t * 0, null)
        expected = x0_u2 + lam * (x0_c2 - x0_u2)  # the last step goes to alpha_bar = 1: x_0 itself
        out = sample_ddim(model_fn, denoiser.process, x, steps=2, x0_clip="none")
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
        plain = sample_ddim(guided(denoiser, y, lam), denoiser.process, x, steps=2, x0_clip="none")
        assert (plain - out).abs().max() > 1e-6  # cfg at the same scale is another sampler


def test_cfgpp_is_refused_where_it_is_not_defined(denoiser):
    from ddpm.core.guidance import check_sampler_for

    check_sampler_for("cfgpp", "ddim", 0.0)
    for sampler, eta in (("dpmpp_2m", 0.0), ("heun", 0.0), ("ddpm", 0.0), ("ddim", 1.0)):
        with pytest.raises(ValueError, match=r"guidance.method=cfgpp with sampler=.*: CFG\+\+ is defined for \['ddim'\]"):
            check_sampler_for("cfgpp", sampler, eta)
    with pytest.raises(ValueError, match=r"guidance.scale=2.0 with guidance.method=cfgpp: CFG\+\+'s lambda must be in \[0, 1\]"):
        check_guidance(0.1, 2.0, method="cfgpp")
