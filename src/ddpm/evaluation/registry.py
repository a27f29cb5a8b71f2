"""The metrics an evaluation reports, each in one place: its name, which way is better, whether its value depends on the
number of samples it was measured on, and what it is. ``ddpm.report`` tables them in this order and compares them this
way; training's logs put the sample count in the name of those that depend on it (``fd_digits_n500``). A Fréchet
distance in another feature space is ``fd_<extractor>`` (a sized metric, lower is better), a kernel distance
``kid_<extractor>`` (unbiased: not sized) with its subsets' spread ``kid_<extractor>_std`` (no better direction). A metric a file holds that
is not here is still tabled, after these, and never ranked. A new metric is its entry here and its computation.
Plain Python: the report reads it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    lower_is_better: bool | None  # None: no better direction (a count, a cost)
    sized: bool                   # its value depends on the sample count (a Fréchet distance is biased by it)
    about: str


METRICS = {m.name: m for m in (
    Metric("fd_digits", True, True, "Fréchet distance in the digits classifier's 128-d features (not FID)"),
    Metric("fd_fashion", True, True, "Fréchet distance in the Fashion-MNIST classifier's 128-d features (not FID)"),
    Metric("fid", True, True, "Fréchet Inception distance (Inception-v3 pool features)"),
    Metric("kid_digits", True, False, "kernel distance (KID, unbiased MMD^2, cubic kernel) in the digits classifier's features"),
    Metric("kid_fashion", True, False, "kernel distance (KID) in the Fashion-MNIST classifier's features"),
    Metric("kid", True, False, "Kernel Inception Distance (Binkowski et al. 2018), mean over 100 subsets"),
    Metric("precision", False, True, "improved precision, k = 3 (Kynkaanniemi et al. 2019)"),
    Metric("recall", False, True, "improved recall, k = 3"),
    Metric("guided_accuracy", False, False, "the feature classifier's accuracy on the requested labels"),
    Metric("diversity", False, False, "the spread of a class's samples relative to the real images' (1: as varied)"),
    Metric("inception_score", False, True, "Inception Score (Salimans et al. 2016)"),
    Metric("bpd", True, False, "bits per dimension of real test images (DDPM: its bound; others: the PF-ODE)"),
)}
QUALITY = tuple(METRICS)  # the order reports table them in


def metric(name: str) -> Metric | None:
    """The metric called ``name``: a registered one, a Fréchet distance in a feature space of its own (``fd_*``), or
    None for a name this project does not know (tabled, never ranked)."""
    if name in METRICS:
        return METRICS[name]
    if name.startswith(("kid_", "kid")) and name.endswith("_std"):
        return Metric(name, None, False, f"the std of {name[:-4]} over its subsets (how much one subset's estimate varies)")
    if name.startswith("fd_"):
        return Metric(name, True, True, f"Fréchet distance in the {name[3:]} features")
    if name.startswith("kid_"):
        return Metric(name, True, False, f"kernel distance (KID) in the {name[4:]} features")
    return None


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of ``name`` is better (the training loss too)."""
    found = metric(name)
    return name == "final_loss" or (found is not None and found.lower_is_better is True)


def sized(metrics: dict, num_samples: int) -> dict:
    """The metrics that depend on the sample count carry it in their name (``fd_digits_n500``, ``recall_n500``): a
    500-sample curve and a 1,000-sample evaluation are different measurements, never one series."""
    return {(f"{key}_n{num_samples}" if (metric(key) or Metric(key, None, False, "")).sized else key): value
            for key, value in metrics.items()}
