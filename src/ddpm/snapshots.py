"""Reading the power-EMA snapshots of a run, and the post-hoc EMA rebuilt from them (Karras et al. 2024, sec. 3).

During training ``ddpm.training.snapshots.EMASnapshots`` writes ``ema_snapshots/ema_<step>.pt``: the weights of each
tracked power EMA (``ema.sigma_rels``), in ``ema.snapshot_dtype``. After training, ``posthoc_state_dict`` turns the
snapshots of a run into the weights of an EMA of any length ``sigma_rel``, by least squares over the snapshots'
averaging profiles. No Lightning here: the Python API (``ddpm.load(..., ema=0.1)``) reads them too.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ddpm.core.ema import MAX_SIGMA_REL, combine, posthoc_coefficients, profile_fit_error, sigma_rel_to_gamma
from ddpm.core.errors import ConfigError
from ddpm.files import open_regular

log = logging.getLogger(__name__)

# ema.source of ddpm.sample/evaluate: the tracked EMA of that width if the checkpoint has one, else rebuilt (auto);
# only the tracked one (tracked); always rebuilt from the snapshots (posthoc).
EMA_SOURCES = ("auto", "tracked", "posthoc")


# ema.snapshot_dtype: how snapshots are stored. The post-hoc rebuild sums them in float64 whatever they are stored in.
SNAPSHOT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def snapshot_step(path: Path) -> int | None:
    """The step in a snapshot's name (``ema_0000050.pt`` -> 50); None for any other name."""
    match = re.fullmatch(r"ema_(\d+)\.pt", path.name)
    return int(match.group(1)) if match else None


def snapshot_dir(ckpt_path: str | Path) -> Path:
    """Where a run's snapshots live: ``<run>/ema_snapshots`` for a checkpoint ``<run>/checkpoints/last.ckpt``."""
    return Path(ckpt_path).expanduser().resolve().parent.parent / "ema_snapshots"


# A snapshot holds one state dict per tracked width (EDM2 tracks 2); a rebuild solves a least-squares problem over all
# (snapshot, width) profiles, whose Gram matrix grows with the square of their count. Bounds on both, far above any
# run's (40 snapshots x 2 widths by default), so a file that lists one state dict thousands of times (pickle stores it
# once: 200 KB) is refused at once rather than costing minutes and gigabytes.
MAX_WIDTHS = 16
MAX_PROFILES = 8192
UNSET = object()


def read_snapshot(path: Path, reference: dict[str, torch.Tensor] | None = None, run_identity=UNSET) -> dict:
    """A snapshot file, checked to be one of this model and this run: a regular file (not a link, a FIFO or a folder),
    a step, as many widths as state dicts (at most MAX_WIDTHS), each state dict with ``reference``'s keys
    and shapes (default: its first one's) and finite values, and the ``run_identity`` of the checkpoint it is read for
    (when given: snapshots of another run, or a folder linked from one, are refused). ConfigError, one line, naming
    the file otherwise."""
    import io

    where = f"ema.snapshots: {path}"
    try:
        with open_regular(path, follow_symlinks=False) as f:
            data = f.read()
    except OSError as error:
        raise ConfigError(f"{where}: not a snapshot file of its own ({error.strerror or error}): snapshots are read from "
                          "plain files of the run only") from None
    try:
        snapshot = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # zero bytes, truncated, a pickle of Python objects, text: torch raises many kinds
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ConfigError(f"{where}: not a readable EMA snapshot ({reason})") from None
    fields = {"step": int, "sigma_rels": list, "gammas": list, "state_dicts": list}
    if not isinstance(snapshot, dict) or any(not isinstance(snapshot.get(k), t) or isinstance(snapshot.get(k), bool)
                                             for k, t in fields.items()):
        raise ConfigError(f"{where}: not an EMA snapshot of ddpm.train (it needs an integer step and lists sigma_rels, "
                          "gammas and state_dicts)")
    identity = snapshot.get("run_identity")
    if run_identity is not UNSET and not (isinstance(identity, (str, type(None))) and identity == run_identity):
        raise ConfigError(f"{where}: written by another training run (its run_identity is "
                          f"{str(identity)[:40]!r}, the checkpoint's {run_identity!r}): snapshots must be "
                          "this run's (is ema_snapshots/ a copy or link of another run's?)")
    if len(snapshot["state_dicts"]) > MAX_WIDTHS:
        raise ConfigError(f"{where}: lists {len(snapshot['state_dicts'])} state dicts; a snapshot holds one per tracked width, "
                          f"at most {MAX_WIDTHS}")
    if not len(snapshot["sigma_rels"]) == len(snapshot["gammas"]) == len(snapshot["state_dicts"]) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*snapshot["sigma_rels"], *snapshot["gammas"]]):
        raise ConfigError(f"{where}: its sigma_rels, gammas and state_dicts do not match one to one")
    for width, gamma in zip(snapshot["sigma_rels"], snapshot["gammas"]):
        if not 0 < width < MAX_SIGMA_REL or abs(gamma - sigma_rel_to_gamma(width)) > 1e-6 * max(1.0, abs(gamma)):
            raise ConfigError(f"{where}: holds an EMA of sigma_rel {width} with gamma {gamma}, which do not belong together "
                              "(EDM2 eq. 3)")
    if snapshot_step(path) is not None and snapshot_step(path) != snapshot["step"]:
        raise ConfigError(f"{where}: holds step {snapshot['step']}, its name says {snapshot_step(path)}")
    if reference is None and snapshot["state_dicts"] and isinstance(snapshot["state_dicts"][0], dict):
        reference = {k: v for k, v in snapshot["state_dicts"][0].items() if isinstance(v, torch.Tensor)}
    for state in snapshot["state_dicts"]:
        if not isinstance(state, dict) or reference is None or set(state) != set(reference) or any(
                not isinstance(state[k], torch.Tensor) or state[k].shape != reference[k].shape for k in reference):
            raise ConfigError(f"{where}: not a snapshot of this checkpoint's model (its weights have other names or shapes)")
        if any(v.is_floating_point() and not torch.isfinite(v).all() for v in state.values()):
            raise ConfigError(f"{where}: holds non-finite weights (a run that went NaN?); remove it, or point ema.snapshots at "
                              "a clean copy")
    return snapshot


def posthoc_state_dict(directory: str | Path, sigma_rel: float, step: int | None = None,
                       sources: list[float] | None = None, reference: dict[str, torch.Tensor] | None = None,
                       run_identity=UNSET, linked_ok: bool = True) -> tuple[dict, dict]:
    """The weights of a power EMA of relative width ``sigma_rel`` at ``step`` (default: the last snapshot), as a
    least-squares combination of the snapshots in ``directory`` up to that step (of the EMAs of width in ``sources``;
    default all); and a description for the protocol. ``reference``: the model's state dict, which every snapshot must
    match (default: the first snapshot's); ``run_identity``: the checkpoint's, which every snapshot must carry (see
    ``read_snapshot``); ``linked_ok=False``: ``directory`` itself must be a folder, not a link to one (the run's own
    ``ema_snapshots``)."""
    directory = Path(directory)
    if not linked_ok and directory.is_symlink():
        raise ConfigError(f"ema.snapshots: {directory} is a link, not this run's own folder of snapshots; name the folder "
                          "explicitly (ema.snapshots=...) to read another one")
    files = sorted(p for p in directory.glob("ema_*.pt") if snapshot_step(p) is not None)
    if len(files) > MAX_PROFILES:
        raise ConfigError(f"ema.snapshots: {directory} holds {len(files)} snapshots, more than the {MAX_PROFILES} a rebuild "
                          "solves over; move the older ones aside, or snapshot less often")
    if step is not None:
        files = [f for f in files if snapshot_step(f) <= step]
    if not files:
        upto = f" up to step {step}" if step is not None else ""
        raise ConfigError(f"ema.sigma_rel={sigma_rel}: no EMA snapshots in {directory}{upto} (train with ema.sigma_rels set and "
                          "ema.snapshot_count > 0, or point ema.snapshots at them)")
    try:
        gamma = sigma_rel_to_gamma(sigma_rel)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    first = read_snapshot(files[0], reference, run_identity)
    reference = reference if reference is not None else first["state_dicts"][0]
    snapshots = [first, *(read_snapshot(f, reference, run_identity) for f in files[1:])]
    step = step if step is not None else max(s["step"] for s in snapshots)
    steps, gammas, states = [], [], []
    for s in snapshots:
        for width, g, state in zip(s["sigma_rels"], s["gammas"], s["state_dicts"]):
            if sources is not None and not any(abs(width - w) < 1e-9 for w in sources):
                continue
            steps.append(s["step"]), gammas.append(g), states.append(state)
    if not states:
        raise ConfigError(f"ema.sources={sources}: no snapshot in {directory} tracks those widths")
    if len(states) > MAX_PROFILES:
        raise ConfigError(f"ema.snapshots: {directory} holds {len(states)} EMA profiles, more than the {MAX_PROFILES} a "
                          "rebuild solves over; rebuild from fewer widths (ema.sources=[...])")
    coefficients = posthoc_coefficients(steps, gammas, step, gamma)
    fit = profile_fit_error(steps, gammas, step, gamma, coefficients)
    if fit > 0.02:
        log.warning("ema.sigma_rel=%g: the snapshots rebuild its averaging profile only to %.1f%% (L2); the weights can be "
                    "off by several times that: snapshot more often (ema.snapshot_count) for a closer EMA", sigma_rel, 100 * fit)
    info = {"sigma_rel": sigma_rel, "gamma": gamma, "step": step, "snapshots": len(files), "profiles": len(states),
            "last_snapshot_step": max(s["step"] for s in snapshots), "profile_fit_error": round(fit, 5),
            "snapshot_sigma_rels": sorted({s for snap in snapshots for s in snap["sigma_rels"]} if sources is None else sources)}
    combined = combine(states, coefficients)
    if any(v.is_floating_point() and not torch.isfinite(v).all() for v in combined.values()):
        raise ConfigError(f"ema.sigma_rel={sigma_rel}: the rebuild from {directory} is not finite (ill-conditioned snapshots?); "
                          "use ema.source=tracked or other ema.sources")
    return combined, info
