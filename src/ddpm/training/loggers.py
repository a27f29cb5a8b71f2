"""Loggers. wandb must never prompt, work with no account and no network, and go online by itself
when the user is logged in."""

from __future__ import annotations

import logging
import netrc
import os
import re
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse


from ddpm.core.errors import ConfigError
from ddpm.files import open_regular

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

# How long an online wandb run may take to start before the run goes offline instead (wandb's own default is 90 s).
INIT_TIMEOUT_S = 10


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why ``url`` gives no HTTP answer within ``timeout`` seconds (None: it answers, whatever the status). A dead
    network, a closed port and a server that accepts but never replies all fail here quickly, where wandb.init would
    wait for its own, much longer timeout."""
    from urllib.error import HTTPError
    from urllib.request import urlopen

    try:
        urlopen(url, timeout=timeout).close()
    except HTTPError:
        return None  # an HTTP status is an answer
    except (OSError, ValueError) as error:  # URLError, timeouts, refused connections; ValueError: a malformed URL
        return str(getattr(error, "reason", None) or error) or type(error).__name__
    return None


def wandb_credentials_available() -> bool:
    """True when wandb has an API key: WANDB_API_KEY or an entry for its host in ~/.netrc (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(wandb_server()).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


WANDB_MODES = ("auto", "online", "offline", "disabled")  # logger.mode
# Its rule, checked with the training config's before anything is built (ddpm.train passes it to validate).
RULES = (("logger.mode", lambda v, _: v in WANDB_MODES, f"one of {list(WANDB_MODES)}"),)


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto``: WANDB_MODE if set, else online with credentials and offline without."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={mode!r}: must be one of {list(WANDB_MODES)}")
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_available() else "offline")


def sweep_identity(experiment: str | None = None) -> tuple[str | None, str | None, dict]:
    """(group, name, overrides) of the running Hydra job: the group is the experiment and the sweep (its directory's
    date and time), shared by every job of a multirun; the name is the job's overrides (``schedule=cosine,seed=1``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None, {}
    hydra_cfg = HydraConfig.get()
    overrides = dict(o.split("=", 1) for o in hydra_cfg.overrides.task if "=" in o and not o.startswith(("hydra", "~")))
    output_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = output_dir.parent if str(hydra_cfg.mode) == "RunMode.MULTIRUN" else output_dir
    group = f"{experiment or 'default'}/{sweep.parent.name}_{sweep.name}"
    name = ",".join(f"{k.lstrip('+')}={v}" for k, v in overrides.items() if k not in ("ckpt_path",)) or "defaults"
    return group, name, overrides


RUN_ID_FILE = "run_id"  # <save_dir>/wandb/run_id: the wandb id of the training run that writes into save_dir
RUN_ID = re.compile(r"[a-z0-9]{1,64}")  # wandb's own ids are 8 of [a-z0-9]; it allows 64


def run_id(save_dir: str | Path) -> str:
    """The wandb run id of the training run in ``save_dir``: read from ``save_dir/wandb/run_id`` when an earlier
    segment of it (a preempted, requeued or rerun job) wrote one, else made and written there now, before the run
    starts. A file that is not such an id is refused in one line (it is an input: it never names another project's
    run by accident, nor anything but a run id)."""
    path = Path(save_dir) / "wandb" / RUN_ID_FILE
    if path.is_symlink() or path.exists():
        try:
            with open_regular(path, follow_symlinks=False) as f:  # not a link, a FIFO or a folder: a file of its own
                text = f.read(101).decode("ascii", "replace").strip()
        except OSError as error:
            text = f"<{error.strerror or error}>"
        if not RUN_ID.fullmatch(text):
            raise ConfigError(f"logger=wandb: {path} should hold this run's wandb id (1-64 of a-z, 0-9), and holds "
                              f"{text[:20]!r}: remove it to start a new wandb run, or restore it")
        return text
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"logger=wandb: {path.parent} cannot be made a folder ({error.strerror or error}): the run's "
                          "wandb files go there; move what is in the way") from None
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb makes its ids
    # Written whole to a temporary file, then linked into place: the link is atomic and fails if the name exists, so a
    # kill mid-write leaves no empty run_id (which would refuse every later segment), and of two segments started at
    # once one id wins and both use it.
    temporary = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}.{new}.tmp")
    try:
        temporary.write_text(new + "\n")
        os.link(temporary, path)
    except FileExistsError:
        return run_id(save_dir)
    finally:
        temporary.unlink(missing_ok=True)
    return new


def _logger_class():
    from lightning.pytorch.loggers import WandbLogger  # here, not above: validation reads WANDB_MODES without Lightning

    class StepWandbLogger(WandbLogger):
        """Lightning's WandbLogger, logging each row at wandb step = the trainer's step (never backwards), not at
        wandb's own counter: the segments of a resumed run then hold disjoint, increasing steps, the one axis wandb
        needs to join them (online resume, and ``wandb sync`` of several offline segments of one id)."""

        _last_step = -1

        def log_metrics(self, metrics, step=None):
            if _service_dead():  # the job's SIGTERM reached it: the step being finished logs nowhere, and goes on
                return
            try:
                if step is None:
                    return super().log_metrics(metrics, step)
                self._last_step = max(self._last_step, int(step))  # an image logged at step k before the loss of k - 1
                self.experiment.log(dict(metrics, **{"trainer/global_step": step}), step=self._last_step)
            except ConnectionError:  # it died while this row was sent
                if not _service_dead():
                    raise

    return StepWandbLogger


def wandb_logger(project: str, save_dir: str, mode: str = "auto", group: str | None = "auto", name: str | None = "auto",
                 experiment: str | None = None, flush_interval_s: float = 1.0, **kwargs) -> WandbLogger:
    """A WandbLogger whose run lives under the run directory (``save_dir/wandb``). ``auto`` group and name come from
    the Hydra job (see ``sweep_identity``); the job's overrides are logged as config fields under ``sweep``.

    One training run is one wandb run: its id is kept in the run directory (``run_id``) and every later segment (a
    requeued job, a rerun in the same directory) resumes it (``resume="allow"``), logging at the trainer's step.
    ``flush_interval_s``: how often wandb's service writes what it was sent to the run's file (its default is 15 s):
    what a SIGTERM to the whole job (scancel, scontrol requeue) can lose, since the service dies of it at once."""
    import wandb

    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"logger=wandb: {save_dir} cannot be made a folder ({error.strerror or error})") from None
    auto_group, auto_name, overrides = sweep_identity(experiment)
    mode = resolve_wandb_mode(mode)
    sync = f"upload it later with: wandb sync {Path(save_dir) / 'wandb'}/offline-run-*"
    if mode == "online" and (reason := unreachable(wandb_server())):
        log.warning("wandb: cannot reach %s (%s): logging offline instead; %s", wandb_server(), reason, sync)
        mode = "offline"
    if mode != "disabled":
        kwargs.setdefault("id", run_id(save_dir))
        kwargs.setdefault("resume", "allow")
    settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S, x_transaction_log_flush_interval=float(flush_interval_s))

    def start(mode: str) -> WandbLogger:
        logger = _logger_class()(project=project, save_dir=save_dir, mode=mode, settings=settings,
                                 group=auto_group if group == "auto" else group, name=auto_name if name == "auto" else name,
                                 **kwargs)
        logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns that it has no effect
        logger.experiment  # start the run now: a failure surfaces here, before any compute
        return logger

    try:
        logger = start(mode)
    except Exception as error:  # wandb raises its own error types for auth, network and timeouts
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if mode != "online":
            raise ConfigError(f"logger=wandb: wandb could not start ({reason}); use logger=csv, or logger.mode=disabled") from None
        log.warning("wandb: the online run did not start within %d s (%s): logging offline instead; %s", INIT_TIMEOUT_S, reason, sync)
        logger = start("offline")
    if overrides:
        logger.log_hyperparams({"sweep": {"overrides": overrides, **{k.lstrip("+"): v for k, v in overrides.items()}}})
    return logger


def finish_wandb(service_too: bool = False) -> None:
    """Close the wandb run, so the next job of a multirun in this process starts its own, and everything logged is in
    its file before the process exits; ``service_too``: stop wandb's service as well (the process is about to end).
    Where the service is already dead (a SIGTERM sent to the whole job, as scancel and scontrol requeue do, stops it
    at once), the run is let go without the teardown traceback wandb would print, and the loss is said in one line:
    the file holds what was flushed (every ``flush_interval_s``)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    if not _service_dead():
        if wandb.run is not None:
            wandb.finish()
        if service_too:
            wandb.teardown()
        return
    if wandb.run is None:
        return
    run = wandb.run
    log.warning("wandb: its service stopped before the run finished (the same signal reached it); the run file holds "
                "what it had flushed, up to logger.flush_interval_s before the signal; the next segment resumes the run")
    _let_go(wandb, run)


def _service_dead() -> bool:
    """Whether the wandb service process this process started has exited (False where that cannot be told)."""
    from wandb.sdk import wandb_setup

    connection = getattr(wandb_setup.singleton(), "_connection", None)
    process = getattr(getattr(connection, "_proc", None), "_process", None)
    return process is not None and process.poll() is not None


def _let_go(wandb, run) -> None:
    """Forget a run whose service is gone: no finish, no exit-time teardown, no console capture writing to a closed
    socket. wandb has no public call for this (its finish and teardown both talk to the service), so these are its
    private attributes; tests/test_train.py fails when a wandb release renames them."""
    import logging as logging_

    from wandb.sdk import wandb_setup

    run._console_stop()
    connection = wandb_setup.singleton()._connection
    connection.teardown = lambda exit_code: None  # the atexit hook wandb registered calls it
    wandb_setup.singleton()._connection = None  # a later run in this process starts a new service
    run._atexit_cleanup_called = True
    wandb.run = None
    logging_.getLogger("asyncio").setLevel(logging_.CRITICAL)  # its "socket.send() raised exception" at exit
