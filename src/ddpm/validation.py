"""What a command checks before any compute. Each option owns its settings and rules (``ddpm/core/settings.py``): the
network (built on the meta device), the process and its schedule, the samplers, the guidance and its method, the data
set (nothing read), the EMAs; so validating a config is building what it configures through ``ddpm.builders`` and
collecting the one-line ``ConfigError`` each part raises (``built``). ``_relations`` are the rules between two options,
``TRAIN_KEYS`` the keys of Lightning's trainer, the optimizer and ``ddpm.train`` itself; ``ddpm.sample``'s and
``ddpm.evaluate``'s own arguments are ``Pipeline.draw``'s and ``Pipeline.evaluate``'s, checked there. Every problem is one
line (``guidance.p_uncond=1.5: must be a probability in [0, 1)``); Hydra reports unknown groups and keys first."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ddpm.core.errors import ConfigError
from ddpm.core.settings import integer, number
from ddpm.options import select

Config = Any  # a composed DictConfig (the entry points) or the plain dict of a checkpoint: no omegaconf here
Rule = tuple[str, Callable[[Any, Config], bool], str]  # (key, check of its value, the allowed values in words)
_ABSENT = object()
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine")


def _float16_without_gpu(precision, cfg: Config) -> bool:
    import torch

    accelerator = str(select(cfg, "trainer.accelerator", default="auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return str(precision).startswith("16") and not on_gpu


TRAIN_KEYS: list[Rule] = [
    ("seed", lambda v, _: integer(v), "an integer"),
    ("ckpt_path", lambda v, _: v is None or (isinstance(v, str) and Path(v).expanduser().is_file()),
     "null or an existing checkpoint file"),
    ("resume", lambda v, _: v in ("auto", "never"), "one of ['auto', 'never']"),
    ("init_from", lambda v, _: v is None or (isinstance(v, str) and Path(v).expanduser().is_file()),
     "null or an existing checkpoint file"),
    ("model.compile", lambda v, _: isinstance(v, bool), "true or false"),
    ("optim.optimizer.lr", lambda v, _: number(v) and v > 0, "a number > 0"),
    ("optim.optimizer.fused", lambda v, _: v is None or isinstance(v, bool), "true, false or null"),
    ("optim.warmup_steps", lambda v, _: integer(v) and v >= 0, "an integer >= 0"),
    ("trainer.max_steps", lambda v, cfg: (integer(v) and v > 0) or (v == -1 and integer(select(cfg, "trainer.max_epochs"))
                                                                  and select(cfg, "trainer.max_epochs") > 0),
     "an integer > 0, or -1 together with trainer.max_epochs > 0 (else training never ends)"),
    ("trainer.precision", lambda v, cfg: v in PRECISIONS and not _float16_without_gpu(v, cfg),
     f"one of {list(PRECISIONS)}: a precision the device computes (float16, 16-*, needs a GPU: trainer=gpu)"),
    ("trainer.gradient_clip_val", lambda v, _: v is None or (number(v) and v >= 0), "a number >= 0 or null"),
    ("trainer.log_every_n_steps", lambda v, _: integer(v) and v > 0, "an integer > 0"),
]


def built(cfg: Config, entry: str) -> tuple[dict, list[str]]:
    """The options ``cfg`` configures, built as its command builds them, and one line per option that refused its
    settings (an option built over one that failed, the sampler over its process, is skipped: it would repeat the
    line). A sampling command's guidance settings may also be ``checkpoint``: built over the defaults, its lines say so."""
    import ddpm.builders as b
    from ddpm.core.ema import EMASettings

    plain = {k: select(cfg, k) for k in ("data", "model", "process", "objective", "schedule", "diffusion", "guidance",
                                         "sampler", "ema")}
    if entry == "train":
        steps: list[tuple[str, Callable]] = [
            ("data", lambda: b.build(plain["data"], "data")), ("ema", lambda: EMASettings(**plain["ema"])),
            ("p_uncond", lambda: b.label_dropout(plain["guidance"])), ("guidance", lambda: b.build_guidance(plain["guidance"])),
            ("model", lambda: b.build_net(plain["model"], device="meta", num_classes=b.network_classes(plain))),
            ("process", lambda: b.build_process(plain)), ("objective", lambda: b.build_objective(plain)),
            ("sampler", lambda: b.build_sampler(plain["sampler"])), ("denoiser", lambda: b.build_denoiser(plain, device="meta"))]
    else:
        given = {k: v for k, v in (plain["guidance"] or {}).items() if k != "guide"}
        steps = [("sampler", lambda: b.build_sampler(plain["sampler"])),
                 ("guidance", lambda: b.build_guidance(b.from_checkpoint({}, given)))] if entry != "export" else []
    objects, lines = {}, []
    for name, make in steps:
        if {"sampler": {"process"}, "denoiser": {"model", "process", "objective"}}.get(name, set()) - set(objects) and entry == "train":
            continue
        try:
            objects[name] = make()
        except ConfigError as error:
            line = str(error).splitlines()[0]
            if entry != "train" and line.startswith("guidance.") and ": must be " in line:
                line = line.replace(": must be ", ": must be checkpoint (the checkpoint's own value) or ", 1)
            lines.append(line)
    return objects, lines


def _relations(cfg: Config, entry: str, objects: dict) -> None:
    """ConfigError, one line, for the first rule between two options that the config breaks."""
    sampler, guidance, process = objects.get("sampler"), objects.get("guidance"), objects.get("process")
    if sampler is not None and guidance is not None:
        guidance.check_sampler(sampler.name, getattr(sampler, "eta", 0.0))
    if entry != "train":
        return
    if not guidance.method.unconditional:
        raise ConfigError(f"guidance.method={guidance.method.name}: must be cfg or apg for a training run's own samples "
                          "(autoguidance needs a guide: sample or evaluate the checkpoint with guidance.method=autoguidance "
                          "guidance.guide.step=N)")
    guidance.check(objects["p_uncond"], bool(select(cfg, "guidance.conditional")))
    model_classes, data_classes = select(cfg, "model.num_classes"), select(cfg, "data.num_classes")
    if select(cfg, "guidance.conditional") and integer(model_classes) and model_classes < data_classes:
        raise ConfigError(f"model.num_classes={model_classes}: must be at least data.num_classes={data_classes} (the class "
                          "embedding has a row per class, and one more for the null label)")
    sampler.check_process(process)
    sampler.check_model(objects["denoiser"])
    from ddpm.preflight import preflight

    preflight(cfg, process, objects["denoiser"].prediction, sampler, guidance)


def problems(cfg: Config, rules: list[Rule]) -> list[str]:
    """One line per key whose value breaks its rule (a key absent here, of another option of its group, is skipped)."""
    lines = []
    for key, check, allowed in rules:
        value = select(cfg, key, default=_ABSENT)
        try:
            ok = value is _ABSENT or check(value, cfg)
        except (TypeError, ValueError, KeyError):  # a malformed neighbour it depends on: reported by its own rule
            ok = False
        if not ok:
            lines.append(f"{key}={value!r}: must be {allowed}")
    return lines


def validate(cfg: Config, entry: str, rules: tuple[Rule, ...] = ()) -> None:
    """Raise ConfigError listing every problem of ``cfg`` for ``entry`` (train | sample | evaluate | export) and of its
    command's own ``rules`` (the logger's, export's), after every setting Hydra let through that nothing would read
    (``ddpm.unread``)."""
    from ddpm.unread import unread_settings

    found = unread_settings(cfg, entry)
    if not found:
        found = problems(cfg, [*(TRAIN_KEYS if entry == "train" else []), *rules])
        objects, refused = built(cfg, entry)
        found += refused
        if not found:
            try:
                _relations(cfg, entry, objects)
            except ConfigError as error:
                found.append(str(error).splitlines()[0])
    if found:
        raise ConfigError("\n".join(found))


# The keys that make a checkpoint's model: a file can hold any value at a key it may set.
CHECKPOINT_KEYS = ("model", "process", "objective", "schedule", "diffusion", "guidance", "sampler", "ema", "data")


def check_checkpoint_config(config: dict, source: str) -> None:
    """ConfigError, one line, when a checkpoint's (rebuilt) config holds a value its model could not be built from."""
    _, refused = built({k: config.get(k) for k in CHECKPOINT_KEYS if k in config}, "train")
    if refused:
        raise ConfigError(f"{source}: its config holds " + "; ".join(refused) + " (was the file altered?)")
