"""A trained model as a Python object, a ``Pipeline``: ``ddpm.load(path)`` and ``Pipeline.sample`` / ``Pipeline.evaluate``
(a pipeline: a denoiser over chosen weights with its sampler and guidance, as diffusers calls one; ``model=`` is the
network's config group).

    import ddpm
    model = ddpm.load("outputs/.../checkpoints/last.ckpt", ema=True, device="auto")
    images = model.sample([3, 3, 7], sampler="dpmpp_2m", steps=20, guidance=2.0, seed=0)   # (3, C, H, W) in [-1, 1]
    record = model.evaluate(num_samples=1000)                                              # {"metrics", "protocol"}

This is the one inference path: ``ddpm.sample``, ``ddpm.evaluate`` and the training callbacks sample through
``Pipeline.draw``; ``Pipeline.evaluate`` measures (``ddpm.evaluate`` writes its record, training's final evaluation one
per w with the same ``Pipeline.protocol``). No Lightning, Hydra, omegaconf or wandb is imported
on this path (tests/test_layout.py checks it): a checkpoint is read by ``ddpm.checkpoints`` (which never lets a file
choose what code runs) and built by ``ddpm.builders``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ddpm.interrupts import check as check_interrupt
from ddpm.builders import build, build_denoiser, build_guidance, build_sampler, label_dropout
from ddpm.checkpoints import load_checkpoint
from ddpm.core.denoiser import Denoiser
from ddpm.core.errors import ConfigError
from ddpm.core.guidance import Guidance
from ddpm.core.probe import dry_run
from ddpm.core.variance import VARIANCES
from ddpm.core.settings import integer, one_of, require
from ddpm.core.samplers import Sampler, as_sampler, check_process, check_steps, randn_like, sampler_name
from ddpm.options import read_option
from ddpm.core.ema import MAX_SIGMA_REL, valid_sigma_rel
from ddpm.snapshots import EMA_SOURCES, posthoc_state_dict, snapshot_dir

log = logging.getLogger(__name__)

# Where the digits classifier and reference statistics are cached (paths.cache_dir of conf/paths/default.yaml).
DEFAULT_CACHE_DIR = os.environ.get("DDPM_CACHE", str(Path.home() / ".cache" / "ddpm"))


def even_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """Labels 0..num_classes-1 in contiguous runs of (nearly) equal length: one grid row per class."""
    return torch.arange(num_samples) * num_classes // num_samples


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: cuda when available, else cpu; ConfigError, one line, for a device this machine does not have."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device={device!r}: not a device ({str(error).splitlines()[0][:80]}); use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not (torch.cuda.is_available() and (resolved.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"device={str(device)!r}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 0} "
                          "CUDA devices; use auto or cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={str(device)!r}: must be auto, cpu or cuda")
    return resolved


@contextlib.contextmanager
def evaluating(net: nn.Module):
    """Eval mode (no dropout) for the duration, restoring the previous mode after."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


class Pipeline:
    """A denoiser over chosen weights, with what sampling it needs to know about its training: whether it saw the null
    label (``p_uncond``), its guidance and sampler defaults, and where it came from (``config``, ``weights``, ``step``).

    Built by ``load`` from a checkpoint, or by the LightningModule over its live weights (``DiffusionModule.model``),
    so a training run samples exactly as ``ddpm.sample`` does."""

    def __init__(self, denoiser: Denoiser, *, p_uncond: float, guidance: Guidance = Guidance(), sampler: Callable | None = None,
                 config: dict | None = None, weights: Any = "ema", step: int | None = None, path: str | None = None):
        self.denoiser, self.p_uncond, self.guidance, self.default_sampler = denoiser, p_uncond, guidance, sampler
        self.config, self.weights, self.step, self.path = config, weights, step, path
        self._compiled: dict[int, nn.Module] = {}
        self._guides: dict[int, dict] = {}  # autoguidance guides given as Models: where each came from, for the protocol

    @property
    def net(self) -> nn.Module:
        return self.denoiser.net

    @property
    def process(self):
        """The process the samplers walk (``ddpm/core/processes``: DDPM's schedule, flow, EDM, TrigFlow)."""
        return self.denoiser.process

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> "Pipeline":
        self.net.to(resolve_device(device))
        self.process.to(resolve_device(device))
        return self

    # --- what to sample, and how ------------------------------------------------------------------------------------
    def labels_for(self, labels: int | Sequence[int] | torch.Tensor | None, num_samples: int | None = None) -> tuple[torch.Tensor | None, int]:
        """(labels, n): a count gives that many images (spread evenly over the classes of a conditional model), a list
        gives one image per label; ConfigError for labels the model does not have."""
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels, num_samples = None, labels
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
            bad = not self.conditional or len(labels) == 0 or labels.min() < 0 or labels.max() >= self.num_classes
            if bad:
                allowed = f"class ids below {self.num_classes}" if self.conditional else "null (the model is unconditional)"
                raise ConfigError(f"labels={labels.tolist()[:20]}: must be {allowed}")
            return labels, len(labels)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples={num_samples!r}: must be an integer > 0")
        return (even_labels(num_samples, self.num_classes) if self.conditional else None), num_samples

    def sampler_for(self, sampler: str | Callable | None = None, steps: int | None = None, **options) -> Callable:
        """A sampler by option name of conf/sampler/ (``"dpmpp_2m"``, its defaults there, ``options`` over them), a
        sampler callable as it is, or None: the one the model was trained with. ``steps`` overrides its steps."""
        if sampler is None:
            sampler = self.default_sampler if self.default_sampler is not None else "ddpm"
        if isinstance(sampler, str):
            try:
                node = read_option("sampler", sampler)
            except KeyError as error:
                raise ConfigError(f"sampler={sampler!r}: {error.args[0].split(': ', 1)[1]}") from None
            unknown = sorted(set(options) - set(node))
            if unknown:
                known = sorted(k for k in node if not k.startswith("_"))
                raise ConfigError(f"sampler={sampler}: no option {unknown} (its options: {known})")
            # an interpolation (ddpm's steps: ${oc.select:schedule.timesteps,null}) means the sampler's own default
            node = {k: v for k, v in {**node, **options}.items() if not (isinstance(v, str) and "${" in v)}
            sampler = build_sampler(node)
        elif options:
            sampler = replace(sampler, **options) if isinstance(sampler, Sampler) else partial(sampler, **options)
        if steps is not None:
            check_steps(steps, self.process.num_timesteps)
            sampler = sampler.with_steps(steps) if isinstance(sampler, Sampler) else partial(sampler, steps=steps)
        return sampler

    def guidance_for(self, guidance: float | Guidance | None = None) -> Guidance:
        """None: the model's own (the checkpoint's guidance node: w, rescale, interval); a number: that w with no
        rescale or interval; a ``Guidance`` as it is. Checked against how the model was trained (w > 0 needs
        p_uncond > 0)."""
        if guidance is None:
            guidance = self.guidance
        elif not isinstance(guidance, Guidance):
            guidance = Guidance(scale=float(guidance))
        if isinstance(guidance.guide, Pipeline):  # autoguidance's guide given as a loaded model: its denoiser, and where from
            guide = guidance.guide
            self._guides[id(guide.denoiser)] = {"path": str(Path(guide.path).resolve()) if guide.path else None,
                                                "global_step": guide.step, "weights": guide.weights}
            guidance = replace(guidance, guide=guide.denoiser)
        if guidance.guide is not None and next(guidance.guide.net.parameters()).device != self.device:
            raise ConfigError(f"guidance.guide: the guide is on {next(guidance.guide.net.parameters()).device}, the "
                              f"model on {self.device}: load both on one device")
        guidance.check(self.p_uncond, self.conditional)
        return guidance

    # --- sampling ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def draw(self, labels: int | Sequence[int] | torch.Tensor | None = None, *, num_samples: int | None = None,
             sampler: str | Callable | None = None, steps: int | None = None, guidance: float | Guidance | None = None,
             seed: int = 0, batch_size: int = 500, precision: str = "float32", compile: bool = False,
             progress: bool = False, trajectory: int = 0, trajectory_steps: int = 10, **sampler_options) -> dict:
        """Images in [-1, 1] for ``labels`` (or ``num_samples`` / an int: that many, spread over the classes), in
        batches of ``batch_size`` from one generator seeded with ``seed`` on the model's device: the same seed gives the
        same images. Returns ``images``, ``labels``, ``trajectory`` (x_T ... x_0 of the first ``trajectory`` images, or
        None), ``nfe`` (network evaluations per batch) and ``seconds``. ``precision``: float32, or bf16 autocast of the
        network; ``compile``: a torch.compile'd network (compiled once per weights)."""
        from tqdm.auto import tqdm

        labels, n = self.labels_for(labels, num_samples)
        require(integer(batch_size) and batch_size > 0, "batch_size", batch_size, "an integer > 0 (images per forward pass)")
        require(integer(seed), "seed", seed, "an integer")
        one_of("sampler.precision", precision, ("float32", "bf16"))
        require(isinstance(compile, bool), "sampler.compile", compile, "true or false")
        require(integer(trajectory) and 0 <= trajectory <= n, "trajectory", trajectory,
                f"an integer in [0, {n}] (the trajectories of that many of the images)")
        run = self.sampler_for(sampler, steps, **sampler_options)
        guidance = self.guidance_for(guidance)
        option = as_sampler(run)
        guidance.check_sampler(sampler_name(run), getattr(option, "eta", 0.0))
        check_process(run, self.process)
        if option is not None:
            option.check_model(self.denoiser)
        # one of this project's samplers walks this process on a probe network first (milliseconds): settings that
        # overflow are refused before any compute, naming them (ddpm.core.probe); a function of your own runs as it is
        if option is not None:
            dry_run(option, self.process, self.denoiser.prediction, guidance=guidance, num_classes=self.num_classes,
                    boundary=self.denoiser.boundary)
        device, net = self.device, self.net
        if compile:
            if id(net) not in self._compiled:  # one wrapper per weights: torch.compile compiles on its first call
                self._compiled[id(net)] = torch.compile(net)
            net = self._compiled[id(net)]
        denoiser = self.denoiser.with_net(net)
        generator = torch.Generator(device).manual_seed(seed)
        evaluations, frames, chunks = 0, [], []

        def counted(model_fn):
            @functools.wraps(model_fn)  # keeps what a sampler reads off it (CFG++'s renoise_with_eps)
            def call(x, t, **cond):
                nonlocal evaluations
                check_interrupt()  # a Ctrl+C that something caught on its way up still stops sampling here
                evaluations += 1
                return model_fn(x, t, **cond)
            return call

        batches = range(0, n, batch_size)
        # One bar over all images when there are several batches; the sampler's own bar over its steps when there is one.
        overall = tqdm(total=n, desc="sampling", unit="img", disable=not progress or len(batches) == 1, leave=False)
        start = time.perf_counter()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with evaluating(net), autocast:
            for first in batches:
                size = min(batch_size, n - first)
                batch_labels = labels[first:first + size].to(device) if labels is not None else None
                shape = (size, net.in_channels, net.image_size, net.image_size)
                noise = randn_like(torch.empty(shape, device=device), generator)
                keep = trajectory if first == 0 else 0
                callback = (lambda i, x, x0: frames.append(x[:keep].clone())) if keep else None  # noqa: E731
                model_fn = guidance.model_fn(denoiser, batch_labels)
                chunks.append(run(counted(model_fn), self.process, noise, generator=generator,
                                  progress=progress and len(batches) == 1, callback=callback))
                overall.update(size)
        overall.close()
        seconds = time.perf_counter() - start
        bad = sum(int((~torch.isfinite(chunk.flatten(1))).any(1).sum()) for chunk in chunks)
        if bad:
            raise NonFiniteSamples(f"sampling gave {bad} of {n} images with non-finite values, which would be written as "
                                   f"black: {self.why_not_finite(run, guidance)}")
        path = None
        if frames:
            every = max(1, len(frames) // trajectory_steps)
            path = torch.stack(frames[::every][: trajectory_steps - 1] + [frames[-1]], dim=1)  # (k, steps, C, H, W)
        return {"images": torch.cat(chunks), "labels": labels, "trajectory": path,
                "nfe": evaluations / len(batches), "seconds": seconds}

    # --- likelihood -------------------------------------------------------------------------------------------------
    def likelihood_denoiser(self, labels: torch.Tensor | None, n: int):
        """``denoise(x_t, t) -> (x0, eps)`` in float64 (and the learned variance's v, if the model learned one) for the
        likelihood of ``n`` images: conditional on ``labels``, or,
        with None, the unconditional model of a conditional one through its null label (refused if it never saw it)."""
        if labels is None and self.conditional:
            if not self.p_uncond > 0:
                raise ConfigError("labels=None: this model trained with guidance.p_uncond=0, so it has no unconditional "
                                  "model to measure p(x) with; give the images' labels for p(x | y)")
            labels = torch.full((n,), self.net.null_label, dtype=torch.long)
        labels = labels.to(self.device) if labels is not None else None
        dtype = next(self.net.parameters()).dtype

        def denoise(x_t: torch.Tensor, t: torch.Tensor):
            x0, eps, v = self.denoiser(x_t.to(self.device, dtype), t.to(self.device), labels, with_variance=True)
            return (x0.double(), eps.double()) + (() if v is None else (v.double(),))
        return denoise

    def log_likelihood(self, images: torch.Tensor, labels=None, *, estimator: str = "hutchinson", num_probes: int = 1,
                       rtol: float = 1e-5, atol: float = 1e-5, solver: str = "RK45", variance: str | None = None,
                       x0_clip: str = "clip", seed: int = 0, batch_size: int = 500) -> dict:
        """log p of ``images`` (in [-1, 1], taken as 8-bit: rounded to the nearest of 256 levels, as a PNG stores them;
        conditional on ``labels`` when given), per image, in nats, and how it was computed. Discrete DDPM: its variational bound (``ddpm.core.likelihood.vlb_terms``: -log P <= total, one
        network evaluation per step, ``variance`` the reverse step's, None: the model's own ``diffusion.variance``; its
        mean at the predicted x_0 clamped to [-1, 1] unless ``x0_clip="none"``);
        continuous processes: the probability-flow ODE
        on the images dequantized with noise seeded by ``seed`` (``estimator``, ``num_probes``, ``solver``, ``rtol``,
        ``atol``). ``bits_per_dim`` turns either into bits per dimension."""
        from ddpm.core import likelihood

        images = torch.as_tensor(images)
        require(images.ndim == 4 and images.shape[1:] == (self.net.in_channels, self.net.image_size, self.net.image_size),
                "images", tuple(images.shape), f"a batch shaped (N, {self.net.in_channels}, {self.net.image_size}, "
                f"{self.net.image_size}) in [-1, 1]")
        require(integer(batch_size) and batch_size > 0, "batch_size", batch_size, "an integer > 0")
        require(integer(num_probes) and num_probes > 0, "likelihood.num_probes", num_probes, "an integer > 0")
        images = torch.round((images.double().clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # as 8-bit images (PNG's levels)
        labels, n = self.labels_for(labels, len(images)) if labels is not None else (None, len(images))
        generator = torch.Generator().manual_seed(seed)
        discrete = getattr(self.process, "discrete", False)
        variance = self.denoiser.variance if variance is None else variance
        if discrete:
            one_of("likelihood.variance", variance, VARIANCES)
            one_of("likelihood.x0_clip", x0_clip, likelihood.X0_CLIPS)
            if variance == "learned_range" and not self.denoiser.learns_variance:
                raise ConfigError(f"likelihood.variance=learned_range: this model has a fixed variance "
                                  f"({self.denoiser.variance}); use null (the model's), fixed_small or fixed_large")
        protocol = ({"method": "vlb", "variance": variance, "x0_clip": x0_clip, "steps": self.process.num_timesteps,
                     "seed": seed}
                    if discrete else
                    {"method": "ode", "estimator": estimator, "num_probes": num_probes if estimator == "hutchinson" else None,
                     "solver": solver, "rtol": rtol, "atol": atol, "t_start": float(self.process.t_min),
                     "dequantization": "uniform", "seed": seed})
        values, nfe = [], 0
        with evaluating(self.net):
            for first in range(0, n, batch_size):
                x = images[first:first + batch_size].double()
                denoise = self.likelihood_denoiser(labels[first:first + batch_size] if labels is not None else None, len(x))
                if discrete:
                    bound = likelihood.vlb_terms(self.process, denoise, x, variance, generator, x0_clip)
                    values.append(-bound.total)
                    nfe += self.process.num_timesteps
                else:
                    result = likelihood.ode_log_likelihood(self.process, denoise, likelihood.dequantize(x, generator),
                                                           estimator, num_probes, rtol, atol, solver, generator=generator)
                    values.append(result.log_likelihood)
                    nfe += result.nfe
        log_p = torch.cat(values)
        if not torch.isfinite(log_p).all():
            raise likelihood.NonFiniteLikelihood(
                f"{int((~torch.isfinite(log_p)).sum())} of {n} images got a non-finite log-likelihood: the model's "
                "predictions overflow on real images (a diverged checkpoint?)")
        return {"log_likelihood": log_p, "dims": images[0].numel(), "discrete": discrete,
                "protocol": {**protocol, "nfe_per_batch": nfe / len(range(0, n, batch_size))}}

    def bits_per_dim(self, images: torch.Tensor, labels=None, **options) -> dict:
        """Bits per dimension of 8-bit ``images`` (``log_likelihood``'s options): the bound's nats / (D ln 2) for DDPM,
        the dequantized density's -log2 p / D + 7 for the continuous processes (``ddpm.core.likelihood``), per image,
        and the mean over them with how it was computed."""
        from ddpm.core.likelihood import ode_bits_per_dim

        record = self.log_likelihood(images, labels, **options)
        log_p, dims = record["log_likelihood"], record["dims"]
        bpd = -log_p / (dims * math.log(2.0)) if record["discrete"] else ode_bits_per_dim(log_p, dims)
        return {"bits_per_dim": bpd, "mean": bpd.mean().item(), "protocol": record["protocol"]}

    def why_not_finite(self, sampler: Callable, guidance: Guidance) -> str:
        """The likely cause of non-finite samples: the sampler's or the process's settings (a dry run on a probe network
        fails: ``ddpm.core.probe``), or the network itself (non-finite weights, or outputs that diverge at some level)."""
        from ddpm.core.probe import dry_run

        try:
            dry_run(sampler, self.process, self.denoiser.prediction, guidance=guidance, num_classes=self.num_classes)
        except ConfigError as error:
            return str(error)
        if any(not torch.isfinite(p).all() for p in self.net.parameters()):
            return "the network's weights are not finite (a run that went NaN?)"
        return ("the settings sample a probe network fine, so the network's own outputs diverge at some level: a smaller "
                "guidance.scale, sampler.x0_clip=clip, or more sampler.steps")

    def sample(self, labels: int | Sequence[int] | torch.Tensor | None = None, **options) -> torch.Tensor:
        """``draw(...)["images"]``: e.g. ``model.sample(16)``, ``model.sample([3, 3, 7], guidance=2, steps=20)``."""
        return self.draw(labels, **options)["images"]

    # --- evaluation -------------------------------------------------------------------------------------------------
    def data(self, root: str | None = None):
        """The data set the model was trained on (its config's ``data`` node), optionally read from another ``root``."""
        if self.config is None or "data" not in self.config:
            raise ConfigError("this model carries no data config: pass data=... (a ddpm.data data set)")
        node = dict(self.config["data"])
        if root is not None:
            node["root"] = root
        return build(node, "data")

    def check_data(self, data) -> None:
        """Refuse to measure a model against images of another shape or label set."""
        net, lines = self.net, []
        for key, model_value in (("channels", net.in_channels), ("image_size", net.image_size), ("num_classes", net.num_classes)):
            if model_value is not None and getattr(data, key, None) != model_value:
                lines.append(f"data.{key}={getattr(data, key, None)!r}: the checkpoint's model has {key}={model_value}")
        if lines:
            raise ConfigError("; ".join(lines) + " (evaluate against the dataset the model was trained on)")

    def evaluate(self, num_samples: int = 1000, *, data=None, feature_extractor: str = "auto", reference_split: str = "train",
                 reference_size: int | None = None, cache_dir: str | None = None, inception_score: bool = True,
                 labels=None, sampler: str | Callable | None = None, steps: int | None = None,
                 guidance: float | Guidance | None = None, seed: int = 0, **draw_options) -> dict:
        """Sample ``num_samples`` images (or one per label of ``labels``) and measure them against the real images of
        ``reference_split`` (``data``: a ``ddpm.data`` data set; default the one the model was trained on). Returns the
        metrics record ``{"metrics": ..., "protocol": ...}``, the protocol being everything that makes two numbers
        comparable: reference set, feature space, sample count, sampler, guidance, weights, seed and checkpoint."""
        from ddpm.evaluation.metrics import inception_score as measure_inception, metric_name, prepare, sample_metrics

        if labels is None and not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 2):
            raise ConfigError(f"num_samples={num_samples!r}: must be an integer >= 2 (a covariance needs two samples)")

        data = self.data() if data is None else data
        self.check_data(data)
        data.check()
        extractor, extractor_info, reference = prepare(feature_extractor, data, reference_split, cache_dir or DEFAULT_CACHE_DIR,
                                                       reference_size, self.device)
        run = self.sampler_for(sampler, steps)
        guidance = self.guidance_for(guidance)
        out = self.draw(labels, num_samples=num_samples, sampler=run, guidance=guidance, seed=seed, **draw_options)
        images, drawn_labels = out["images"], out["labels"]
        metrics = sample_metrics(extractor, reference, images, drawn_labels)
        if inception_score and drawn_labels is not None and images.shape[1] == 3 and metric_name(extractor) == "fid":
            metrics.update(measure_inception(images))
        # One evaluation is one network call on a batch; a guided one carries the conditional and the unconditional
        # halves together. nfe counts them per image (the sampler's steps).
        metrics.update(nfe=out["nfe"], sampling_seconds=out["seconds"], images_per_second=len(images) / out["seconds"])
        return {"metrics": metrics,
                "protocol": self.protocol(run, guidance, seed, len(images), reference.info, extractor_info,
                                          precision=draw_options.get("precision", "float32"),
                                          compile=draw_options.get("compile", False))}

    def protocol(self, sampler: Callable, guidance: Guidance, seed: int, num_samples: int, reference_info: dict,
                 extractor_info: dict, **sampler_extra) -> dict:
        """What ``evaluate`` records beside its numbers: compare runs only when their protocols agree."""
        option = as_sampler(sampler)
        options = option.settings() if option is not None else dict(getattr(sampler, "keywords", {}))
        if options.get("steps") is None:
            options["steps"] = self.process.num_timesteps
        return {
            "reference": reference_info,
            "feature_extractor": extractor_info,
            "num_samples": num_samples,
            "sampler": {"name": sampler_name(sampler), **options, **sampler_extra},
            **guidance.protocol(),
            **({"guide": self._guides.get(id(guidance.guide), "a Denoiser given from Python")}
               if not guidance.method.unconditional else {}),
            "prediction": self.denoiser.prediction,
            "weights": self.weights,
            "seed": seed,
            "checkpoint": {"path": str(Path(self.path).resolve()) if self.path else None, "global_step": self.step},
        }


# --- loading --------------------------------------------------------------------------------------------------------
def _weights(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def check_load_arguments(ema, ema_source: str = "auto", ema_sources=None, device="auto") -> torch.device:
    """``load``'s choice of weights and device, checked (ConfigError, one line naming the argument); the device."""
    if ema_source not in EMA_SOURCES:
        raise ConfigError(f"ema.source={ema_source!r}: must be one of {list(EMA_SOURCES)}")
    if not (isinstance(ema, bool) or valid_sigma_rel(ema)):
        raise ConfigError(f"ema={ema!r}: must be true (the classic EMA), false (the raw weights) or a relative EMA width in "
                          f"(0, {MAX_SIGMA_REL:.4f})")
    if ema_sources is not None and not (isinstance(ema_sources, (list, tuple)) and ema_sources and all(
            valid_sigma_rel(w) for w in ema_sources)):
        raise ConfigError(f"ema_sources={ema_sources!r}: must be None or a non-empty list of relative EMA widths, e.g. [0.05, 0.1]")
    return resolve_device(device)


def load(path: str | Path, ema: bool | float = True, device: str | torch.device = "auto", *, snapshots: str | Path | None = None,
         ema_source: str = "auto", ema_sources: Sequence[float] | None = None, key: str = "ckpt_path") -> Pipeline:
    """The model of a checkpoint written by ``python -m ddpm.train``, through the same trust checks as the CLI.

    ``ema``: True, the classic EMA (``ema.decay``); False, the raw weights; a number, the power EMA of that relative
    width (Karras et al. 2024), the one tracked in the checkpoint if there is one (``ema_source``: auto | tracked |
    posthoc), else rebuilt from the run's snapshots (``snapshots``: their folder, default ``<run>/ema_snapshots``;
    ``ema_sources``: rebuild from these tracked widths only). ConfigError, one line, for anything that is not a ddpm
    checkpoint of a model this project can build. ``key``: the setting that named the file, for the messages."""
    source = f"{key}={str(path)!r}"
    device = check_load_arguments(ema, ema_source, ema_sources, device)
    checkpoint = load_checkpoint(path, "cpu", key=key)
    config = checkpoint["config"]
    missing = [node for node in ("model", "guidance", "data", "ema", "sampler") if not isinstance(config.get(node), dict)]
    if missing:
        raise ConfigError(f"{source}: its config holds no {missing[0]} settings (null or absent); not a model this project "
                          "can build (was the file altered?)")
    from ddpm.validation import check_checkpoint_config  # the rules of the model's keys (no Hydra: plain dicts too)

    check_checkpoint_config(config, source)
    try:
        denoiser = build_denoiser(config)
        default_sampler = build_sampler(config["sampler"])
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    except Exception as error:  # a value the rules let through that the constructors refuse
        raise ConfigError(f"{source}: its config does not build a model ({type(error).__name__}: "
                          f"{(str(error).splitlines() or [''])[0][:200]})") from None
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{source}: its state_dict is not a mapping of names to tensors (was the file altered?)")
    weights: Any = "ema" if ema is True else "raw"
    prefix = "ema.module." if ema is True else "net."
    tracked_widths = [float(s) for s in (config.get("ema", {}).get("sigma_rels") or [])]
    sigma_rel = None if isinstance(ema, bool) else float(ema)
    if sigma_rel is not None:
        index = next((i for i, s in enumerate(tracked_widths) if abs(s - sigma_rel) < 1e-9), None)
        present = index is not None and any(k.startswith(f"power_ema.averages.{index}.") for k in state)
        if ema_source == "tracked" and not present:
            raise ConfigError(f"ema.sigma_rel={sigma_rel}: the checkpoint tracks no power EMA of that width (it has "
                              f"{tracked_widths}); use ema.source=auto or posthoc to rebuild it from the snapshots")
        if present and ema_source != "posthoc":
            prefix, weights = f"power_ema.averages.{index}.", {"power_ema": {"sigma_rel": sigma_rel, "source": "tracked"}}
        else:
            prefix = "ema.module."  # the shapes every snapshot must have; replaced by the rebuild below
    _load_weights(denoiser.net, _weights(state, prefix), source)
    if sigma_rel is not None and not isinstance(weights, dict):
        directory = Path(snapshots).expanduser() if snapshots else snapshot_dir(path)
        sources = None if ema_sources is None else [float(s) for s in ema_sources]
        # the EMA at this checkpoint's step, from the snapshots up to it only
        rebuilt, info = posthoc_state_dict(directory, sigma_rel, step=checkpoint.get("global_step"), sources=sources,
                                           reference=denoiser.net.state_dict(), run_identity=checkpoint.get("run_identity"),
                                           linked_ok=snapshots is not None)
        _load_weights(denoiser.net, rebuilt, f"ema.snapshots={str(directory)!r}")
        log.info("power EMA sigma_rel=%g at step %d rebuilt from %d snapshots in %s", sigma_rel, info["step"],
                 info["snapshots"], directory)
        weights = {"power_ema": {"source": "posthoc", **info}}
    model = Pipeline(denoiser.with_net(denoiser.net.requires_grad_(False).eval()),
                  p_uncond=label_dropout(config["guidance"]), guidance=build_guidance(config["guidance"]),
                  sampler=default_sampler, config=config, weights=weights, step=checkpoint.get("global_step"), path=str(path))
    return model.to(device)


def _load_weights(net: nn.Module, state: dict, source: str) -> None:
    """``state`` into ``net``: ConfigError, one line, for weights that do not fit it or are not finite."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{source}: its weights are not a mapping of names to tensors (was the file altered?)")
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as error:  # missing or unexpected keys, shapes
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"{source}: its weights do not fit the model its config describes ({reason})") from None
    bad = next((k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ConfigError(f"{source}: holds non-finite weights ({bad}): a run that went NaN, or an altered file; "
                          "sample an earlier checkpoint")


class NonFiniteSamples(ConfigError):
    """Sampling gave NaN or infinite values; nothing was written (exit status 2, one line naming the likely cause)."""


__all__ = ["Guidance", "Pipeline", "load"]
