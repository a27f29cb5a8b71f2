"""Run directories that cannot collide, and a clear line when one cannot be written.

Hydra names a run's directory after the clock (``outputs/DATE/TIME``, ``multirun/DATE/TIME``), so two runs started in
the same second would share it: their checkpoints interleave and ``resume=auto`` would continue the other run.
``FreshRunDirs`` is a Hydra callback (``conf/hydra/default.yaml``) that claims a clock-named directory as the run
starts, with ``mkdir``, which fails atomically when the directory exists, and moves on to ``TIME_1``, ``TIME_2``, ...
while another run holds it. A directory you name yourself (``hydra.run.dir=...``, no ``${now:...}`` in it) is taken as
it is: that is how a rerun or a requeued job continues its own run (``resume=auto``).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


def claim(path: Path, attempts: int = 10_000) -> Path:
    """Create ``path``, or the first free ``path_1``, ``path_2``, ... if it exists; return the one created. The mkdir
    is the claim: of two processes racing for one name, exactly one succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(attempts):
        candidate = path if i == 0 else path.with_name(f"{path.name}_{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: {attempts} runs already hold this name")


def check_writable(path: Path) -> None:
    """Create ``path`` if needed and write a file in it (os.access is no test: root passes it on a read-only mount)."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


class FreshRunDirs(Callback):
    """Claim the run's (or the sweep's) directory before Hydra writes into it; see the module docstring. On a
    multirun the claimed directory is also added to the hydra overrides, which every job (basic, submitit, a
    requeued SLURM job) is recomposed from; and the sweep directory is printed with the report command for it."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._claim(config, "run")

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


def discard_if_unused(run_dir: Path) -> bool:
    """Remove a single run's directory that a command refused to start in: one holding nothing but Hydra's
    ``.hydra/*.yaml``, log files and empty folders. Anything else in it (a checkpoint, a grid, a file of yours) keeps
    it. Returns whether it was removed."""
    import shutil

    if not run_dir.is_dir():
        return False
    files = [p for p in run_dir.rglob("*") if not p.is_dir()]
    if any(not (p.suffix == ".log" or (p.parent == run_dir / ".hydra" and p.suffix == ".yaml")) for p in files):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def _quote(value: str) -> str:
    """A Hydra override value, quoted so that any path survives its grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
