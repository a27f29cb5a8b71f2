"""Every user-settable value checked before anything is built, as one declarative table per entry point.

A rule names a dotted config key, a predicate over its value (and the whole config, for keys that depend on
others) and the allowed values in words. ``validate`` applies the rules whose key is present and raises one
``ConfigError`` listing every problem, one line each: ``guidance.p_uncond=1.5: must be a probability in [0, 1)``.
Hydra itself reports unknown groups, options and keys before this runs (``ddpm.config.run_cli`` adds the
list of available options to its message).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ddpm.core.errors import ConfigError  # noqa: F401  (re-exported: the core owns it, the entry points catch it)
from ddpm.core.ema import MAX_SIGMA_REL
from ddpm.core.guidance import (GUIDANCE_METHODS, APG, check_apg, check_interval, check_method, check_rescale, check_sampler_for,
                                 check_scale, guidance_usable)
from ddpm.builders import label_dropout
from ddpm.core.prediction import (LOSS_WEIGHTS, PREDICTIONS, ZERO_TERMINAL_SNR_PREDICTIONS, check_min_snr_gamma,
                                  check_prediction, check_terminal_snr)
from ddpm.core.samplers import MAX_LAMBDA_MIN, MAX_STEPS, MIN_LAMBDA_MIN, SPACINGS, X0_CLIPS, check_lambda_min, check_process, check_steps
from ddpm.core.samplers.ddim import check_eta
from ddpm.core.samplers.heun import check_churn
from ddpm.core.samplers.ddpm import VARIANCES
from ddpm.evaluation.metrics import EXTRACTORS, REFERENCE_SPLITS
from ddpm.snapshots import EMA_SOURCES, SNAPSHOT_DTYPES


Config = Any  # a composed DictConfig (the entry points) or the plain dict of a checkpoint (ddpm.load): no omegaconf here
_ABSENT = "__missing__"


def select(cfg: Config, key: str, default: Any = None) -> Any:
    """The plain value at a dotted key of a plain dict or a Config (resolving only that key), else ``default``."""
    if isinstance(cfg, dict):
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node
    from omegaconf import OmegaConf  # a DictConfig: omegaconf is loaded already

    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@dataclass(frozen=True)
class Rule:
    key: str
    check: Callable[[Any, Config], bool]
    allowed: str
    # A rule owned by the code it governs: ``check`` calls that code's own check, which raises ConfigError with its
    # own one line (the U-Net its shapes); ``allowed`` then only words a value the check could not even look at.
    owned: bool = False
    # Checked only when every other rule holds (a dry run of the configured objects, which needs them all valid).
    last: bool = False


# --- predicates -------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v, _=None) -> bool:
    return _is_int(v) and v > 0


def nonneg_int(v, _=None) -> bool:
    return _is_int(v) and v >= 0


def probability(v, _=None) -> bool:  # [0, 1)
    return _is_num(v) and 0 <= v < 1


def nonneg(v, _=None) -> bool:
    return _is_num(v) and v >= 0


def positive(v, _=None) -> bool:
    return _is_num(v) and v > 0


def one_of(*values) -> Callable[[Any, Config], bool]:
    return lambda v, _=None: v in values


def optional(check) -> Callable[[Any, Config], bool]:
    return lambda v, cfg=None: v is None or check(v, cfg)


def _timesteps(cfg: Config) -> int | None:
    return select(cfg, "schedule.timesteps")


def _steps_ok(v, cfg) -> bool:
    t = _timesteps(cfg)
    if t is not None and not positive_int(t):
        return True  # schedule.timesteps is wrong (its own rule says so); steps often just follow it
    if v is None:
        return True
    return _raises_no_config_error(check_steps, v, t)  # t None: a continuous process (or the checkpoint's, checked later)


def _raises_no_config_error(check: Callable, *args) -> bool:
    """A rule whose home is a check in the core (raising ConfigError), applied to the composed config."""
    try:
        check(*args)
        return True
    except ConfigError:
        return False


def _build_network(cfg: Config) -> None:
    """The network, built on the meta device (no memory, no compute): its constructor owns its rules (the U-Net its
    downsampling, attention resolutions and group norms), so another backbone brings its own."""
    import torch

    from ddpm.builders import build_net

    num_classes = select(cfg, "data.num_classes") if select(cfg, "guidance.conditional") else None
    with torch.device("meta"):
        build_net(select(cfg, "model"), num_classes=num_classes)


def _terminal_alpha_bar(cfg: Config) -> float:
    """alpha_bar_T of the configured schedule (1.0 when it cannot be built, or there is none: their own rules report
    that)."""
    try:
        from ddpm.builders import build_betas

        return float((1 - build_betas(select(cfg, "schedule"))).cumprod(0)[-1])
    except Exception:
        return 1.0


def _build_schedule(cfg: Config) -> None:
    """The schedule's betas, built as training would and checked by ``DDPMProcess`` (its rule's one home)."""
    from ddpm.builders import build_betas
    from ddpm.core.diffusion import DDPMProcess

    DDPMProcess(build_betas(select(cfg, "schedule")))


def _process_class(cfg: Config) -> type:
    """The class the ``process`` node names (none, in a checkpoint from before processes: DDPM)."""
    from ddpm.builders import resolve_target
    from ddpm.core.diffusion import DDPMProcess

    node = select(cfg, "process")
    return DDPMProcess if node is None else resolve_target(node["_target_"])


def _build_process(cfg: Config) -> None:
    """The process with its settings, and its rule with the schedule, as training builds them (their one home)."""
    from ddpm.builders import build, check_schedule_for

    process, schedule = select(cfg, "process"), select(cfg, "schedule")
    if not check_schedule_for(process, schedule):
        build(process, "process")


def _prediction_for_process(v, cfg) -> None:
    cls = _process_class(cfg)
    check_prediction(v, cls.predictions, cls.name)


def _sampler_for_process(v, cfg) -> None:
    from ddpm.builders import build_sampler

    check_process(build_sampler(v), _process_class(cfg))


def _dry_run_training(cfg: Config) -> None:
    """Every sampler a training run uses (its grids, quality curve and final evaluation), walked end to end on its
    process by a probe network (``ddpm.core.probe.dry_run``): a setting that overflows is refused now, not after the
    first 1,000 steps."""
    from dataclasses import replace
    from functools import partial

    from ddpm.builders import build_guidance, build_process, build_sampler
    from ddpm.core.probe import dry_run

    config = {key: select(cfg, key) for key in ("process", "schedule", "guidance", "sampler", "diffusion", "data", "callbacks")}
    process = build_process(config)
    prediction = (config.get("diffusion") or {}).get("prediction") or process.predictions[0]
    guidance = build_guidance(config["guidance"])
    num_classes = config["data"]["num_classes"] if config["guidance"].get("conditional") else None
    if guidance.method == "autoguidance":  # refused for training by its own rule; nothing to dry-run
        return
    sampler = build_sampler(config["sampler"])
    callbacks = config.get("callbacks") or {}
    runs = [("sampler", sampler, guidance)]
    for name in ("sample_grid", "sample_quality"):
        node = callbacks.get(name)
        if node and node.get("steps") is not None:
            runs.append((f"callbacks.{name}", partial(sampler, steps=node["steps"]), guidance))
    final = callbacks.get("evaluate_at_end")
    if final:
        final_sampler = build_sampler(final["sampler"]) if final.get("sampler") else sampler
        for w in final.get("guidance_scales") or []:
            if isinstance(w, (int, float)) and w >= 0 and (num_classes is None or guidance_usable(
                    label_dropout(config["guidance"]), w, True, guidance.method)):
                runs.append(("callbacks.evaluate_at_end", final_sampler, replace(guidance, scale=float(w))))
    for what, each, chosen in runs:
        dry_run(each, process, prediction, guidance=chosen, what=what, num_classes=num_classes)


def machine_memory() -> int:
    """This machine's physical memory in bytes (0 where the platform does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# Images a command may hold at once: a sample set lives in memory as float32, uint8 and features (about 3 copies);
# more than half the machine's memory would end in the kernel's OOM killer after all the sampling was done.
IMAGE_COPIES = 3


def _check_images(count, cfg: Config, key: str, min_size=None) -> None:
    """ConfigError, one line naming ``key``, when ``count`` images of the config's size (enlarged to ``min_size`` for a PNG
    grid) would take more than half of this machine's memory."""
    if not (_is_int(count) and count > 0):
        return  # its own rule words that
    side, channels = select(cfg, "data.image_size") or 8, select(cfg, "data.channels") or 1
    shown = side if not (_is_int(min_size) and min_size > side) else -(-min_size // side) * side
    needed = count * channels * 4 * (side * side * IMAGE_COPIES + shown * shown)
    memory = machine_memory()
    if memory and needed > memory // 2:
        raise ConfigError(f"{key}: {count} images of {side}x{side}" + (f" shown at {shown}x{shown}" if shown != side else "")
                          + f" need {needed / 1e9:.3g} GB, more than half of this machine's {memory / 1e9:.3g} GB: ask for fewer")


def _grid_images(cfg: Config) -> int:
    per_class, classes = select(cfg, "callbacks.sample_grid.per_class"), select(cfg, "data.num_classes")
    if select(cfg, "guidance.conditional") and _is_int(per_class) and _is_int(classes):
        return per_class * classes
    return select(cfg, "callbacks.sample_grid.num_samples") or 0


MEMORY = "images that fit in half of this machine's memory"


def _on_gpu(cfg: Config) -> bool:
    """Whether the configured trainer runs on a GPU (``auto``: when this machine has one)."""
    accelerator = str(select(cfg, "trainer.accelerator", default="auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and _cuda_count() > 0)


def _cuda_index(device: str) -> int:
    return int(str(device).partition(":")[2] or 0)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _existing_file(v, _=None) -> bool:
    return isinstance(v, str) and Path(v).expanduser().is_file()


def _sigma_rel_ok(v) -> bool:
    return _is_num(v) and 0 < v < MAX_SIGMA_REL


SAMPLING_PRECISIONS = ("auto", "float32", "bf16")  # ddpm.sample / ddpm.evaluate: sampler.precision

# trainer.precision: auto (ddpm.config.resolve_precision) or one of Lightning's names for the precisions it supports
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")

# --- the tables -------------------------------------------------------------------------------------------
GUIDANCE_VARIANT_RULES = [
    Rule("guidance.rescale", lambda v, _: _raises_no_config_error(check_rescale, v), "a number in [0, 1] (0: off; Lin et al. use 0.7)"),
    Rule("guidance.interval", lambda v, _: _raises_no_config_error(check_interval, v),
         "null or [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (EDM noise levels, e.g. [0.28, 5.42])"),
    Rule("guidance.method", lambda v, _: _raises_no_config_error(check_method, v), f"one of {list(GUIDANCE_METHODS)}"),
    Rule("guidance.method", lambda v, cfg: _raises_no_config_error(check_sampler_for, v, _sampler_name(cfg), select(cfg, "sampler.eta", default=0.0)),
         "cfg, apg or autoguidance with this sampler: cfgpp needs sampler=ddim sampler.eta=0 (CFG++ is defined for "
         "the DDIM update)"),
    Rule("guidance.scale", lambda v, cfg: not _is_num(v) or _raises_no_config_error(check_scale, v, select(cfg, "guidance.method", default="cfg")),
         "at most 1 with guidance.method=cfgpp (CFG++'s lambda is in [0, 1])"),
    Rule("guidance.apg.momentum", lambda v, _: _raises_no_config_error(lambda m: check_apg(APG(momentum=m)), v),
         "a number in (-1, 1) (Sadat et al. use -0.75; 0: off)"),
    Rule("guidance.apg.norm_threshold", lambda v, _: _raises_no_config_error(lambda r: check_apg(APG(norm_threshold=r)), v),
         "a number >= 0 (0: no cap)"),
    Rule("guidance.apg.eta", lambda v, _: _raises_no_config_error(lambda e: check_apg(APG(eta=e)), v),
         "a number in [0, 1] (0: orthogonal part only; 1: CFG's update)"),
]

def _sampler_name(cfg: Config) -> str:
    """``ddim`` for a sampler node whose target is ``...sample_ddim`` (its conf/sampler option's name)."""
    return str(select(cfg, "sampler._target_", default="")).rsplit(".", 1)[-1].removeprefix("sample_")


# ddpm.sample / ddpm.evaluate: a guidance key set to this takes the checkpoint's own value (its run's guidance node)
FROM_CHECKPOINT = "checkpoint"


def or_checkpoint(rule: Rule) -> Rule:
    """``rule`` for a sampling key that may also be FROM_CHECKPOINT."""
    return Rule(rule.key, lambda v, cfg: v == FROM_CHECKPOINT or rule.check(v, cfg),
                f"{FROM_CHECKPOINT} (the checkpoint's own value) or {rule.allowed}")


SAMPLER_RULES = [
    Rule("sampler.steps", _steps_ok, f"an integer between 1 and schedule.timesteps (ddpm; null: all T) or {MAX_STEPS} (continuous processes)"),
    Rule("sampler.eta", lambda v, _: _raises_no_config_error(check_eta, v), "a number >= 0 (0: deterministic DDIM, 1: DDPM posterior variance)"),
    Rule("sampler.variance", one_of(*VARIANCES), f"one of {list(VARIANCES)}"),
    Rule("sampler.x0_clip", one_of(*X0_CLIPS), f"one of {list(X0_CLIPS)}"),
    Rule("sampler.spacing", one_of(*SPACINGS), f"one of {list(SPACINGS)}"),
    Rule("sampler.rho", positive, "a number > 0 (EDM: 7)"),
    Rule("sampler.lambda_min", lambda v, _: _raises_no_config_error(check_lambda_min, v),
         f"null or a log-SNR <= {MAX_LAMBDA_MIN} and >= {MIN_LAMBDA_MIN} (e.g. -5.1): the first level must be noisy enough to start from noise"),
    Rule("sampler.precision", one_of(*SAMPLING_PRECISIONS), f"one of {list(SAMPLING_PRECISIONS)}"),
    Rule("sampler.compile", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("sampler.percentile", lambda v, _: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    Rule("sampler.S_churn", lambda v, _: _raises_no_config_error(check_churn, v, 0.0, 0.0, 1.0),
         "a number >= 0 (0: the deterministic Algorithm 1)"),
    Rule("sampler.S_tmax", lambda v, cfg: _raises_no_config_error(check_churn, 0.0, select(cfg, "sampler.S_tmin"), v, 1.0),
         "a number >= sampler.S_tmin >= 0 (the churned range of sigma)"),
    Rule("sampler.S_noise", lambda v, _: _raises_no_config_error(check_churn, 0.0, 0.0, 0.0, v), "a number > 0 (Karras et al.: 1.007)"),
    Rule("sampler.euler_ratio", lambda v, _: _is_num(v) and v > 1, "a number > 1 (inf: Heun's correction on every step, as EDM)"),
]

TRAIN_RULES = [
    Rule("seed", lambda v, _: _is_int(v), "an integer"),
    Rule("guidance.method", lambda v, _: v != "autoguidance",
         "cfg or apg for a training run's own samples (autoguidance needs a guide: sample or evaluate the checkpoint "
         "with guidance.method=autoguidance guidance.guide.step=N)"),
    Rule("data.batch_size", positive_int, "an integer > 0"),
    Rule("data.num_workers", nonneg_int, "an integer >= 0"),
    Rule("data.channels", one_of(1, 3), "1 or 3"),
    Rule("data.num_classes", positive_int, "an integer > 0"),
    Rule("data.test_fraction", lambda v, _: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    Rule("data.image_size", positive_int, "an integer > 0"),
    Rule("data.on_device", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("model.base_channels", positive_int, "an integer > 0"),
    Rule("model.channel_mult", lambda v, _: len(v) > 0 and all(positive_int(m) for m in v), "a non-empty list of integers > 0"),
    Rule("model.num_res_blocks", positive_int, "an integer > 0"),
    Rule("model.dropout", probability, "a probability in [0, 1)"),
    Rule("model.num_heads", positive_int, "an integer > 0"),
    Rule("model.compile", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("model.channels_last", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("model.sdpa", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("optim.optimizer.fused", lambda v, _: v is None or isinstance(v, bool), "true, false or null"),
    Rule("model.norm_groups", positive_int, "an integer > 0"),
    Rule("model", lambda v, cfg: _build_network(cfg), "settings the network's constructor accepts", owned=True),
    Rule("schedule.timesteps", positive_int, "an integer > 0"),
    Rule("schedule.beta_start", lambda v, _: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    Rule("schedule.beta_end", lambda v, cfg: _is_num(v) and select(cfg, "schedule.beta_start") < v < 1,
         "a number in (schedule.beta_start, 1)"),
    Rule("schedule.s", positive, "a number > 0"),
    Rule("schedule.max_beta", lambda v, _: _is_num(v) and 0 < v <= 1, "a number in (0, 1]"),
    Rule("guidance.conditional", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("guidance.p_uncond", probability, "a probability in [0, 1)"),
    Rule("guidance.scale", nonneg, "a number >= 0 (w; 0 = purely conditional)"),
    Rule("guidance.scale", lambda v, cfg: not (nonneg(v) and probability(select(cfg, "guidance.p_uncond"))) or guidance_usable(select(cfg, "guidance.p_uncond"), v, select(cfg, "guidance.conditional")),
         "0 when guidance.p_uncond=0 (the model never sees the null label); or train with guidance.p_uncond > 0"),
    *GUIDANCE_VARIANT_RULES,
    Rule("diffusion.prediction", one_of(*PREDICTIONS), f"one of {list(PREDICTIONS)}"),
    Rule("diffusion.prediction", lambda v, cfg: v not in PREDICTIONS or _raises_no_config_error(check_terminal_snr, v, _terminal_alpha_bar(cfg)),
         f"one of {list(ZERO_TERMINAL_SNR_PREDICTIONS)} with schedule.zero_terminal_snr=true: at alpha_T = 0 an eps model's "
         "x_0 = (x_T - eps) / alpha_T is undefined (Lin et al. 2024 train v: diffusion.prediction=v)"),
    Rule("diffusion.loss_weight", one_of(*LOSS_WEIGHTS), f"one of {list(LOSS_WEIGHTS)}"),
    Rule("diffusion.min_snr_gamma", lambda v, _: _raises_no_config_error(check_min_snr_gamma, v), "a number > 0 (Hang et al.: 5)"),
    Rule("schedule.zero_terminal_snr", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("schedule.start", lambda v, _: _is_num(v), "a number"),
    Rule("schedule.end", lambda v, cfg: _is_num(v) and v > select(cfg, "schedule.start"), "a number > schedule.start"),
    Rule("schedule.tau", positive, "a number > 0"),
    Rule("data.sigma_data", positive, "a number > 0 (the std of the data in [-1, 1])"),
    Rule("process", lambda v, cfg: _build_process(cfg), "a process and settings it accepts", owned=True),
    Rule("diffusion.prediction", lambda v, cfg: v not in PREDICTIONS or _prediction_for_process(v, cfg),
         "a target the process defines", owned=True),
    Rule("sampler", lambda v, cfg: _sampler_for_process(v, cfg), "a sampler the process can walk", owned=True),
    Rule("schedule", lambda v, cfg: _raises_no_config_error(_build_schedule, cfg),
         "settings whose betas are all in (0, 1) (beta_T = 1 with zero terminal SNR); these give NaN or out-of-range betas"),
    Rule("optim.optimizer.lr", positive, "a number > 0"),
    Rule("optim.warmup_steps", nonneg_int, "an integer >= 0"),
    Rule("ema.decay", lambda v, _: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    Rule("ema.warmup", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("ema.sigma_rels", lambda v, _: isinstance(v, list) and all(_sigma_rel_ok(s) for s in v),
         f"a list of relative EMA widths in (0, {MAX_SIGMA_REL:.4f}), e.g. [0.05, 0.10] (Karras et al. 2024), or []"),
    Rule("ema.snapshot_count", nonneg_int, "an integer >= 0 (snapshots per run; 0: none)"),
    Rule("ema.snapshot_every", optional(nonneg_int), "null (from ema.snapshot_count) or an integer >= 0 (0: no snapshots)"),
    Rule("ema.snapshot_dtype", one_of(*SNAPSHOT_DTYPES), f"one of {list(SNAPSHOT_DTYPES)}"),
    Rule("trainer.max_steps", lambda v, cfg: positive_int(v) or (v == -1 and positive_int(select(cfg, "trainer.max_epochs"))),
         "an integer > 0, or -1 together with trainer.max_epochs > 0 (else training never ends)"),
    Rule("trainer.devices", lambda v, _: positive_int(v) or v in ("auto", -1) or isinstance(v, (list, str)), "an integer > 0, a list of ids, or auto"),
    Rule("trainer.num_nodes", positive_int, "an integer > 0"),
    Rule("trainer.precision", one_of(*PRECISIONS), f"one of {list(PRECISIONS)}"),
    Rule("trainer.precision", lambda v, cfg: not (str(v).startswith("16") and not _on_gpu(cfg)),
         "a precision a CPU computes: float16 (16-mixed, 16-true) needs a GPU (trainer=gpu); on a CPU use bf16-mixed, "
         "32-true or auto"),
    Rule("trainer.gradient_clip_val", optional(nonneg), "a number >= 0 or null"),
    Rule("trainer.log_every_n_steps", positive_int, "an integer > 0"),
    Rule("ckpt_path", optional(_existing_file), "null or an existing checkpoint file"),
    Rule("resume", one_of("auto", "never"), "one of ['auto', 'never']"),
    Rule("callbacks.model_checkpoint.every_n_train_steps", nonneg_int, "an integer >= 0"),
    Rule("callbacks.sample_grid.every_n_steps", nonneg_int, "an integer >= 0 (0: only the final grid)"),
    Rule("callbacks.sample_grid.steps", _steps_ok, f"null or an integer between 1 and schedule.timesteps (ddpm) or {MAX_STEPS} (continuous processes)"),
    Rule("callbacks.sample_quality.every_n_steps", nonneg_int, "an integer >= 0 (0: off)"),
    Rule("callbacks.sample_quality.num_samples", lambda v, _: _is_int(v) and v >= 2, "an integer >= 2"),
    Rule("callbacks.sample_quality.steps", _steps_ok, f"null or an integer between 1 and schedule.timesteps (ddpm) or {MAX_STEPS} (continuous processes)"),
    Rule("callbacks.sample_grid.per_class", positive_int, "an integer > 0"),
    Rule("callbacks.sample_grid.num_samples", positive_int, "an integer > 0"),
    Rule("callbacks.sample_grid.min_size", nonneg_int, "an integer >= 0"),
    Rule("callbacks.sample_grid", lambda v, cfg: _check_images(_grid_images(cfg), cfg, "callbacks.sample_grid",
                                                              select(cfg, "callbacks.sample_grid.min_size")), MEMORY, owned=True),
    Rule("callbacks.sample_quality.num_samples", lambda v, cfg: _check_images(v, cfg, "callbacks.sample_quality.num_samples"),
         MEMORY, owned=True),
    Rule("callbacks.evaluate_at_end.num_samples", lambda v, cfg: _is_int(v) and v >= 2, "an integer >= 2"),
    Rule("callbacks.evaluate_at_end.num_samples", lambda v, cfg: _check_images(v, cfg, "callbacks.evaluate_at_end.num_samples"),
         MEMORY, owned=True),
    Rule("callbacks.sample_quality.feature_extractor", one_of(*EXTRACTORS), f"one of {list(EXTRACTORS)}"),
    Rule("callbacks.sample_quality.reference_split", one_of(*REFERENCE_SPLITS), f"one of {list(REFERENCE_SPLITS)}"),
    *SAMPLER_RULES,
    Rule("sampler", lambda v, cfg: _dry_run_training(cfg), "settings every sampler of the run can walk", owned=True, last=True),
]

# conf/weights.yaml: which weights of which checkpoint, on which device (ddpm.sample, ddpm.evaluate, ddpm.export)
WEIGHT_RULES = [
    Rule("ckpt_path", _existing_file, "an existing checkpoint file written by ddpm.train"),
    Rule("use_ema", lambda v, _: isinstance(v, bool), "true or false"),
    Rule("ema.sigma_rel", optional(lambda v, _: _sigma_rel_ok(v)),
         f"null (the classic EMA) or a relative EMA width in (0, {MAX_SIGMA_REL:.4f}), e.g. 0.05 or 0.10"),
    Rule("ema.sigma_rel", lambda v, cfg: v is None or select(cfg, "use_ema") is not False,
         "null with use_ema=false (the raw weights have no EMA length; drop one of the two)"),
    Rule("ema.source", one_of(*EMA_SOURCES), f"one of {list(EMA_SOURCES)}"),
    Rule("ema.sources", optional(lambda v, _: isinstance(v, list) and len(v) > 0 and all(_sigma_rel_ok(s) for s in v)),
         "null (every snapshot) or a non-empty list of the tracked widths to rebuild from, e.g. [0.05, 0.1]"),
    Rule("device", lambda v, _: v in ("auto", "cpu", "cuda") or str(v).startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
    Rule("device", lambda v, _: not str(v).startswith("cuda") or _cuda_index(v) < _cuda_count(),
         "a device this machine has: auto or cpu, or cuda/cuda:N with N below its CUDA device count"),
]

SAMPLE_RULES = [
    *WEIGHT_RULES,
    Rule("num_samples", positive_int, "an integer > 0"),
    Rule("batch_size", positive_int, "an integer > 0"),
    Rule("seed", lambda v, _: _is_int(v), "an integer"),
    *(or_checkpoint(rule) for rule in (Rule("guidance.scale", nonneg, "a number >= 0"), *GUIDANCE_VARIANT_RULES)),
    Rule("labels", lambda v, _: v is None or (isinstance(v, list) and len(v) > 0 and all(nonneg_int(x) for x in v)),
         "null or a list of class ids >= 0, e.g. labels=[3] or labels=[3,3,7]"),
    Rule("guidance.guide.ckpt_path", optional(_existing_file), "null or an existing checkpoint file written by ddpm.train"),
    Rule("guidance.guide.step", optional(nonneg_int), "null or a step with a checkpoint of this run (an integer >= 0)"),
    Rule("guidance.guide.sigma_rel", optional(lambda v, _: _sigma_rel_ok(v)),
         f"null (the guide's classic EMA) or a relative EMA width in (0, {MAX_SIGMA_REL:.4f})"),
    Rule("trajectory", nonneg_int, "an integer >= 0"),
    *SAMPLER_RULES,
]

EVALUATE_RULES = [
    *SAMPLE_RULES,
    Rule("num_samples", lambda v, _: _is_int(v) and v >= 2, "an integer >= 2 (a covariance needs two samples)"),
    Rule("metrics.feature_extractor", one_of(*EXTRACTORS), f"one of {list(EXTRACTORS)}"),
    Rule("metrics.reference_split", one_of(*REFERENCE_SPLITS), f"one of {list(REFERENCE_SPLITS)}"),
    Rule("metrics.reference_size", optional(lambda v, _: _is_int(v) and v >= 2), "null or an integer >= 2"),
]

RULES = {"train": TRAIN_RULES, "sample": SAMPLE_RULES, "evaluate": EVALUATE_RULES, "export": WEIGHT_RULES}


def problems(cfg: Config, rules: list[Rule]) -> list[str]:
    """One line per broken rule (a key with several broken rules is reported once)."""
    lines, seen, raised = [], set(), []
    rules = [r for r in rules if not r.last] + [r for r in rules if r.last]
    for rule in rules:
        if rule.last and (lines or raised):
            break
        if rule.key in seen or any(key.startswith(rule.key + ".") for key in seen):
            continue  # a node's own rule (schedule) is moot once one of its keys (schedule.timesteps) is reported
        plain = select(cfg, rule.key, default=_ABSENT)
        if isinstance(plain, str) and plain == _ABSENT:
            continue  # a key of another option of the group (sampler.eta only exists for ddim)
        try:
            ok = rule.check(plain, cfg)
        except ConfigError as error:
            if not rule.owned:
                raised.append((rule, plain))
                continue
            seen.add(rule.key)
            lines.append(str(error).splitlines()[0])
            continue
        except Exception:  # this value, or a malformed neighbour it depends on: decided below
            raised.append((rule, plain))
            continue
        if not ok and not rule.owned:
            seen.add(rule.key)
            lines.append(f"{rule.key}={plain!r}: must be {rule.allowed}")
    # A rule that could not even be evaluated is moot when a neighbour is reported broken (its own rule says so);
    # when nothing else is, the value itself is at fault (labels=3 where a list is expected).
    if not lines:
        lines = [f"{rule.key}={plain!r}: must be {rule.allowed}" for rule, plain in raised if rule.key not in seen]
    return lines


def _missing(node, prefix: str = "") -> list[str]:
    """Keys whose value is Hydra's mandatory marker ``???``."""
    if isinstance(node, dict):
        return [key for k, v in node.items() for key in _missing(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if node == "???" else []


# Nodes that pass any key on, so `+key=value` may add to them: Trainer arguments, optimizer keyword arguments, logger
# keyword arguments, callbacks by name, Hydra's own settings. Anywhere else an appended key is read by nothing.
FREE_KEYS = ("trainer", "optim.optimizer", "logger", "callbacks", "hydra")


def appended_keys(cfg: Config, overrides: list[str]) -> list[str]:
    """One line per ``+key=value`` override that adds a key no code reads (``+guidance.puncond=0.1``, a typo that
    Hydra accepts because of the +). ``+group=option`` (a config group, e.g. ``+data=cifar10``) is fine."""
    from omegaconf import OmegaConf

    from ddpm.options import config_dir

    groups = {p.name for p in config_dir().iterdir() if p.is_dir()} | {"experiments", "evaluations"}
    lines = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if not key.startswith("+") or key.startswith("++"):
            continue
        key = key[1:].split("@", 1)[0]
        parent, _, leaf = key.rpartition(".")
        if key.split("/")[0] in groups or any(key == free or key.startswith(free + ".") for free in FREE_KEYS):
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = sorted(k for k in (node.keys() if OmegaConf.is_dict(node) else []) if k != leaf and not str(k).startswith("_"))
        lines.append(f"+{key}: {parent or 'the config'} has no key {leaf!r} and nothing would read it (its keys: {known}); "
                     "check the spelling, and set an existing key without the +")
    return lines


# The rules a checkpoint's own config must meet before its model is built from it: those of the keys that make the
# model (a file can hold any value at a key it may set).
CHECKPOINT_KEYS = ("model", "process", "schedule", "diffusion", "guidance", "sampler", "ema", "data.image_size", "data.channels",
                   "data.num_classes")


def check_checkpoint_config(cfg: Config, source: str) -> None:
    """ConfigError, one line, when a checkpoint's (rebuilt) config holds a value its model could not be built from."""
    # the dry run of its samplers is sampling's own (``Model.draw``), with the settings it is asked to sample with
    rules = [r for r in TRAIN_RULES if any(r.key == k or r.key.startswith(k + ".") for k in CHECKPOINT_KEYS) and not r.last]
    found = problems(cfg, rules)
    if found:
        raise ConfigError(f"{source}: its config holds " + "; ".join(found) + " (was the file altered?)")


def validate(cfg: Config, entry: str, rules: tuple[Rule, ...] = ()) -> None:
    """Raise ConfigError listing every broken rule of ``entry`` (train | sample | evaluate | export) and of ``rules`` (those an
    entry point's own parts bring, e.g. the logger's), and every appended key (``+key=value``) that nothing reads."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    missing = sorted(key for key in _missing(OmegaConf.to_container(cfg, resolve=False)) if not key.startswith("hydra."))
    found = [f"{key}=???: must be set (it has no default); e.g. {key}=..." for key in missing]
    if HydraConfig.initialized():
        found += appended_keys(cfg, list(HydraConfig.get().overrides.task))
        preset = HydraConfig.get().runtime.choices.get("evaluations")
        if entry == "evaluate" and preset is not None and str(HydraConfig.get().mode) == "RunMode.RUN":
            found.append(f"evaluations={preset}: a grid of evaluations, run with --multirun (python -m ddpm.evaluate "
                         f"--multirun evaluations={preset} ckpt_path=...); without it only one default evaluation would run")
    found += problems(cfg, [*RULES[entry], *rules]) if not missing else []
    if found:
        raise ConfigError("\n".join(found))
