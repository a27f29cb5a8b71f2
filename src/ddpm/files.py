"""Files this project writes are its own: written whole or not at all, never through a link someone planted.

``atomic_write`` writes into a hidden temporary beside the target, flushes it to disk and renames it over the target:
a reader sees the old file or the new one, never a torn one, and a symbolic link at the target is replaced, never
followed (a rename replaces the link itself). A full disk or a folder that cannot be written raises ``WriteError``
with one line naming the file, the reason and the room left, and leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from typing import IO, Callable

# Spreadsheet programs evaluate a cell that begins with one of these as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class WriteError(RuntimeError):
    """A file could not be written (disk full, permissions); whatever was there before is intact."""


def temporary_path(path: Path) -> Path:
    """Where ``atomic_write`` writes ``path`` before renaming it: a hidden ``.<name>.tmp`` beside it."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], what: str = "file") -> None:
    """Call ``write`` on a binary file that becomes ``path`` atomically once it returns (see the module docstring)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a temporary a kill left
        with _create(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a full disk as RuntimeError
        _remove(tmp)
        raise WriteError(write_failure(path, error, what)) from None
    except BaseException:  # anything else (Ctrl+C mid-write): no temporary left behind, the error as it is
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _create(path: Path) -> IO[bytes]:
    """A new file at ``path``, open for writing; fails if anything is there, a link included (O_EXCL never follows)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb")


def write_failure(path: Path, error: Exception, what: str) -> str:
    """One line: which file, why, and how much room its disk has."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error) or (free is not None and free < 2**20)
    reason = "no space left on the disk" if full else (str(error).strip().splitlines() or [type(error).__name__])[0]
    room = f" ({free / 2**20:.0f} MiB free in {path.parent})" if free is not None else ""
    return f"could not write {what} {path}: {reason}{room}"


def spreadsheet_safe(value):
    """A CSV cell that no spreadsheet evaluates: a string beginning like a formula gets a leading ' (numbers, which
    a spreadsheet reads as numbers anyway, stay as they are)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value
    return value


class NotARegularFile(OSError):
    """A path that is a FIFO, a device, a socket or a folder where a file is read (it would hang, or never end)."""


def open_regular(path: Path, follow_symlinks: bool = True):
    """``path`` opened for reading, binary, if it is a regular file: opened without blocking (a FIFO would wait for a
    writer forever) and checked on the open descriptor, so nothing can be swapped in between the check and the read.
    ``follow_symlinks=False``: a symbolic link is refused too. NotARegularFile (an OSError) otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotARegularFile(errno.ELOOP, "a symbolic link, not a file of its own", str(path)) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise NotARegularFile(errno.EINVAL, kind, str(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, what: str = "file", limit: int | None = None, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file (``open_regular``), at most ``limit`` of them; ConfigError, one line naming ``what``
    and the file, when it is missing, not a regular file, unreadable or larger than ``limit``."""
    from ddpm.core.errors import ConfigError

    try:
        with open_regular(path, follow_symlinks) as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(f"{what}: {path} cannot be read ({reason})") from None
    if limit is not None and len(data) > limit:
        raise ConfigError(f"{what}: {path} is larger than {limit} bytes, more than such a file ever holds")
    return data
