"""Resuming a run: which checkpoint it resumes from, and that checkpoint's training state, checked as data before
Lightning restores anything from it.

A checkpoint is an input (someone may have sent it). Its config is never built from (``ddpm.checkpoints``), and its
training state is held to what this run would write itself before any of it reaches native code: PyTorch's fused
AdamW reads and writes its moment buffers without checking their shapes, so an ``exp_avg`` of the wrong size in a
crafted file would overrun memory at the first step. ``check_resume_state`` compares every field Lightning or this
project restores with a reference made by this run's own objects (its module, its optimizer on a probe parameter, its
learning-rate schedule, fresh Lightning loops, the RNGs of this process): the same keys, tensors of the parameter's
shape and a floating dtype, counts that are counts, RNG states of the form each generator takes. Anything else is
refused in one line naming the field, before a logger starts or a step runs.

What is checked is what is used: ``read_checked`` reads the file once, and ``ddpm.training.checkpoint.AtomicCheckpointIO``
hands Lightning that same dict (or, in a process spawned for DDP, the file again only if its bytes are the ones
checked).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import re
from pathlib import Path
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ddpm.core.errors import ConfigError
from ddpm.files import read_regular

log = logging.getLogger(__name__)

# The fields of a checkpoint this project writes (Lightning's and its own); any other is refused.
FIELDS = {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks", "optimizer_states",
          "lr_schedulers", "config", "choices", "rng_states", "run_identity"}
# A precision plugin with state (16-mixed's gradient scaler) saves it under its class name.
SCALER_FIELDS = {"MixedPrecision": {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}}
MAX_COUNT = 2**53  # steps, epochs and batches beyond this are not counts a run reaches (float64 stops being exact)


class _Refused(Exception):
    """One field that is not what this project writes (turned into the one-line ConfigError by the caller)."""

    def __init__(self, field: str, what: str):
        super().__init__(f"{field} {what}")


def _require(ok: bool, field: str, what: str) -> None:
    if not ok:
        raise _Refused(field, what)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value, field: str, lowest: int = 0) -> None:
    _require(_is_int(value) and lowest <= value < MAX_COUNT, field, f"is {_show(value)}, not a count in [{lowest}, 2^53)")


def _finite_number(value, field: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _require(ok, field, f"is {_show(value)}, not a finite number")


def _show(value) -> str:
    """A short description of a value read from a file (cheap: it is formatted whether or not a check fails)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, (str, bytes)):
        return repr(value[:40])
    return repr(value) if isinstance(value, (int, float, bool, type(None))) and len(repr(value)) <= 40 else f"a {type(value).__name__}"


def _plain_tensor(value, field: str) -> torch.Tensor:
    """A dense CPU tensor, contiguous in one of the layouts a network's weights have (what torch.save writes of them):
    no sparse, quantized, expanded or overlapping memory that a kernel could be pointed past."""
    _require(isinstance(value, torch.Tensor), field, f"is {_show(value)}, not a tensor")
    ok = (value.layout == torch.strided and not value.is_quantized and not value.is_complex() and value.device.type == "cpu"
          and (value.is_contiguous() or value.is_contiguous(memory_format=torch.channels_last)))
    _require(ok, field, f"is {_show(value)} that is not a dense tensor (contiguous, or channels-last)")
    return value


def _floating_like(value, reference: torch.Tensor, field: str) -> None:
    """A finite floating tensor of ``reference``'s shape (its dtype may differ: the loader casts it)."""
    value = _plain_tensor(value, field)
    _require(value.shape == reference.shape, field, f"has shape {tuple(value.shape)}, the parameter {tuple(reference.shape)}")
    _require(value.is_floating_point(), field, f"is {value.dtype}, not a floating-point tensor")
    _require(bool(torch.isfinite(value).all()), field, "holds non-finite values")


def _same_keys(value, reference: dict, field: str, optional: set = frozenset()) -> dict:
    _require(isinstance(value, dict), field, f"is {_show(value)}, not a mapping")
    missing = sorted(map(str, set(reference) - set(value) - set(optional)))
    extra = sorted(map(str, set(value) - set(reference)))
    _require(not missing and not extra, field, f"has keys {extra or ''}{' and lacks ' + str(missing) if missing else ''} "
                                               "unlike the ones this run writes")
    return value


def _like(value, reference, field: str) -> None:
    """``value`` shaped as ``reference`` (a state a fresh object of this run gives): the same keys in every mapping, the
    same length of every list, a count where it has an int, a bool where a bool, a finite number where a float."""
    if isinstance(reference, dict):
        _same_keys(value, reference, field)
        for key, item in reference.items():
            _like(value[key], item, f"{field}.{key}")
    elif isinstance(reference, (list, tuple)):
        _require(isinstance(value, (list, tuple)) and len(value) == len(reference), field,
                 f"is {_show(value)}, not a list of {len(reference)}")
        for i, (a, b) in enumerate(zip(value, reference)):
            _like(a, b, f"{field}.{i}")
    elif isinstance(reference, bool):
        _require(isinstance(value, bool), field, f"is {_show(value)}, not true or false")
    elif isinstance(reference, int):
        _count(value, field, lowest=min(reference, 0))
    elif isinstance(reference, float):
        _finite_number(value, field)
    elif isinstance(reference, torch.Tensor):
        _require(isinstance(value, torch.Tensor) and value.shape == reference.shape and value.dtype == reference.dtype,
                 field, f"is {_show(value)}, not {_show(reference)}")
    elif reference is None:
        _require(value is None, field, f"is {_show(value)}, not null")
    else:
        _require(isinstance(value, str), field, f"is {_show(value)}, not text")


# --- the parts -----------------------------------------------------------------------------------------------------
def _check_weights(state, module: nn.Module) -> None:
    """Every tensor of the module's state dict, with its shape; the power EMAs may differ as a set (a resume with other
    ``ema.sigma_rels`` rebuilds them: ``DiffusionModule._match_power_emas``)."""
    field = "state_dict"
    _require(isinstance(state, dict) and all(isinstance(k, str) for k in state), field, "is not a mapping of names to tensors")
    expected = module.state_dict()
    fixed = lambda keys: {k for k in keys if not k.startswith("power_ema.")}  # noqa: E731
    missing, extra = sorted(fixed(expected) - fixed(state)), sorted(fixed(state) - fixed(expected))
    _require(not missing and not extra, field, f"does not fit this run's network (missing {missing[:3]}, unexpected {extra[:3]})")
    same_power = {k for k in state if k.startswith("power_ema.")} == {k for k in expected if k.startswith("power_ema.")}
    for key, value in state.items():
        if key.startswith("power_ema.") and not same_power:
            continue  # dropped and rebuilt from the weights
        reference = expected[key]
        if reference.is_floating_point():
            _floating_like(value, reference, f"{field}.{key}")
        else:
            value = _plain_tensor(value, f"{field}.{key}")
            _require(value.dtype == reference.dtype and value.shape == reference.shape, f"{field}.{key}",
                     f"is {_show(value)}, not {_show(reference)}")


def _probe(optimizer_factory) -> tuple[dict, dict]:
    """The state dicts of this run's optimizer (one step on a probe parameter) and learning-rate schedule: the keys and
    forms a genuine checkpoint of this run holds."""
    from functools import partial

    from ddpm.training.module import _linear_warmup

    probe = nn.Parameter(torch.zeros(1))
    optimizer = optimizer_factory([probe])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_linear_warmup, warmup_steps=1))
    probe.grad = -torch.ones(1)  # negative: a moment that comes out positive is one that cannot be negative (exp_avg_sq)
    optimizer.step()
    scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


def _check_optimizer(states, parameters: list[torch.Tensor], reference: dict) -> None:
    field = "optimizer_states"
    _require(isinstance(states, list) and len(states) == 1, field, f"is {_show(states)}, not a list of one optimizer state")
    state = _same_keys(states[0], reference, f"{field}.0")
    groups = state["param_groups"]
    _require(isinstance(groups, list) and len(groups) == 1, f"{field}.0.param_groups", "is not a list of one group")
    group, reference_group = groups[0], reference["param_groups"][0]
    where = f"{field}.0.param_groups.0"
    _same_keys(group, {**reference_group, "initial_lr": 0.0}, where, optional={"initial_lr", "param_names"})
    _require(isinstance(group["params"], list) and all(_is_int(i) for i in group["params"])
             and group["params"] == list(range(len(parameters))), f"{where}.params",
             f"is not the {len(parameters)} parameter indices of this run's network")
    for key, value in group.items():
        if key in ("params", "param_names"):
            continue
        expected = reference_group.get(key, 0.0)
        if isinstance(expected, (tuple, list)):
            _require(isinstance(value, (tuple, list)) and len(value) == len(expected), f"{where}.{key}",
                     f"is {_show(value)}, not {len(expected)} numbers")
            for i, v in enumerate(value):
                _finite_number(v, f"{where}.{key}.{i}")
        elif isinstance(expected, bool) or expected is None:
            _require(value is None or isinstance(value, bool), f"{where}.{key}", f"is {_show(value)}, not true, false or null")
        else:
            _finite_number(value, f"{where}.{key}")
    per_parameter = reference["state"][0]
    moments = {k for k, v in per_parameter.items() if isinstance(v, torch.Tensor) and v.shape == (1,)}
    squares = {k for k in moments if per_parameter[k].item() > 0}  # second moments, which a square root is taken of
    slots = state["state"]
    _require(isinstance(slots, dict), f"{field}.0.state", "is not a mapping")
    for index, slot in slots.items():
        _require(_is_int(index) and 0 <= index < len(parameters), f"{field}.0.state",
                 f"has the key {_show(index)}, not a parameter index below {len(parameters)}")
        if isinstance(slot, dict) and not slot:
            continue
        _same_keys(slot, per_parameter, f"{field}.0.state.{index}")
        for key, value in slot.items():
            name = f"{field}.0.state.{index}.{key}"
            if key in moments:
                _floating_like(value, parameters[index], name)
                _require(key not in squares or bool((value >= 0).all()), name, "holds negative values (a second moment)")
            else:  # the step count: a scalar, as the optimizer keeps it
                value = _plain_tensor(value, name) if isinstance(per_parameter[key], torch.Tensor) else value
                if isinstance(per_parameter[key], torch.Tensor):
                    _require(value.shape == per_parameter[key].shape and value.is_floating_point(), name,
                             f"is {_show(value)}, not {_show(per_parameter[key])}")
                    number = float(value)
                else:
                    _finite_number(value, name)
                    number = float(value)
                _require(math.isfinite(number) and 0 <= number < MAX_COUNT, name, f"is {number}, not a step count")


def _check_schedulers(states, reference: dict) -> None:
    field = "lr_schedulers"
    _require(isinstance(states, list) and len(states) == 1, field, f"is {_show(states)}, not a list of one schedule")
    state = _same_keys(states[0], reference, f"{field}.0")
    for key, value in state.items():
        name = f"{field}.0.{key}"
        if key == "lr_lambdas":  # the warm-up is a partial, saved as its (empty) __dict__: nothing to restore
            _require(isinstance(value, list) and len(value) == 1 and (value[0] is None or value[0] == {}), name,
                     "is not [{}], what this run's warm-up saves")
        elif key in ("base_lrs", "_last_lr"):
            _require(isinstance(value, list) and len(value) == 1, name, f"is {_show(value)}, not a list of one rate")
            _finite_number(value[0], f"{name}.0")
        elif key == "last_epoch":
            _count(value, name, lowest=-1)
        else:
            _like(value, reference[key], name)


def _check_rng(states) -> None:
    """The form each generator's ``set_state`` takes (``DiffusionModule.on_save_checkpoint`` writes them)."""
    field = "rng_states"
    _same_keys(states, {"torch": 0, "cuda": 0, "numpy": 0, "python": 0}, field)
    torch_state = _plain_tensor(states["torch"], f"{field}.torch")
    reference = torch.get_rng_state()
    _require(torch_state.dtype == torch.uint8 and torch_state.shape == reference.shape, f"{field}.torch",
             f"is {_show(torch_state)}, not {_show(reference)}")
    cuda = states["cuda"]
    _require(isinstance(cuda, list), f"{field}.cuda", "is not a list")
    devices = torch.cuda.device_count() if torch.cuda.is_available() else None
    if cuda and devices is not None:
        _require(len(cuda) == devices, f"{field}.cuda", f"holds {len(cuda)} generator states, this machine has {devices} GPUs")
    for i, each in enumerate(cuda):
        each = _plain_tensor(each, f"{field}.cuda.{i}")
        expected = torch.cuda.get_rng_state(i).shape if devices else each.shape
        _require(each.dtype == torch.uint8 and each.shape == expected, f"{field}.cuda.{i}", f"is {_show(each)}")
    numpy_state = states["numpy"]
    where = f"{field}.numpy"
    _require(isinstance(numpy_state, (tuple, list)) and len(numpy_state) == 5, where, "is not (name, keys, pos, has_gauss, cached)")
    name, keys, pos, has_gauss, cached = numpy_state
    _require(isinstance(name, str) and name == "MT19937", f"{where}.0", f"is {_show(name)}, not 'MT19937'")
    keys = _plain_tensor(keys, f"{where}.1")
    _require(keys.shape == (624,) and not keys.is_floating_point() and bool(((keys >= 0) & (keys < 2**32)).all()),
             f"{where}.1", f"is {_show(keys)}, not 624 32-bit words")
    _require(_is_int(pos) and 0 <= pos <= 624, f"{where}.2", f"is {_show(pos)}, not a position in [0, 624]")
    _require(_is_int(has_gauss) and has_gauss in (0, 1), f"{where}.3", f"is {_show(has_gauss)}, not 0 or 1")
    _finite_number(cached, f"{where}.4")
    python = states["python"]
    where = f"{field}.python"
    _require(isinstance(python, tuple) and len(python) == 3 and _is_int(python[0]) and python[0] == random.getstate()[0], where,
             "is not (version, state, gauss) of Python's random")
    words = python[1]
    _require(isinstance(words, tuple) and len(words) == 625 and all(_is_int(w) and 0 <= w < 2**32 for w in words[:624])
             and _is_int(words[624]) and 0 < words[624] <= 624, f"{where}.1", "is not 624 32-bit words and a position")
    _require(python[2] is None or (isinstance(python[2], float) and math.isfinite(python[2])), f"{where}.2",
             f"is {_show(python[2])}, not null or a number")


def reference_loops() -> dict:
    """The loop states of a fresh Lightning trainer: what a checkpoint's ``loops`` must be shaped like."""
    import lightning as L

    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", devices=1)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return {"fit_loop": trainer.fit_loop.state_dict(), "validate_loop": trainer.validate_loop.state_dict(),
            "test_loop": trainer.test_loop.state_dict(), "predict_loop": trainer.predict_loop.state_dict()}


def _check_loops(loops, global_step: int, reference: dict) -> None:
    field = "loops"
    fit_state = reference["fit_loop"].get("state_dict", {})
    _same_keys(loops, reference, field)
    for name, loop_reference in reference.items():
        loop = _same_keys(loops[name], loop_reference, f"{field}.{name}")
        for key, value in loop.items():
            where = f"{field}.{name}.{key}"
            if name == "fit_loop" and key == "state_dict":
                _same_keys(value, {**fit_state, "combined_loader": 0}, where, optional={"combined_loader"})
                if "combined_loader" in value:
                    _check_loader_states(value["combined_loader"], f"{where}.combined_loader")
            elif key.endswith("state_dict") and loop_reference[key] == {}:
                _require(isinstance(value, dict) and not value, where, f"is {_show(value)}, not empty")
            else:
                _like(value, loop_reference[key], where)
    steps = loops["fit_loop"]["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"]["completed"]
    _require(steps == global_step, f"{field}.fit_loop (optimizer steps)", f"counts {steps} steps, the checkpoint's global_step {global_step}")


def _check_loader_states(states, field: str) -> None:
    """What ``ddpm.training.data.ResumableLoader.state_dict`` writes."""
    _require(isinstance(states, list) and len(states) == 1, field, f"is {_show(states)}, not one loader state")
    state = _same_keys(states[0], {"batches_done": 0, "batch_size": 0}, f"{field}.0")
    _count(state["batches_done"], f"{field}.0.batches_done")
    _count(state["batch_size"], f"{field}.0.batch_size", lowest=1)


# What ModelCheckpoint.state_dict writes (Lightning 2.x).
MODEL_CHECKPOINT_FIELDS = ("monitor", "best_model_score", "best_model_path", "current_score", "dirpath", "best_k_models",
                           "kth_best_model_path", "kth_value", "last_model_path")
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_.=-]+\.ckpt")


def _check_callbacks(states, checkpoint_dir: Path) -> None:
    """Lightning restores a callback's state by its ``state_key``. ModelCheckpoint's, when its ``dirpath`` is this run's
    checkpoint folder (else Lightning restores only ``best_model_path``, which it never acts on), names files it later
    removes (its earlier last.ckpt, checkpoints past its top k): each must be a checkpoint file directly in that
    folder, or nothing. Other callbacks' states (one of the user's own) are theirs to read."""
    field = "callbacks"
    _require(isinstance(states, dict) and all(isinstance(k, str) for k in states), field, "is not a mapping of callback states")
    folder = os.path.realpath(checkpoint_dir)
    for key, state in states.items():
        if not key.startswith("ModelCheckpoint"):
            continue
        where = f"{field}.ModelCheckpoint"
        _same_keys(state, dict.fromkeys(MODEL_CHECKPOINT_FIELDS), where)
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            _require(isinstance(state[name], str), f"{where}.{name}", f"is {_show(state[name])}, not a path")
        _require(state["monitor"] is None or isinstance(state["monitor"], str), f"{where}.monitor", "is not text")
        dirpath = state.get("dirpath")
        _require(dirpath is None or isinstance(dirpath, str), f"{where}.dirpath", "is not text")
        best = state.get("best_k_models", {})
        _require(isinstance(best, dict), f"{where}.best_k_models", "is not a mapping")
        if dirpath is None or os.path.realpath(dirpath) == folder:  # restored: every file it names is one it may remove
            for path in [*(state.get(name, "") for name in ("best_model_path", "kth_best_model_path", "last_model_path")), *best]:
                ok = path == "" or (isinstance(path, str) and path == os.path.normpath(path) and os.path.isabs(path)
                                    and os.path.realpath(os.path.dirname(path)) == folder
                                    and CHECKPOINT_NAME.fullmatch(os.path.basename(path)) is not None)
                shown = str(path) if len(str(path)) <= 120 else "..." + str(path)[-120:]
                _require(ok, where, f"names {shown!r}, not a checkpoint file in this run's {folder}")
        for value in (state.get("best_model_score"), state.get("current_score"), state.get("kth_value"), *best.values()):
            ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
                isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point())
            _require(ok, where, f"holds {_show(value)} as a score")


def _check_scaler(state, field: str) -> None:
    _require(isinstance(state, dict) and set(state) <= SCALER_FIELDS[field], field, "is not a gradient scaler's state")
    for key, value in state.items():
        _finite_number(value, f"{field}.{key}")


def check_resume_state(checkpoint: dict, module, source: str, checkpoint_dir: Path, loops: dict | None = None) -> None:
    """ConfigError, one line naming the field, unless every part of ``checkpoint`` that a resume restores is what
    this run (``module``, a DiffusionModule) would write itself (see the module docstring)."""
    try:
        _require(isinstance(checkpoint, dict), "the file", "is not a checkpoint")
        extra = sorted(map(str, set(checkpoint) - FIELDS - set(SCALER_FIELDS)))
        _require(not extra, "the file", f"has fields {extra[:5]} that ddpm.train never writes")
        for field in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
            _require(field in checkpoint, field, "is missing: a checkpoint to resume from holds the whole training state "
                                                 "(a weights-only file can be sampled, not resumed)")
        _count(checkpoint.get("global_step"), "global_step")
        _count(checkpoint.get("epoch", 0), "epoch")
        version = checkpoint.get("pytorch-lightning_version")
        _require(isinstance(version, str) and re.fullmatch(r"\d{1,4}(\.\d{1,6}){1,3}([a-z0-9.+-]{0,20})", version) is not None,
                 "pytorch-lightning_version", f"is {_show(version)}, not a version number")
        _check_weights(checkpoint["state_dict"], module)
        optimizer_reference, scheduler_reference = _probe(module.optimizer_factory)
        _check_optimizer(checkpoint["optimizer_states"], list(module.net.parameters()), optimizer_reference)
        _check_schedulers(checkpoint["lr_schedulers"], scheduler_reference)
        _check_loops(checkpoint["loops"], checkpoint["global_step"], loops if loops is not None else reference_loops())
        _check_callbacks(checkpoint.get("callbacks", {}), checkpoint_dir)
        if "rng_states" in checkpoint:
            _check_rng(checkpoint["rng_states"])
        identity = checkpoint.get("run_identity")
        _require(identity is None or (isinstance(identity, str) and re.fullmatch(r"[0-9a-f]{32}", identity) is not None),
                 "run_identity", f"is {_show(identity)}, not 32 hexadecimal digits")
        for field in SCALER_FIELDS:
            if field in checkpoint:
                _check_scaler(checkpoint[field], field)
    except _Refused as refused:
        raise ConfigError(f"{source}: its training state is not what ddpm.train writes: {refused}; refusing to resume "
                          "from it (was the file altered?)") from None


def read_checked(path: str | Path, module, source: str, checkpoint_dir: Path) -> tuple[dict, str]:
    """The checkpoint at ``path``, read once (a regular file only) and checked by ``check_resume_state``, with the
    SHA-256 of its bytes."""
    data = read_regular(Path(path), what=source)
    digest = hashlib.sha256(data).hexdigest()
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # the same file was read a moment ago by the config check; it changed since
        raise ConfigError(f"{source}: not a readable checkpoint ({(str(error).splitlines() or [type(error).__name__])[0][:160]})") from None
    check_resume_state(checkpoint, module, source, checkpoint_dir)
    return checkpoint, digest


# --- where a run resumes from -----------------------------------------------------------------------------------
def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``cfg.ckpt_path``; else, with ``resume=auto``, the run directory's own newest
    complete checkpoint (a requeued or rerun job; see ``newest_checkpoint``); never a fresh start over an earlier run's
    checkpoints. The checkpoint must be readable and of the requested model."""
    from ddpm.checkpoints import load_checkpoint
    from ddpm.training.checkpoint import config_differences

    ckpt_path = str(Path(cfg.ckpt_path).expanduser()) if cfg.ckpt_path is not None else None
    own = Path(cfg.paths.checkpoint_dir)
    if ckpt_path is None and own.is_dir():
        newest = newest_checkpoint(own)
        if newest is not None and cfg.resume != "auto":
            raise ConfigError(f"paths.checkpoint_dir={str(own)!r} already holds checkpoints of an earlier run ({newest[0].name}, "
                              f"step {newest[1]}): pick a new hydra.run.dir, or resume=auto to continue from it")
        if newest is not None:
            ckpt_path = str(newest[0])
            log.info("resuming from this run directory's newest checkpoint %s (step %d; resume=auto)", ckpt_path, newest[1])
    if ckpt_path is not None:
        # Compared, never built from. A file named by ckpt_path (one someone may have sent) must also hold only this
        # project's options; the run directory's own checkpoints may name the user's own callbacks, as their run did.
        saved = load_checkpoint(ckpt_path, mmap=True, build_from_config=cfg.ckpt_path is not None)["config"]
        requested = OmegaConf.to_container(cfg, resolve=True)
        differences = config_differences(saved, requested)
        if differences:
            raise ConfigError(f"ckpt_path={str(ckpt_path)!r} holds a different model than requested: " + "; ".join(differences))
    return ckpt_path


def newest_checkpoint(directory: Path) -> tuple[Path, int] | None:
    """The one rule for where a run resumes: of ``last.ckpt`` and the ``step_*.ckpt`` files, the complete one with the
    largest step (``last.ckpt`` on a tie). Temporaries a kill left mid-write are removed first; a file that cannot be
    read (torn by some other writer) is skipped with a warning. None when there is nothing to resume."""
    from ddpm.checkpoints import load_checkpoint

    for stray in directory.glob(".*.ckpt.tmp"):
        log.warning("removing %s, a checkpoint write that a kill or a full disk interrupted", stray)
        stray.unlink(missing_ok=True)

    def step_of(path: Path) -> int | None:
        try:
            return load_checkpoint(path, mmap=True, build_from_config=False)["global_step"]
        except ConfigError as error:
            log.warning("skipping %s: %s", path, error)
            return None

    found = []
    if (directory / "last.ckpt").is_file() and (step := step_of(directory / "last.ckpt")) is not None:
        found.append((step, True, directory / "last.ckpt"))
    # Of the periodic checkpoints only the newest readable one matters: read them newest first, by the step in the
    # name, and stop at the first that loads (a run of 800 checkpoints is not read 800 times at every resume).
    named = sorted(directory.glob("*.ckpt"), key=lambda p: [int(s) for s in re.findall(r"\d+", p.stem)] or [-1], reverse=True)
    for path in (p for p in named if p.name != "last.ckpt"):
        if (step := step_of(path)) is not None:
            found.append((step, False, path))
            break
    if not found:
        return None
    step, _, path = max(found)
    return path, step
