"""Run directories that cannot collide, a record of each run written only by the command that owns its directory, and
a clear line when one cannot be written.

Hydra names a run's directory after the clock (``outputs/DATE/TIME``, ``multirun/DATE/TIME``), so two runs started in
the same second would share it: their checkpoints interleave and ``resume=auto`` would continue the other run.
``FreshRunDirs`` is a Hydra callback (``conf/hydra/default.yaml``) that claims a clock-named directory as the run
starts, with ``mkdir``, which fails atomically when the directory exists, and moves on to ``TIME_1``, ``TIME_2``, ...
while another run holds it. A directory you name yourself (``hydra.run.dir=...``, no ``${now:...}`` in it) is taken as
it is: that is how a rerun or a requeued job continues its own run (``resume=auto``).

A command owns the directory it writes into: ``ddpm.train`` holds a lock on it while it runs (``lock_run_dir``; a second
``ddpm.train`` into the same folder at the same time is refused, and the lock ends with the process however it ends),
``ddpm.sample`` and ``ddpm.evaluate`` claim it (``claim_outputs``). Hydra's record of the job (``.hydra/config.yaml``,
``hydra.yaml``, ``overrides.yaml``, which ``ddpm.report`` reads) and its log file are written by ``commit``, once the
command owns the folder and its start-up checks passed; until then log lines are held in memory. So a refused
command, or the loser of two started at once, never replaces the owner's record.

A command refused before it commits removes what it made itself, judged by what it made (each file recorded with its
inode when it was created) and not by file names: ``discard_created``. A directory that held anything before (your
notes, an earlier run) is left exactly as it was; after ``commit`` nothing is removed on an error.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


# What this process made for its (single) run before it committed: (path, inode), outermost first; the inode is None
# for a folder (removed only when empty). Filled by FreshRunDirs and the claims, emptied by commit and discard_created.
CREATED: list[tuple[Path, int | None]] = []
RECORD_DIR = ".hydra"  # where commit writes Hydra's record of the job: config.yaml, hydra.yaml, overrides.yaml
# The running job's config (its hydra node included) and the log records held until it commits (FreshRunDirs).
_JOB: dict = {}
MAX_HELD_RECORDS = 10_000


def _created(path: Path, is_file: bool = True) -> None:
    CREATED.append((path, os.stat(path).st_ino if is_file else None))


class _HeldRecords(logging.Handler):
    """The job's log records until its log file exists (``commit``), at most MAX_HELD_RECORDS of them."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < MAX_HELD_RECORDS:
            self.records.append(record)


def make_dirs(path: Path) -> None:
    """``mkdir -p path``, recording in CREATED each folder that did not exist."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for folder in missing:
        try:
            folder.mkdir()
            _created(folder, is_file=False)
        except FileExistsError:  # made by another process meanwhile: not ours
            pass


def claim(path: Path, attempts: int = 10_000) -> Path:
    """Create ``path``, or the first free ``path_1``, ``path_2``, ... if it exists; return the one created. The mkdir
    is the claim: of two processes racing for one name, exactly one succeeds."""
    make_dirs(path.parent)
    for i in range(attempts):
        candidate = path if i == 0 else path.with_name(f"{path.name}_{i}")
        try:
            candidate.mkdir()
            _created(candidate, is_file=False)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: {attempts} runs already hold this name")


def check_writable(path: Path) -> None:
    """Create ``path`` if needed and write a file in it (os.access is no test: root passes it on a read-only mount)."""
    make_dirs(path)
    with tempfile.TemporaryFile(dir=path):
        pass


class FreshRunDirs(Callback):
    """Claim the run's (or the sweep's) directory before Hydra writes into it; see the module docstring. On a
    multirun the claimed directory is also added to the hydra overrides, which every job (basic, submitit, a
    requeued SLURM job) is recomposed from; and the sweep directory is printed with the report command for it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        CREATED.clear()
        self._claim(config, "run")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        """Each job (the run, or each job of a multirun in this process): keep its config and hold its log records
        until it commits."""
        held = _JOB.get("held")
        if held is not None:
            logging.getLogger().removeHandler(held)
        _JOB.clear()
        _JOB.update(config=config, held=_HeldRecords())
        logging.getLogger().addHandler(_JOB["held"])

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        held = _JOB.pop("held", None)
        if held is not None:
            logging.getLogger().removeHandler(held)
        file_handler = _JOB.pop("file", None)
        if file_handler is not None:
            logging.getLogger().removeHandler(file_handler)
            file_handler.close()
        _JOB.clear()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        path = self._claim(config, "sweep")
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={_quote(str(path))}")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        directory = config.hydra.sweep.dir
        print(f"sweep directory: {directory}\nreport: python -m ddpm.report {directory}", flush=True)

    @staticmethod
    def _claim(config: DictConfig, kind: str) -> Path:
        node = config.hydra[kind]
        by_clock = "${now:" in str(OmegaConf.to_container(node, resolve=False)["dir"])
        path = Path(str(node.dir))
        try:
            if by_clock:
                path = claim(path)
                with read_write(config.hydra), open_dict(config.hydra):
                    node.dir = str(path)
            else:
                check_writable(path)
        except OSError as error:
            print(f"error: hydra.{kind}.dir={str(path)!r}: cannot write there ({error.strerror or error}); "
                  f"pick a writable directory with hydra.{kind}.dir=...", file=sys.stderr)
            sys.exit(2)
        return path


def claim_outputs(run_dir: Path, entry: str) -> None:
    """Claim ``run_dir`` for one ``ddpm.<entry>`` (sample, evaluate): create ``.<entry>.claim`` in it, which fails
    atomically when it exists, so of two commands given one ``hydra.run.dir`` exactly one goes on. The claim stays
    with the results; a command refused before it commits removes it. A folder that already holds another command's
    record (``.hydra/``, of a training run, say) is not claimed: its record would be replaced."""
    make_dirs(run_dir)
    claim = run_dir / f".{entry}.claim"
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise FileExistsError(f"hydra.run.dir={str(run_dir)!r} is already taken by another ddpm.{entry} ({claim.name} is "
                              "there): pick a new hydra.run.dir (or remove that file if no command is using the folder)") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    _created(claim)
    if (run_dir / RECORD_DIR).exists():
        raise FileExistsError(f"hydra.run.dir={str(run_dir)!r} already holds the record of another command ({RECORD_DIR}/): "
                              f"pick a new hydra.run.dir for ddpm.{entry}")


_LOCKS: dict[Path, int] = {}  # run directory -> the descriptor holding its lock (for the life of the process)


def lock_run_dir(run_dir: Path, entry: str = "train") -> None:
    """Hold an exclusive lock on ``run_dir/.<entry>.lock`` for the rest of this process: a second ``ddpm.<entry>``
    started into the same folder while this one runs is refused in one line (ConfigError). The operating system
    releases the lock when the process ends, however it ends (a kill, a preemption), so a requeued job or a rerun
    takes it again; the file itself stays (the record that the folder is a run's)."""
    from ddpm.core.errors import ConfigError

    run_dir = Path(run_dir)
    if run_dir.resolve() in _LOCKS:
        return
    make_dirs(run_dir)
    path = run_dir / f".{entry}.lock"
    existed = path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r}: cannot lock it for this run ({path.name}: "
                          f"{error.strerror or error})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r} is in use by another ddpm.{entry} running now: wait for it to "
                          "end (this command then resumes it), or pick another hydra.run.dir") from None
    if not existed:
        _created(path)
    _LOCKS[run_dir.resolve()] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Release ``lock_run_dir``'s lock (``ddpm.train`` when its run ends; the process ending does it too)."""
    fd = _LOCKS.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def commit(run_dir: Path) -> None:
    """The command owns ``run_dir`` and has passed its start-up checks: write Hydra's record of its job
    (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``, atomically, as Hydra would have at the start) and start
    its log file (``<entry>.log``, appended to) with the lines logged so far. What it creates is recorded like the rest
    (an interrupted ``ddpm.sample`` leaves the folder as it found it) until ``settle``. Outside a Hydra job
    (``train(compose(...))`` from Python) there is no record to write."""
    from ddpm.files import atomic_write

    config = _JOB.get("config")
    if config is None or _JOB.get("committed"):
        return
    run_dir = Path(run_dir)
    task = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
    parts = {"config.yaml": task, "hydra.yaml": OmegaConf.masked_copy(config, "hydra"),
             "overrides.yaml": config.hydra.overrides.task}
    make_dirs(run_dir / RECORD_DIR)
    for name, node in parts.items():
        text, path = OmegaConf.to_yaml(node), run_dir / RECORD_DIR / name
        existed = path.exists()
        atomic_write(path, lambda f, text=text: f.write(text.encode()), what="run record")
        if not existed:
            _created(path)
    log_path = run_dir / f"{config.hydra.job.name}.log"
    existed = log_path.exists()
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    if not existed:
        _created(log_path)
    console = next((h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler) and h.formatter is not None), None)
    handler.setFormatter(console.formatter if console is not None else logging.Formatter("%(message)s"))
    held = _JOB.pop("held", None)
    if held is not None:
        logging.getLogger().removeHandler(held)
        for record in held.records:
            handler.handle(record)
    logging.getLogger().addHandler(handler)
    _JOB.update(file=handler, committed=True)


def settle() -> None:
    """What the command made stays, whatever happens next (a training run from its first step on, a sample or an
    evaluation once its results are written): ``discard_created`` then removes nothing."""
    CREATED.clear()


def discard_created() -> list[Path]:
    """Remove what this process recorded in CREATED (it was refused before it committed), innermost first: each file
    only if it is still the one it created (the same inode: never one another command put there since), each folder
    only once empty. A folder that holds anything it did not make stays, with all of it. Returns what was removed."""
    removed = []
    file_handler = _JOB.get("file")
    if file_handler is not None:  # the log file is about to go: stop writing it
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()
    for path, inode in reversed(CREATED):
        try:
            if inode is not None:
                if os.lstat(path).st_ino != inode:
                    continue
                path.unlink()
            elif path.is_dir() and not path.is_symlink():
                path.rmdir()  # only when empty: never a tree
            else:
                continue
            removed.append(path)
        except OSError:
            pass
    CREATED.clear()
    return removed


def _quote(value: str) -> str:
    """A Hydra override value, quoted so that any path survives its grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
