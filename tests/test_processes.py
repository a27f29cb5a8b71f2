"""The processes (ddpm/core/processes, ddpm/core/diffusion.py) against their closed forms, in float64: paths, log-SNR
and its inverse, preconditioning, targets, losses, training distributions (KS tests), and every allowed sampler on the
one-point and the Gaussian data set."""

import math

import pytest
import torch
from scipy import stats

from ddpm.core.objectives.denoising import Denoising
from ddpm.core.denoiser import Denoiser
from ddpm.core.processes.ddpm import DDPMProcess
from ddpm.core.errors import ConfigError
from ddpm.core.prediction import loss_weight, network_target, to_x0_eps
from ddpm.core.processes.edm import EDMProcess
from ddpm.core.processes.flow import FlowProcess
from ddpm.core.processes.trigflow import TrigFlowProcess
from ddpm.core.samplers import check_process
from ddpm.core.samplers.ddim import sample_ddim
from ddpm.core.samplers.ddpm import sample_ddpm
from ddpm.core.samplers.dpmpp_2m import sample_dpmpp_2m
from ddpm.core.samplers.heun import sample_heun
from ddpm.core.schedules import cosine_betas

F64 = dict(dtype=torch.float64)


def processes():
    return {"ddpm": DDPMProcess(cosine_betas(1000)), "flow": FlowProcess(), "edm": EDMProcess(sigma_data=0.5),
            "trigflow": TrigFlowProcess()}


CONTINUOUS_T = {"flow": torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.999], **F64),
                "trigflow": torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.999], **F64),
                "edm": torch.tensor([0.002, 0.05, 1.0, 7.0, 80.0], **F64)}


def closed_form(name, t):
    """(alpha, sigma) as the papers write them."""
    if name == "flow":
        return 1 - t, t  # Liu et al. 2023, Lipman et al. 2023 (sigma_min = 0)
    if name == "trigflow":
        return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)  # Lu & Song 2024
    return torch.ones_like(t), t  # Karras et al. 2022: x = x_0 + sigma eps


@pytest.mark.parametrize("name", ["flow", "trigflow", "edm"])
def test_paths_log_snr_and_its_inverse_are_the_closed_forms(name):
    process, t = processes()[name], CONTINUOUS_T[name]
    alpha, sigma = process.alpha_sigma(t)
    want_alpha, want_sigma = closed_form(name, t)
    torch.testing.assert_close(alpha, want_alpha, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(sigma, want_sigma, rtol=1e-15, atol=1e-15)
    lam = process.log_snr(t)
    torch.testing.assert_close(lam, torch.log(want_alpha**2 / want_sigma**2), rtol=1e-13, atol=1e-13)
    assert (lam[1:] < lam[:-1]).all()  # decreasing in t
    torch.testing.assert_close(process.t_of_log_snr(lam), t, rtol=1e-12, atol=1e-14)


def test_ddpm_process_interface_is_its_tables_exactly():
    """The discrete process through the interface: the same numbers the DDPM code read before (bit for bit)."""
    process = processes()["ddpm"]
    t = torch.tensor([0, 1, 500, 998, 999])
    alpha, sigma = process.alpha_sigma(t)
    assert torch.equal(alpha, process.sqrt_alphas_cumprod[t]) and torch.equal(sigma, process.sqrt_one_minus_alphas_cumprod[t])
    abar = process.alphas_cumprod[t]
    torch.testing.assert_close(process.log_snr(t), torch.log(abar / (1 - abar)), rtol=1e-14, atol=0)
    assert torch.equal(process.t_of_log_snr(process.log_snr(t)), t)  # the nearest index is the index itself
    assert torch.equal(process.c_noise(t), t)
    draws = process.sample_t(20000)
    assert draws.dtype == torch.long and set(draws.unique().tolist()) <= set(range(1000)) and len(draws.unique()) > 990


def test_edm_preconditioning_is_table_1():
    """c_in = 1/sqrt(sigma^2 + sd^2); c_noise = ln(sigma)/4 (times 1000); and the edm target is F with
    D = c_skip x + c_out F, c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2)."""
    sd = 0.5
    process, sigma = EDMProcess(sigma_data=sd), CONTINUOUS_T["edm"]
    x = torch.randn(5, 1, 2, 2, **F64)
    c_in = 1 / torch.sqrt(sigma**2 + sd**2)
    torch.testing.assert_close(process.scale_input(x, sigma), x * c_in.view(-1, 1, 1, 1), rtol=1e-15, atol=0)
    torch.testing.assert_close(process.c_noise(sigma), 1000 * torch.log(sigma) / 4, rtol=1e-15, atol=1e-12)
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / torch.sqrt(sigma**2 + sd**2)
    F = torch.randn_like(x)
    one, s = torch.ones_like(sigma).view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x0, eps = to_x0_eps("edm", F, x, one, s, sd)
    torch.testing.assert_close(x0, c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0 + s * eps, x, rtol=1e-12, atol=1e-12)
    # EDM's lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2 on the x0 error; on F it is lambda c_out^2 = 1
    torch.testing.assert_close(loss_weight("edm", "x0", one.flatten(), sigma, sigma_data=sd), (sigma**2 + sd**2) / (sigma * sd) ** 2)
    torch.testing.assert_close(loss_weight("edm", "edm", one.flatten(), sigma, sigma_data=sd), torch.ones_like(sigma))


def test_flow_velocity_is_the_time_derivative_of_the_path():
    """u = eps - x_0 = d/dt [(1 - t) x_0 + t eps]; TrigFlow's v = alpha eps - sigma x_0 = (2/pi) d x_t / dt."""
    x0, eps = torch.randn(5, 1, 2, 2, **F64), torch.randn(5, 1, 2, 2, **F64)
    t = CONTINUOUS_T["flow"].view(-1, 1, 1, 1)
    u = network_target("velocity", x0, eps, 1 - t, t)
    torch.testing.assert_close(u, eps - x0, rtol=0, atol=1e-15)
    h = 1e-6
    for name, target in (("flow", "velocity"), ("trigflow", "v")):
        path = lambda s: closed_form(name, s)[0] * x0 + closed_form(name, s)[1] * eps  # noqa: E731
        derivative = (path(t + h) - path(t - h)) / (2 * h)
        a, s = closed_form(name, t)
        scale = 1.0 if name == "flow" else math.pi / 2
        torch.testing.assert_close(scale * network_target(target, x0, eps, a, s), derivative, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", ["ddpm", "flow", "edm", "trigflow"])
def test_every_target_of_every_process_converts_back(name):
    process = processes()[name]
    t = torch.tensor([0, 10, 500, 900, 999]) if name == "ddpm" else CONTINUOUS_T[name]
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in process.alpha_sigma(t))
    x0, eps = torch.randn(5, 1, 2, 2, **F64), torch.randn(5, 1, 2, 2, **F64)
    x_t = alpha * x0 + sigma * eps
    for prediction in process.predictions:
        target = network_target(prediction, x0, eps, alpha, sigma, process.sigma_data)
        got_x0, got_eps = to_x0_eps(prediction, target, x_t, alpha, sigma, process.sigma_data)
        torch.testing.assert_close(got_x0, x0, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(got_eps, eps, rtol=1e-6, atol=1e-6 * (alpha / sigma).abs().max().item())


@pytest.mark.parametrize("name", ["ddpm", "flow", "edm", "trigflow"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "edm"])
def test_every_weighting_is_the_same_x0_loss_for_every_target(name, weighting):
    """weight * ||target error||^2 is one function of lambda times ||x_0 error||^2, whatever the target (fixed x_t)."""
    process = processes()[name]
    t = torch.tensor([0, 10, 500, 900, 999]) if name == "ddpm" else CONTINUOUS_T[name]
    alpha, sigma = process.alpha_sigma(t)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x0, eps = torch.randn(5, 1, 2, 2, **F64), torch.randn(5, 1, 2, 2, **F64)
    x_t = a * x0 + s * eps
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    eps_hat = (x_t - a * x0_hat) / s
    losses = []
    for prediction in process.predictions:
        error = (network_target(prediction, x0_hat, eps_hat, a, s, process.sigma_data)
                 - network_target(prediction, x0, eps, a, s, process.sigma_data)).square().flatten(1).sum(1)
        losses.append(loss_weight(weighting, prediction, alpha, sigma, 5.0, process.sigma_data) * error)
    if weighting != "uniform":
        snr = (alpha / sigma) ** 2
        on_x0 = snr.clamp(max=5.0) if weighting == "min_snr" else snr + 1 / process.sigma_data**2
        expected = on_x0 * (x0_hat - x0).square().flatten(1).sum(1)
        for got in losses:
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


class Oracle(torch.nn.Module):
    """A backbone that knows the data: it reads t back from c_noise and x_t from c_in x_t (closed forms of each
    process), and outputs the exact target of the one-point (or Gaussian) data set."""
    in_channels, image_size, num_classes, null_label = 1, 2, None, None

    def __init__(self, process, prediction, posterior_mean):
        super().__init__()
        self.process, self.prediction, self.posterior_mean = process, prediction, posterior_mean

    def t_of_c_noise(self, c):
        if isinstance(self.process, DDPMProcess):
            return c
        if isinstance(self.process, EDMProcess):
            return torch.exp(4 * c.double() / 1000)
        return c.double() / 1000

    def forward(self, x_in, c_noise, labels=None):
        t = self.t_of_c_noise(c_noise)
        alpha, sigma = (v.view(-1, 1, 1, 1).to(x_in) for v in self.process.alpha_sigma(t))
        x_t = x_in * torch.sqrt(sigma**2 + self.process.sigma_data**2) if isinstance(self.process, EDMProcess) else x_in
        x0 = self.posterior_mean(x_t, alpha, sigma)
        eps = (x_t - alpha * x0) / sigma
        return network_target(self.prediction, x0, eps, alpha, sigma, self.process.sigma_data)


SAMPLERS = {
    "ddim": lambda m, p, n, **k: sample_ddim(m, p, n, steps=30, x0_clip="none", **k),
    "ddim_eta1": lambda m, p, n, **k: sample_ddim(m, p, n, steps=30, eta=1.0, x0_clip="none", **k),
    "dpmpp_2m": lambda m, p, n, **k: sample_dpmpp_2m(m, p, n, steps=20, x0_clip="none", **k),
    "heun": lambda m, p, n, **k: sample_heun(m, p, n, steps=19, x0_clip="none", **k),
    "heun_churn": lambda m, p, n, **k: sample_heun(m, p, n, steps=19, S_churn=40, S_tmin=0.05, S_tmax=50, x0_clip="none", **k),
    "ddpm": lambda m, p, n, **k: sample_ddpm(m, p, n, steps=50, x0_clip="none", **k),
}
PARTIALS = {"ddpm": sample_ddpm, "heun_churn": __import__("functools").partial(sample_heun, S_churn=40)}


@pytest.mark.parametrize("name", ["ddpm", "flow", "edm", "trigflow"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_allowed_process_and_sampler_lands_on_the_one_point_dataset(name, sampler):
    """With the exact score of a one-point data set every sampler lands on the point, from any noise (to 1e-9); the
    pairs that have no meaning are refused in one line instead."""
    process = processes()[name]
    if sampler in PARTIALS:
        try:
            check_process(PARTIALS[sampler], process)
        except ConfigError as error:
            assert name in str(error) and "\n" not in str(error)
            assert (sampler == "ddpm") != process.discrete
            return
        assert (sampler == "ddpm") == process.discrete
    point = torch.tensor([0.5, -0.25, 0.9, -1.0], **F64).view(1, 1, 2, 2)
    noise = torch.randn(8, 1, 2, 2, **F64, generator=torch.Generator().manual_seed(0))
    for prediction in process.predictions:
        denoiser = Denoiser(Oracle(process, prediction, lambda x_t, a, s: point.expand_as(x_t)), process, prediction)
        out = SAMPLERS[sampler](lambda x, t: denoiser(x, t), process, noise, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-9)


def gaussian_posterior_mean(mu, s):
    """E[x_0 | x_t] for x_0 ~ N(mu, s^2) (per pixel) on x_t = alpha x_0 + sigma eps."""
    return lambda x_t, alpha, sigma: mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x_t - alpha * mu)


def test_euler_on_flow_reaches_the_exact_answer_for_a_gaussian_data_set():
    """For x_0 ~ N(mu, s^2) the flow ODE is linear and maps the noise z to mu + s z exactly; Euler (= DDIM) with the
    exact velocity converges to it at first order: the error falls 10x per 10x steps, to below 5e-4 at 10,000 steps."""
    mu, s = torch.tensor([0.3, -0.5, 0.1, 0.8], **F64).view(1, 1, 2, 2), 0.4
    process = FlowProcess()
    denoiser = Denoiser(Oracle(process, "velocity", gaussian_posterior_mean(mu, s)), process, "velocity")
    z = torch.randn(64, 1, 2, 2, **F64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (100, 1000, 10000):
        out = sample_ddim(lambda x, t: denoiser(x, t), process, z, steps=steps, x0_clip="none")
        errors[steps] = (out - (mu + s * z)).abs().max().item()
    assert errors[10000] < 5e-4 and all(8 < errors[n] / errors[10 * n] < 12 for n in (100, 1000)), errors


@pytest.mark.parametrize("name", ["flow", "edm", "trigflow"])
def test_heun_and_dpmpp_on_a_gaussian_data_set_give_its_distribution(name):
    """The deterministic samplers map N(0, I) onto N(mu, s^2) for every continuous process at 39 evaluations: the std
    within 2% for DPM-Solver++(2M), 8% for Heun's 20 levels (as on the discrete process, within 1% of its error there)."""
    mu, s = torch.tensor([0.3, -0.5, 0.1, 0.8], **F64).view(1, 1, 2, 2), 0.4
    process = processes()[name]
    denoiser = Denoiser(Oracle(process, process.predictions[0], gaussian_posterior_mean(mu, s)), process)
    z = torch.randn(4000, 1, 2, 2, **F64, generator=torch.Generator().manual_seed(0))
    for sampler in (sample_heun, sample_dpmpp_2m):
        out = sampler(lambda x, t: denoiser(x, t), process, z, steps=39, x0_clip="none")
        torch.testing.assert_close(out.mean(0, keepdim=True), mu, rtol=0, atol=0.03)
        tolerance = 0.02 if sampler is sample_dpmpp_2m else 0.08
        assert abs(out.std(0).mean().item() / s - 1) < tolerance, (sampler.__name__, out.std(0).mean().item())


def test_every_path_ends_exactly():
    """Clean data at t = 0 and pure noise at the noisiest end, exactly (TrigFlow's alpha(1) was cos(pi / 2) = 6.1e-17: a
    finite level of log-SNR -74.7 that Heun stepped from as if it held data, error 1e14 on a Gaussian)."""
    one, zero = torch.ones(1, **F64), torch.zeros(1, **F64)
    for process in (FlowProcess(), TrigFlowProcess()):
        assert [v.item() for v in process.alpha_sigma(one)] == [0.0, 1.0], process.name
        assert [v.item() for v in process.alpha_sigma(zero)] == [1.0, 0.0], process.name
        assert process.log_snr(one).item() == -math.inf
    from ddpm.core.schedules import rescale_zero_terminal_snr

    assert DDPMProcess(rescale_zero_terminal_snr(cosine_betas(1000))).alphas_cumprod[-1].item() == 0.0


def _exact_gaussian_end(process, noise, times, mu, s):
    """The probability-flow ODE maps a start x_T at the noisiest level (alpha_T, sigma_T) of a Gaussian data set
    N(mu, s^2) to mu + s z', z' = (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2): it is linear."""
    alpha, sigma = (v.item() for v in process.alpha_sigma(times[-1:].to(getattr(process, "betas", times).device)))
    start = noise if process.discrete else noise * sigma
    return mu + s * (start - alpha * mu) / math.sqrt(alpha**2 * s**2 + sigma**2)


@pytest.mark.parametrize("name", ["flow", "trigflow", "edm", "ddpm", "ddpm_zero_terminal"])
@pytest.mark.parametrize("spacing", ["time", "logsnr", "karras"])
@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m, sample_heun], ids=["ddim", "dpmpp_2m", "heun"])
def test_a_gaussian_is_sampled_from_the_noisiest_level_by_every_sampler_and_spacing(name, spacing, sampler):
    """From the noisiest level (t = 1 for flow and TrigFlow, T for DDPM, sigma_max for EDM; where a spacing in log-SNR
    cannot start at -inf, from half log-SNR -5.1, and null is refused in one line) the exact denoiser of N(mu, s^2)
    reaches the ODE's exact end: within 0.1 at 99 evaluations, and closer than at 25 (EDM's time spacing, linear in
    sigma, is the documented poor one: only the second)."""
    from ddpm.core.schedules import rescale_zero_terminal_snr

    mu, s = torch.tensor([0.3, -0.5, 0.1, 0.8], **F64).view(1, 1, 2, 2), 0.4
    process = (DDPMProcess(rescale_zero_terminal_snr(cosine_betas(1000))) if name == "ddpm_zero_terminal"
               else processes()[name])
    prediction = "v" if name == "ddpm_zero_terminal" else process.predictions[0]
    denoiser = Denoiser(Oracle(process, prediction, gaussian_posterior_mean(mu, s)), process, prediction)
    z = torch.randn(256, 1, 2, 2, **F64, generator=torch.Generator().manual_seed(0))
    lambda_min = None
    infinite_start = math.isinf(process.log_snr(torch.tensor([process.t_max], **F64)).item()) if not process.discrete else False
    if spacing != "time" and infinite_start:
        with pytest.raises(ConfigError, match=r"sampler.lambda_min=null .* log-SNR -inf"):
            sampler(lambda x, t: denoiser(x, t), process, z, steps=25, spacing=spacing, lambda_min=None, x0_clip="none")
        lambda_min = -5.1
    errors = {}
    for steps in (25, 99):
        levels = steps if sampler is not sample_heun else (steps + 1) // 2
        times = process.sampling_times(levels, spacing, lambda_min)
        out = sampler(lambda x, t: denoiser(x, t), process, z, steps=steps, spacing=spacing, lambda_min=lambda_min,
                      x0_clip="none")
        errors[steps] = (out - _exact_gaussian_end(process, z, times, mu, s)).abs().max().item()
    assert errors[99] < errors[25], errors
    if not (name == "edm" and spacing == "time"):
        assert errors[99] < 0.1, errors


@pytest.mark.parametrize("name", ["flow", "trigflow"])
def test_heun_from_a_large_finite_level_does_not_blow_up(name):
    """sampler.lambda_min=-20 with time spacing: the first step goes from sigma = 4.9e8 to 19. The trapezoid's correction
    over it multiplied the two predictions' difference by 1.3e7 (error 2.3e7 on a Gaussian); taken as Euler's
    (``euler_ratio``), the sampler ends within 2 at 39 evaluations and keeps improving with more."""
    mu, s = torch.tensor([0.3, -0.5, 0.1, 0.8], **F64).view(1, 1, 2, 2), 0.4
    process = processes()[name]
    denoiser = Denoiser(Oracle(process, process.predictions[0], gaussian_posterior_mean(mu, s)), process)
    z = torch.randn(256, 1, 2, 2, **F64, generator=torch.Generator().manual_seed(0))
    for steps, bound in ((39, 3.0), (199, 0.5)):
        times = process.sampling_times((steps + 1) // 2, "time", -20.0)
        out = sample_heun(lambda x, t: denoiser(x, t), process, z, steps=steps, spacing="time", lambda_min=-20.0, x0_clip="none")
        assert (out - _exact_gaussian_end(process, z, times, mu, s)).abs().max().item() < bound, steps


def test_training_distributions_are_their_densities():
    """KS tests (fixed seed, 20,000 draws): logit-normal t (Esser et al. 2024), uniform t, log-normal sigma (Karras et
    al.), log-uniform sigma (uniform in lambda)."""
    torch.manual_seed(0)
    n = 20000
    t = FlowProcess(logit_mean=0.5, logit_std=0.8).sample_t(n)
    logit = torch.log(t / (1 - t)).numpy()
    assert stats.kstest(logit, stats.norm(loc=0.5, scale=0.8).cdf).pvalue > 0.01
    assert stats.kstest(logit, stats.norm(loc=0.0, scale=0.8).cdf).pvalue < 1e-6  # the test can fail
    assert stats.kstest(FlowProcess(time_distribution="uniform").sample_t(n).numpy(), "uniform").pvalue > 0.01
    sigma = EDMProcess(P_mean=-1.2, P_std=1.2).sample_t(n).numpy()
    assert stats.kstest(sigma, stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf).pvalue > 0.01
    sigma = EDMProcess(sigma_distribution="uniform_lambda").sample_t(n).numpy()
    assert stats.kstest(sigma, stats.loguniform(0.002, 80.0).cdf).pvalue > 0.01
    assert stats.kstest(sigma, stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf).pvalue < 1e-6  # the test can fail


@pytest.mark.parametrize("name", ["ddpm", "flow", "edm", "trigflow"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "edm"])
def test_the_loss_is_zero_at_a_perfect_prediction(name, weighting):
    process = processes()[name]
    x0 = torch.randn(256, 1, 2, 2, **F64)
    for prediction in process.predictions:
        # knows x_0 (one fixed batch): its posterior mean is x_0 itself
        perfect = Denoiser(Oracle(process, prediction, lambda x_t, a, s: x0), process, prediction, weighting)
        assert Denoising()(perfect, x0).item() < 1e-12
        wrong = Denoiser(Oracle(process, prediction, lambda x_t, a, s: torch.zeros_like(x_t)), process, prediction, weighting)
        assert Denoising()(wrong, x0).item() > 1e-3


def test_sampling_levels_are_spaced_as_named():
    """logsnr: lambda evenly spaced from the lambda_min floor down to t_min's; karras: sigma/alpha rho-spaced;
    time: the plain Euler grid t_max * i / N."""
    flow = FlowProcess()
    t = flow.sampling_times(10, "logsnr", lambda_min=-5.1)
    lam = flow.log_snr(t)
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((9,), (lam[-1] - lam[0]).item() / 9, **F64), rtol=1e-9, atol=1e-9)
    assert lam[-1].item() == pytest.approx(-10.2) and t[0].item() == pytest.approx(0.002)
    torch.testing.assert_close(flow.sampling_times(4), torch.tensor([0.25, 0.5, 0.75, 1.0], **F64))
    edm = EDMProcess()
    sigma = edm.sampling_times(18, "karras")
    ramp = torch.linspace(0, 1, 18, **F64)
    expected = (0.002 ** (1 / 7) + ramp * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7  # Karras et al. eq. 5
    torch.testing.assert_close(sigma, expected, rtol=1e-12, atol=1e-15)
    with pytest.raises(ConfigError, match="sampler.lambda_min=null with process=flow"):
        flow.sampling_times(10, "logsnr", lambda_min=None)


def test_process_settings_are_checked_in_one_line():
    for make, key in ((lambda: FlowProcess(time_distribution="beta"), "process.time_distribution"),
                      (lambda: FlowProcess(t_min=0), "process.t_min"),
                      (lambda: EDMProcess(sigma_min=1.0, sigma_max=0.5), "process.sigma_max"),
                      (lambda: EDMProcess(sigma_distribution="uniform"), "process.sigma_distribution"),
                      (lambda: EDMProcess(sigma_data=0), "process.sigma_data")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
            make()
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"diffusion.prediction='eps' with process=flow: must be one of \['velocity', 'x0'\]"):
        Denoiser(Oracle(FlowProcess(), "eps", None), FlowProcess(), "eps")
    with pytest.raises(ConfigError, match="sampler.S_churn=5 with process=ddpm"):
        check_process(__import__("functools").partial(sample_heun, S_churn=5), processes()["ddpm"])


@pytest.mark.parametrize("overrides, keys", [
    (["process=flow", "schedule=cosine"], ("schedule", "process=flow")),
    (["process=edm", "diffusion.prediction=v"], ("diffusion.prediction='v'", "process=edm")),
    (["process=trigflow", "sampler=ddpm"], ("sampler=ddpm", "process=trigflow")),
    (["sampler=heun", "sampler.S_churn=5"], ("sampler.S_churn=5", "process=ddpm")),
    (["process=edm", "process.sigma_distribution=uniform"], ("process.sigma_distribution", "log_normal")),
    ([], None),
])
def test_combinations_without_meaning_are_refused_in_one_line_before_compute(overrides, keys, tmp_path):
    """Exit 2 with one line naming both keys, and no run directory made (nothing computed, nothing written)."""
    from conftest import run_cli

    if keys is None:  # logsnr spacing from flow's lambda = -inf without a floor: refused at sampling, in one line
        from ddpm.core.samplers.dpmpp_2m import sample_dpmpp_2m as sampler

        with pytest.raises(ConfigError, match="sampler.lambda_min=null with process=flow") as error:
            sampler(lambda x, t: (x, x), FlowProcess(), torch.randn(1, 1, 2, 2), lambda_min=None)
        assert "\n" not in str(error.value)
        return
    result = run_cli("ddpm.train", *overrides, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert "\n" not in line and all(key in line for key in keys), line
    assert not (tmp_path / "run" / "checkpoints").exists()
