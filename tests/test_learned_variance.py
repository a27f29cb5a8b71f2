"""Learned reverse variances (issue 34, item 2; Nichol & Dhariwal 2021): the learned-range interpolation against the two
fixed variances at its ends, the hybrid loss (lambda = 0 is the plain step; the mean is held fixed inside L_vlb), the
ancestral sampler reading the learned variance, the bound with it, and the one-line refusals."""

import math

import pytest
import torch

from ddpm.core.denoiser import Denoiser
from ddpm.core.errors import ConfigError
from ddpm.core.likelihood import normal_kl, vlb_term
from ddpm.core.objectives.denoising import Denoising
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.samplers.ddpm import DDPMSampler
from ddpm.core.schedules import cosine_betas, linear_betas
from ddpm.core.unet import UNet
from ddpm.core.variance import fixed_log_variance, learned_range_log_variance


def test_the_learned_range_at_its_ends_is_the_two_fixed_variances():
    """v = -1 gives beta-tilde_t (fixed_small) at every t; v = +1 gives beta_t (fixed_large) at every t >= 2 and log
    beta_1 at t = 1, as iDDPM's code; v = 0 is the geometric mean. Float64, against the schedule's own formulas."""
    process = DDPMProcess(cosine_betas(1000))
    index = torch.arange(1000)
    ones = torch.ones(1000, 1, 2, 2, dtype=torch.float64)
    low = learned_range_log_variance(process, -ones, index).exp()[:, 0, 0, 0]
    high = learned_range_log_variance(process, ones, index).exp()[:, 0, 0, 0]
    middle = learned_range_log_variance(process, 0 * ones, index).exp()[:, 0, 0, 0]
    alphas_cumprod = torch.cumprod(1 - process.betas, 0)
    tilde = process.betas[1:] * (1 - alphas_cumprod[:-1]) / (1 - alphas_cumprod[1:])  # Ho et al. eq. 7, t >= 2
    torch.testing.assert_close(low[1:], tilde, rtol=1e-12, atol=0)
    torch.testing.assert_close(low, fixed_log_variance(process, "fixed_small").exp(), rtol=1e-12, atol=0)
    torch.testing.assert_close(high[1:], fixed_log_variance(process, "fixed_large").exp()[1:], rtol=1e-12, atol=0)
    assert high[0].item() == pytest.approx(process.betas[0].item(), rel=1e-12) and low[0].item() == pytest.approx(tilde[0].item())
    torch.testing.assert_close(middle, (low * high).sqrt(), rtol=1e-12, atol=0)


def tiny_unet(out_channels=None, seed=0):
    torch.manual_seed(seed)
    return UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(), dropout=0.0, norm_groups=4, num_classes=10, out_channels=out_channels)


def pair_of_networks():
    """A fixed-variance U-Net and a learned-variance one with the same weights (the same seed draws the same layers;
    only the zero-initialised last layer differs in shape), the last layer given random weights so that gradients
    flow everywhere: the same for the mean channels, random for the variance channels (v)."""
    fixed, learned = tiny_unet(), tiny_unet(out_channels=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = torch.randn(fixed.out[-1].weight.shape, generator=g) * 0.1
        fixed.out[-1].weight.copy_(w)
        learned.out[-1].weight.copy_(torch.cat([w, torch.randn(w.shape, generator=g) * 0.1]))
        learned.out[-1].bias[1:] = 0.2
    return fixed, learned


def test_a_hybrid_step_with_lambda_zero_is_the_plain_step_and_the_vlb_never_moves_the_mean():
    """lambda = 0: the learned model's loss and every shared gradient equal the fixed model's (today's step). lambda > 0:
    the L_vlb term reaches the variance channels only; the mean channels' last-layer gradient is unchanged (the
    stop-gradient of iDDPM sec. 3.1)."""
    process = DDPMProcess(linear_betas(100))
    fixed_net, learned_net = pair_of_networks()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    labels, t = torch.randint(0, 10, (6,), generator=g), torch.tensor([0, 1, 5, 40, 80, 99])
    eps = torch.randn(6, 1, 8, 8, generator=g)

    def step(net, variance, vlb_weight):
        net.zero_grad()
        loss = Denoising().loss(Denoiser(net, process, "eps", variance=variance, vlb_weight=vlb_weight), x0, labels, t, eps)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}

    plain_loss, plain = step(fixed_net, "fixed_small", 0.001)
    zero_loss, zero = step(learned_net, "learned_range", 0.0)
    assert zero_loss.item() == plain_loss.item()
    for name, grad in plain.items():
        theirs = zero[name][: grad.shape[0]] if name.startswith("out.2") else zero[name]
        torch.testing.assert_close(theirs, grad, rtol=1e-6, atol=1e-9, msg=name)
    assert zero["out.2.weight"][1:].abs().max() == 0  # lambda = 0: the variance channels learn nothing
    hybrid_loss, hybrid = step(learned_net, "learned_range", 1.0)
    assert hybrid_loss > zero_loss and hybrid["out.2.weight"][1:].abs().max() > 0
    torch.testing.assert_close(hybrid["out.2.weight"][:1], zero["out.2.weight"][:1], rtol=1e-6, atol=1e-9)


def test_the_hybrid_loss_is_l_simple_plus_lambda_t_times_the_kl_in_bits():
    """The hybrid loss minus L_simple, divided by lambda T, is the KL of the posterior from the model's step written
    out per element (mean at the detached prediction, log-variance from v), averaged in bits per dimension."""
    process = DDPMProcess(linear_betas(100))
    _, net = pair_of_networks()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    net = net.double()
    labels, t = torch.randint(0, 10, (4,), generator=g), torch.tensor([3, 10, 50, 99])
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    denoiser = Denoiser(net, process, "eps", variance="learned_range", vlb_weight=0.5)
    with torch.no_grad():
        loss = Denoising().loss(denoiser, x0, labels, t, eps)
        a = process.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = process.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a * x0 + s * eps
        raw = net(x_t, t, labels)
        eps_hat, v = raw[:, :1], raw[:, 1:]
        simple = ((eps_hat - eps) ** 2).mean()
        x0_hat = (x_t - s * eps_hat) / a
        c1 = (process.betas * process.alphas_cumprod_prev.sqrt() / (1 - process.alphas_cumprod))[t].view(-1, 1, 1, 1)
        c2 = ((1 - process.alphas_cumprod_prev) * process.alphas.sqrt() / (1 - process.alphas_cumprod))[t].view(-1, 1, 1, 1)
        tilde = (process.betas * (1 - process.alphas_cumprod_prev) / (1 - process.alphas_cumprod))[t].view(-1, 1, 1, 1)
        frac = (v + 1) / 2
        log_var = frac * process.betas[t].log().view(-1, 1, 1, 1) + (1 - frac) * tilde.log()
        mean_true, mean_model = c1 * x0 + c2 * x_t, c1 * x0_hat + c2 * x_t
        kl = 0.5 * (log_var - tilde.log() + tilde / log_var.exp() + (mean_true - mean_model) ** 2 / log_var.exp() - 1)
        bits = kl.flatten(1).mean(1) / math.log(2)
    # L_simple is taken in float32 whatever the network's dtype (``mean_per_sample``): agreement to float32's rounding
    assert loss.item() == pytest.approx((simple + 0.5 * 100 * bits.mean()).item(), rel=1e-7)
    assert (loss - simple).item() == pytest.approx(0.5 * 100 * bits.mean().item(), rel=1e-6)


class ConstantVariance:
    """A model_fn that learned its variance, predicting x_0 = 0.5 x_t and a constant v."""

    learned_variance = True

    def __init__(self, v):
        self.v = v

    def __call__(self, x, t, with_variance=False):
        x0 = 0.5 * x
        eps = torch.zeros_like(x)
        return (x0, eps, torch.full_like(x, self.v)) if with_variance else (x0, eps)


@pytest.mark.parametrize("v, fixed", [(-1.0, "posterior"), (1.0, "beta")])
def test_ancestral_sampling_reads_the_learned_variance_on_a_respaced_process(v, fixed):
    """v = -1 samples as the posterior variance, v = +1 as beta (sampler.variance ignored for a learned model), on a
    respaced walk (20 of 1,000 steps); a fixed model's plain model_fn samples with sampler.variance."""
    process = DDPMProcess(linear_betas(1000))
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def plain(x, t):
        return 0.5 * x, torch.zeros_like(x)

    other = "beta" if fixed == "posterior" else "posterior"
    learned = DDPMSampler(steps=20, variance=other)(ConstantVariance(v), process, noise,
                                                    generator=torch.Generator().manual_seed(1))
    expected = DDPMSampler(steps=20, variance=fixed)(plain, process, noise, generator=torch.Generator().manual_seed(1))
    unexpected = DDPMSampler(steps=20, variance=other)(plain, process, noise, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(learned, expected, rtol=1e-5, atol=1e-6)
    assert (learned - unexpected).abs().max() > 1e-3


def test_the_bound_with_a_learned_variance_at_its_ends_is_the_fixed_bound():
    """A step of the bound with v = -1 is fixed_small's, with v = +1 fixed_large's (t >= 2), and a KL written out."""
    process = DDPMProcess(linear_betas(50))
    g = torch.Generator().manual_seed(3)
    x0 = torch.round((torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1) * 127.5) / 127.5
    x_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([7, 30])

    def denoise(v):
        return lambda x, t: (0.3 * x, torch.zeros_like(x), torch.full_like(x, v))

    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        learned = vlb_term(process, denoise(v), x0, x_t, index, "learned_range")
        torch.testing.assert_close(learned, vlb_term(process, denoise(v), x0, x_t, index, fixed), rtol=1e-12, atol=1e-12)
    true_mean, true_var = process.q_posterior(x0, x_t, index)
    model_mean, _ = process.q_posterior(0.3 * x_t, x_t, index)
    log_var = 0.5 * (process.posterior_variance[index].log() + process.betas[index].log()).view(-1, 1, 1, 1)
    expected = normal_kl(true_mean, true_var.log(), model_mean, log_var.expand_as(x_t)).flatten(1).sum(1)
    torch.testing.assert_close(vlb_term(process, denoise(0.0), x0, x_t, index, "learned_range"), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("overrides, message", [
    (["diffusion.variance=learned_range", "process=flow", "~schedule"], "diffusion.variance=learned_range with process=flow"),
    (["diffusion.variance=learned_range", "process=flow", "~schedule", "objective=meanflow", "sampler=meanflow"],
     "diffusion.variance=learned_range with"),
    (["diffusion.variance=learned"], "diffusion.variance='learned': must be one of"),
    (["diffusion.vlb_weight=-1"], "diffusion.vlb_weight=-1"),
    (["model=dit_tiny", "model.learn_sigma=true"], "set diffusion.variance=learned_range"),
])
def test_bad_variance_settings_are_one_line_before_compute(overrides, message):
    from ddpm.config import compose
    from ddpm.validation import validate

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as error:
        validate(compose(overrides), "train")
    assert "\n" not in str(error.value)


def test_a_dit_with_learn_sigma_trains_its_learned_variance(tmp_path):
    """DiT's learn_sigma output is what a learned variance reads: model.learn_sigma=true with learned_range builds."""
    from ddpm.builders import build_denoiser
    from ddpm.config import compose
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose(["model=dit_tiny", "model.learn_sigma=true", "diffusion.variance=learned_range"],
                                            output_dir=tmp_path),
                                    resolve=True)
    denoiser = build_denoiser(config, device="meta")
    assert denoiser.learns_variance and denoiser.net.out_channels == 2 * denoiser.net.in_channels
