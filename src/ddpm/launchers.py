"""Hydra's submitit launchers (``hydra/launcher=submitit_slurm`` and ``submitit_local``), made to finish a sweep
(the classes themselves are in ``hydra_plugins.ddpm_launchers``, the only place Hydra looks for launchers):

- a job that stops on bad input (exit 2, its own one-line ``error:``) returns a failed result instead of crashing, so
  the launcher waits for every other job and then prints one line per job: finished, or failed with that error;
- an sbatch refusal (a partition, a GPU request, memory the nodes lack) is one line naming the launcher keys to change.

The launcher object is what submitit pickles into every job, so this module imports nothing heavy, and neither does
``ddpm.train``, whose ``main`` it carries (tests/test_layout.py): submitit's preemption handler is then installed
within about a second of the job starting (issue 18, item 6).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus

log = logging.getLogger(__name__)

# sbatch's refusals, and the launcher keys behind them (the first that matches; "account/partition" is the account's).
SBATCH_HINTS = (
    (r"account", "hydra.launcher.account"),
    (r"qos", "hydra.launcher.qos"),
    (r"generic resource|gres|gpu", "hydra.launcher.gpus_per_node / gres (a CPU partition takes none: trainer=cpu or ddp_cpu)"),
    (r"partition", "hydra.launcher.partition (sinfo lists them)"),
    (r"node configuration is not available|memory|cpu count|mem", "hydra.launcher.mem_gb / cpus_per_task / nodes "
     "(more than any node of the partition has)"),
    (r"time limit", "hydra.launcher.timeout_min"),
)


class JobFailed(RuntimeError):
    """A job of the sweep stopped on its own error (its one line is the message)."""


class SweepIncomplete(RuntimeError):
    """Some jobs of a sweep failed; the others finished."""


def sbatch_error_line(error: BaseException) -> str | None:
    """``sbatch refused ...; change hydra.launcher.X`` from a submission error, or None when it is not one."""
    parts = [error, getattr(error, "output", None) or "", getattr(error, "stderr", None) or ""]
    text = "\n".join(p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in parts)
    line = next((l.strip() for l in text.splitlines() if "sbatch: error:" in l and "Batch job submission failed" in l),
                next((l.strip() for l in text.splitlines() if "sbatch: error:" in l), None))
    if line is None:
        return None
    reason = line.split("sbatch: error:", 1)[1].strip()
    keys = next((hint for pattern, hint in SBATCH_HINTS if re.search(pattern, reason, re.IGNORECASE)),
                "the hydra.launcher.* settings (conf/hydra/launcher/submitit_slurm.yaml)")
    return f"sbatch refused the sweep's jobs ({reason}): change {keys}"


def swept(every_job: Sequence[Sequence[str]], overrides: Sequence[str]) -> list[str]:
    """The overrides of one job that the sweep varies (``seed=1``), not those every job shares."""
    shared = set.intersection(*(set(job) for job in every_job)) if len(every_job) > 1 else set(overrides)
    return [o for o in overrides if o not in shared and not o.startswith("hydra")]


def quiet_submitit_signals() -> None:
    """In a submitit job, submitit's handler for SIGTERM and SIGCONT (``bypass``) ignores them and logs that, from
    inside the signal. A signal lands between two bytecodes, perhaps in the middle of a record being written to the same
    file, which logging then re-enters (``RuntimeError: reentrant call``, printed as a traceback into train.log: CI found
    it, as scontrol requeue sends both while submitit logs "Requeued job", and SLURM sends SIGCONT before each signal).
    Both keep submitit's meaning, ignored: SIGTERM is noted with one write(2) (no Python buffer, no lock), SIGCONT left
    to its default (the process continues). A handler that is not submitit's is left alone."""
    import signal
    import threading

    from submitit.core.job_environment import SignalHandler

    if threading.current_thread() is not threading.main_thread():
        return
    for signum, quiet in ((signal.SIGTERM, _noted_and_ignored), (signal.SIGCONT, signal.SIG_DFL)):
        if getattr(signal.getsignal(signum), "__func__", None) is SignalHandler.bypass:
            signal.signal(signum, quiet)


def _noted_and_ignored(signum, frame) -> None:
    import os
    import signal

    os.write(2, f"{signal.Signals(signum).name}: ignored, as submitit does (the job ends on its own)\n".encode())


class FinishTheSweep:
    """Mixed into a submitit launcher before it (hydra_plugins/ddpm_launchers: the classes Hydra finds)."""

    def __call__(self, sweep_overrides, *args, **kwargs) -> JobReturn:
        from ddpm.config import TaskRefused

        quiet_submitit_signals()  # this runs in the job, after submitit installed its handlers
        try:
            return super().__call__(sweep_overrides, *args, **kwargs)
        except TaskRefused as refused:  # bad input in this job: one line, already printed to its own log
            result = JobReturn(overrides=list(sweep_overrides), status=JobStatus.FAILED)
            result._return_value = JobFailed(refused.lines[0] if refused.lines else "refused")
            return result

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            results = super().launch(job_overrides, initial_job_idx)
        except Exception as error:
            line = sbatch_error_line(error)
            if line is None:
                raise
            raise SweepIncomplete(line) from None
        failed = 0
        for index, (overrides, result) in enumerate(zip(job_overrides, results), start=initial_job_idx):
            shown = " ".join(swept(job_overrides, overrides)) or "its only job"
            if result.status == JobStatus.FAILED:
                failed += 1
                error = result._return_value
                print(f"job {index} ({shown}): failed: {error}", flush=True)
            else:
                print(f"job {index} ({shown}): finished", flush=True)
        if failed:
            raise SweepIncomplete(f"{failed} of {len(results)} jobs failed (listed above, each with its own error); "
                                  "the others finished")
        return results
