"""Hydra at the entry points: composing a run's config from Python (tests, notebooks), the command line's one-line
errors and exit codes, and the resolvers the configs use. Where the configs live is ``ddpm.options``'s."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.options import config_dir, experiments_root  # noqa: F401  (where conf/ is: ddpm.options's)


# conf/hydra/launcher/submitit_{slurm,local}.yaml fill in the submitit plugin's configs of the same names (tying
# tasks/GPUs/nodes to the trainer); Hydra 1.3 validates them against the plugin's schema, which is what we want,
# and warns that this matching by name is deprecated. hydra-core is pinned below 1.4.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")

# Two messages of Lightning 2.6 printed in every run, silenced one by one (never by category): its own use of a
# torch pytree API that torch 2.14 deprecates, and an advertisement for a logging service.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "try installing [litlogger]" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLitLoggerTip())

# train.yaml adds file://${oc.env:DDPM_EXPERIMENTS_ROOT} to Hydra's search path, so that
# `experiments=NAME` composes a preset from experiments/ like any other config group.
os.environ.setdefault("DDPM_EXPERIMENTS_ROOT", str(experiments_root()))


def presets() -> str:
    """The experiment presets, for --help (Hydra's own list misses the group, which lives on the search path)."""
    return ", ".join(sorted(p.stem for p in (experiments_root() / "experiments").glob("*.yaml")))


OmegaConf.register_new_resolver("ddpm_presets", presets, replace=True)


def slurm_gpus(accelerator: str, devices) -> int | None:
    """GPUs per node for the submitit_slurm launcher: the trainer's devices when it trains on GPUs, none otherwise
    (``trainer=cpu``/``ddp_cpu``, and ``auto``, which cannot know the node it will land on): a CPU partition refuses
    a GPU request ("Invalid generic resource (gres) specification")."""
    return on_gpus(accelerator, devices, None)


def on_gpus(accelerator: str, if_gpus, otherwise):
    """``if_gpus`` for a trainer on GPUs (``trainer.accelerator`` gpu or cuda), else ``otherwise``: the submitit_slurm
    launcher's resources follow the trainer (conf/hydra/launcher/submitit_slurm.yaml)."""
    return if_gpus if str(accelerator) in ("gpu", "cuda") else otherwise


def sampling_guidance() -> dict:
    """The ``guidance`` node of ``ddpm.sample``/``ddpm.evaluate`` (conf/sample.yaml): every sampling setting of
    conf/guidance/cfg.yaml (scale, rescale, interval, method and each method's settings), each set to ``checkpoint``,
    the run's own value (``ddpm.builders.from_checkpoint``). Made from the option file, so a method's new setting can
    be given on the command line with nothing else to edit; label dropout (``conditional``, ``p_uncond``) is how the
    model was trained, not a sampling setting."""
    from ddpm.options import FROM_CHECKPOINT, read_option

    def sentinel(node):
        return {k: sentinel(v) for k, v in node.items()} if isinstance(node, dict) else FROM_CHECKPOINT

    return {k: sentinel(v) for k, v in read_option("guidance", "cfg").items() if k not in ("conditional", "p_uncond")}


def _store_sampling_guidance() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="sampling_guidance", name="checkpoint", node=sampling_guidance())


def speed_switch(fast, plain, *, _root_):
    """A backbone's speed switch (``${ddpm_speed:FAST,PLAIN}`` in its conf/model/ file): ``FAST`` as configured, or
    ``PLAIN``, PyTorch's plain setting, under ``speed=plain`` (``speed.plain: true``). Each backbone names its own
    switches and their two values in its YAML, so the speed option writes no backbone's key."""
    speed = _root_.get("speed") if hasattr(_root_, "get") else None
    return plain if speed is not None and speed.get("plain") is True else fast


_store_sampling_guidance()
OmegaConf.register_new_resolver("ddpm_speed", speed_switch, replace=True)
OmegaConf.register_new_resolver("ddpm_slurm_gpus", slurm_gpus, replace=True)
OmegaConf.register_new_resolver("ddpm_on_gpus", on_gpus, replace=True)


def check_flags(argv: list[str]) -> None:
    """Hydra refuses --cfg together with --multirun with a traceback; say what to do in one line instead."""
    import sys

    flags = set(argv)
    if flags & {"--cfg", "-c"} and flags & {"--multirun", "-m"}:
        print("error: --cfg prints the config of one job: drop --multirun and give one value per swept key "
              "(seed=0 instead of seed=0,1,2)", file=sys.stderr)
        sys.exit(2)


@contextmanager
def _own_global_hydra():
    """Compose with a Hydra of our own even inside a running ``@hydra.main`` app (``ddpm.sample`` rebuilding a
    checkpoint's config from conf/), and give the app its own back afterwards."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    running = Singleton._instances.pop(GlobalHydra, None)
    try:
        yield
    finally:
        Singleton._instances.pop(GlobalHydra, None)
        if running is not None:
            Singleton._instances[GlobalHydra] = running


def compose(overrides: list[str] | None = None, config_name: str = "train", output_dir: str | None = None) -> DictConfig:
    """The config `python -m ddpm.<entry> OVERRIDES` would get, composed without running it.

    With ``output_dir`` the Hydra runtime is filled in too, so ``${hydra:runtime.output_dir}`` (and every
    path under it) resolves there, and the result can be passed straight to ``ddpm.train.train``.
    """
    from hydra.core.hydra_config import HydraConfig

    overrides = list(overrides or [])
    with _own_global_hydra(), initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=output_dir is not None)
        if output_dir is not None:
            from hydra.types import RunMode

            from ddpm.training.rundirs import CREATED

            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.mode = RunMode.RUN  # as `python -m ddpm.<entry>` runs it: a refused run removes what it made
            CREATED.clear()  # a new run: nothing made yet (FreshRunDirs.on_run_start does this on the command line)
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):  # as under @hydra.main, the task sees its config without the hydra node
                del cfg["hydra"]
    return cfg


def build_network(*overrides: str, **kwargs):
    """The network a training config would build (``model=`` and ``data=`` among ``overrides``; unet_tiny on digits by
    default), from conf/model/ as ``ddpm.train`` builds it: benchmarks and scripts measure the configured backbone,
    whichever it is. ``kwargs`` go to its constructor (``second_time=True``)."""
    from ddpm.builders import build_net

    cfg = compose(list(overrides))
    return build_net(OmegaConf.to_container(cfg.model, resolve=True), **kwargs)


def ddp_strategy() -> str:
    """``ddp`` inside a multi-task SLURM job (SLURM started one process per device; Lightning joins them), else
    ``ddp_spawn``: plain ``ddp`` would re-launch ``sys.argv``, which re-runs a whole Hydra multirun per device."""
    return "ddp" if int(os.environ.get("SLURM_NTASKS", "1")) > 1 else "ddp_spawn"


def native_bf16(accelerator: str = "auto") -> bool:
    """Whether the device training would run on computes bfloat16 in hardware: a CUDA GPU of compute capability
    >= 8.0 (Ampere and later), or a CPU with AMX or AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and later;
    AMD Zen 4). Elsewhere bf16 is emulated and slower than float32."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(cfg: DictConfig) -> None:
    """Replace ``trainer.precision=auto`` by what it means on this machine: ``bf16-mixed`` where bf16 is native
    (``native_bf16``), else ``32-true``. Done in place before anything is built, so logs and checkpoints record the
    precision the run actually used."""
    if cfg.trainer.get("precision") == "auto":
        cfg.trainer.precision = "bf16-mixed" if native_bf16(str(cfg.trainer.get("accelerator", "auto"))) else "32-true"


# Whether an entry point's task began. Before it, errors are Hydra's own (an unknown option or key, an override it cannot
# parse): ``cli_main`` has Hydra raise them (HYDRA_FULL_ERROR, set until the task begins) and reports them in one line,
# exit status 2, like every other bad input.
TASK_STARTED = False
_FULL_ERROR_IS_OURS = False


def _task_begins() -> None:
    global TASK_STARTED, _FULL_ERROR_IS_OURS
    TASK_STARTED = True
    if _FULL_ERROR_IS_OURS:  # from here on Hydra reports a task's crash its own way, as without us
        os.environ.pop("HYDRA_FULL_ERROR", None)
        _FULL_ERROR_IS_OURS = False


def hydra_error_line(error: BaseException) -> str:
    """One line from a Hydra composition error: its sentences, the available options listed after them, and the
    OmegaConf error behind it, without the config search path."""
    lines = str(error).splitlines()
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    sentences = [line.strip() for line in lines if line.strip() and not line.startswith("\t")]
    options = [line.strip() for line in lines if line.startswith("\t") and line.strip()]
    text = "; ".join(sentences) + (" " + ", ".join(options) if options else "")
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text


def run_cli(task, cfg: DictConfig):
    """Run an entry point's task; bad input (ConfigError), a run gone non-finite or a file that cannot be written ends
    it with one line per problem on stderr and exit status 2, Ctrl+C with one line and 130, instead of a traceback."""
    import sys

    import ddpm.interrupts as interrupts
    from ddpm.files import WriteError
    from ddpm.core.errors import NonFiniteLossError
    from ddpm.validation import ConfigError

    _task_begins()
    interrupts.honour()  # Ctrl+C from here on: KeyboardInterrupt, remembered; a second one ends the process at once
    try:
        return task(cfg)
    except (ConfigError, NonFiniteLossError, WriteError) as error:
        lines = error_lines(error)
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        if isinstance(error, ConfigError):
            _discard_refused_run(cfg)
        raise TaskRefused(lines) from None
    except KeyboardInterrupt:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):  # clear progress bars, so the line stands alone
            bar.close()
        print(f"interrupted (Ctrl+C): stopped before writing its results to {cfg.get('paths', {}).get('output_dir', '.')}",
              file=sys.stderr)
        _discard_refused_run(cfg)
        sys.exit(130)


class TaskRefused(SystemExit):
    """Exit status 2 after the one-line errors were printed (``run_cli``); carries them, so that a sweep's launcher
    (``ddpm.launchers``) reports a failed job with its own line."""

    def __init__(self, lines: list[str]):
        super().__init__(2)
        self.lines = lines


def cli_main(main) -> None:
    """The command line of an entry point: its flags checked, then ``main`` (its ``@hydra.main``). An error of Hydra's
    own before the task begins (composition, overrides) is one line on stderr and exit status 2."""
    import sys

    global _FULL_ERROR_IS_OURS
    check_flags(sys.argv[1:])
    if "HYDRA_FULL_ERROR" not in os.environ:
        os.environ["HYDRA_FULL_ERROR"], _FULL_ERROR_IS_OURS = "1", True
    try:
        main()
    except KeyboardInterrupt:  # Ctrl+C before the task began (run_cli reports one during it)
        print("interrupted (Ctrl+C) while starting: nothing was written", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        if TASK_STARTED:
            raise
        print(f"error: {hydra_error_line(error)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if _FULL_ERROR_IS_OURS:
            os.environ.pop("HYDRA_FULL_ERROR", None)
            _FULL_ERROR_IS_OURS = False


def _discard_refused_run(cfg: DictConfig) -> None:
    """A single run refused on bad input removes what it made itself, and nothing else (``rundirs.discard_created``); a
    multirun keeps its job folders."""
    from hydra.core.hydra_config import HydraConfig

    from ddpm.training.rundirs import discard_created

    if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.RUN":
        discard_created()


def error_lines(error: Exception) -> list[str]:
    """The lines of an error's message. An error raised in a data-loader worker reaches the main process re-raised
    with the worker's whole traceback as its message ("Caught X in DataLoader worker process 0. Original Traceback
    ..."): only its last line, the original message, is the user's business."""
    lines = str(error).splitlines()
    if lines and lines[0].startswith("Caught ") and "Original Traceback" in str(error):
        original = lines[-1]
        return [original.split(": ", 1)[1] if original.split(": ", 1)[0].endswith(type(error).__name__) else original]
    return lines
