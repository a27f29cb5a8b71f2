"""Ctrl+C, honoured at any moment: one line and exit status 130, never a traceback, never swallowed.

- While an entry point imports its dependencies (seconds, before Hydra runs), ``quiet_while_starting`` makes Ctrl+C
  one line ("nothing was written") instead of a traceback from inside an import.
- While ``ddpm.sample`` / ``ddpm.evaluate`` run, ``honour`` records the request (``requested``) and raises
  KeyboardInterrupt, which the entry point turns into its one line; the sampling loop checks ``requested`` at every
  network evaluation (``check``), so an interrupt that some library caught on its way up still stops the run at the
  next step; and a second Ctrl+C ends the process at once, whatever it is doing.
- ``ddpm.train`` has its own: the current step is finished and last.ckpt written first (training/checkpoint.py).

Pure Python: the inference path imports it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

requested = False


def check() -> None:
    """KeyboardInterrupt if Ctrl+C was pressed since ``honour`` (called once per network evaluation while sampling)."""
    if requested:
        raise KeyboardInterrupt


def _starting(signum, frame) -> None:
    print("interrupted (Ctrl+C) while starting: nothing was written", file=sys.stderr, flush=True)
    os._exit(130)


def quiet_while_starting() -> None:
    """Ctrl+C before the command's task begins: one line, exit 130 (the entry modules call this before their imports)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _starting)


def _honoured(signum, frame) -> None:
    global requested
    if requested:  # the second Ctrl+C: whatever held the first one up, stop now
        print("interrupted (Ctrl+C) twice: stopped at once", file=sys.stderr, flush=True)
        os._exit(130)
    requested = True
    raise KeyboardInterrupt


def honour() -> None:
    """From here on (the task of ddpm.sample / ddpm.evaluate), Ctrl+C raises KeyboardInterrupt and is remembered."""
    global requested
    requested = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _honoured)


def default() -> None:
    """Python's own Ctrl+C (KeyboardInterrupt), as before ``quiet_while_starting``: for a task that handles it itself."""
    global requested
    requested = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
