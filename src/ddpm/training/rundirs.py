"""Run directories that cannot collide, and a clear line when one cannot be written.

Hydra names a run's directory after the clock (``outputs/DATE/TIME``, ``multirun/DATE/TIME``), so two runs started in
the same second would share it: their checkpoints interleave and ``resume=auto`` would continue the other run.
``FreshRunDirs`` is a Hydra callback (``conf/hydra/default.yaml``) that claims a clock-named directory as the run
starts, with ``mkdir``, which fails atomically when the directory exists, and moves on to ``TIME_1``, ``TIME_2``, ...
while another run holds it. A directory you name yourself (``hydra.run.dir=...``, no ``${now:...}`` in it) is taken as
it is: that is how a rerun or a requeued job continues its own run (``resume=auto``).

A run refused on bad input removes only what it made itself: ``FreshRunDirs`` records, as it claims the directory,
which folders it creates and which of Hydra's own files (``.hydra/*.yaml``, the job's log) are not there yet, and
``discard_created`` removes exactly those. A directory that held anything before (your notes, an earlier run) is left
exactly as it was.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


# What this process made for its (single) run: folders it created, outermost first, and the Hydra files it will write
# that were not there before. Filled by FreshRunDirs, emptied by discard_created.
CREATED: list[Path] = []
HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")


def make_dirs(path: Path) -> None:
    """``mkdir -p path``, recording in CREATED each folder that did not exist."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for folder in missing:
        try:
            folder.mkdir()
            CREATED.append(folder)
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
            CREATED.append(candidate)
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
        path = self._claim(config, "run")
        # Hydra writes these next (run_job, after this hook); those not there yet are this run's (folder first, for rmdir)
        for name in (".hydra", *HYDRA_FILES, f"{config.hydra.job.name}.log"):
            if not (path / name).exists():
                CREATED.append(path / name)

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
    with the results; a refused command removes it (it is recorded in CREATED)."""
    make_dirs(run_dir)
    claim = run_dir / f".{entry}.claim"
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise FileExistsError(f"hydra.run.dir={str(run_dir)!r} is already taken by another ddpm.{entry} ({claim.name} is "
                              "there): pick a new hydra.run.dir (or remove that file if no command is using the folder)") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    CREATED.append(claim)


def discard_created() -> list[Path]:
    """Remove what this process recorded in CREATED, innermost first: its files, and its folders once empty. A folder
    that holds anything it did not make stays, with all of it. Returns what was removed."""
    removed = []
    for path in reversed(CREATED):
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
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
