"""The statistics behind a report's findings: is a difference between two settings larger than seed noise?

Two settings measured over seeds are compared with a t-test at 95%: paired when both were run with the same seeds
(the same seed means the same initialisation and batch order in both, so the per-seed differences cancel what the
seeds share), Welch's unequal-variance test otherwise (with Welch-Satterthwaite degrees of freedom). With n = 3 a
t interval is wide (its critical value is 4.30 for a paired test, about 2.8 for Welch's), and a finding says "cannot
tell apart at n = 3" when that is the truth, instead of the two-standard-error rule, which at n = 3 claims a
difference at roughly 85-90% confidence.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy.stats import t as student_t

LEVEL = 0.95  # confidence of the intervals; a finding claims a difference when p < 1 - LEVEL


@dataclass(frozen=True)
class Comparison:
    """mean(a) - mean(b) (paired: the mean per-seed difference), its confidence interval and two-sided p-value."""

    test: str  # "paired t-test" | "Welch's t-test"
    n: tuple[int, int]  # seeds on each side (paired: the shared seeds, twice)
    difference: float
    low: float
    high: float
    p: float
    df: float

    @property
    def clear(self) -> bool:
        return self.p < 1 - LEVEL

    def describe(self) -> str:
        n = f"n = {self.n[0]}" if self.n[0] == self.n[1] else f"n = {self.n[0]} and {self.n[1]}"
        return (f"{self.test}, {n}: difference {self.difference:.4g}, {LEVEL:.0%} CI [{self.low:.4g}, {self.high:.4g}], "
                f"p = {self.p:.3g}")


def compare(a: dict, b: dict) -> Comparison | None:
    """Compare the values of two settings, each ``{seed: value}``. Paired on the seeds they share when both sides
    were run with exactly the same seeds (at least two); Welch's test otherwise. None when a side has fewer than two
    values: one run has no spread to measure a gap against."""
    if len(a) < 2 or len(b) < 2:
        return None
    if set(a) == set(b):
        return paired([a[s] for s in sorted(a)], [b[s] for s in sorted(a)])
    return welch(list(a.values()), list(b.values()))


def paired(a: list[float], b: list[float]) -> Comparison:
    """Paired t-test on the differences a_i - b_i (df = n - 1)."""
    d = [x - y for x, y in zip(a, b)]
    n, mean = len(d), statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(n)
    return _comparison("paired t-test", (n, n), mean, se, n - 1)


def welch(a: list[float], b: list[float]) -> Comparison:
    """Welch's t-test: t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b), df by Welch-Satterthwaite."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    return _comparison("Welch's t-test", (len(a), len(b)), statistics.fmean(a) - statistics.fmean(b), se, df)


def _comparison(test: str, n: tuple[int, int], difference: float, se: float, df: float) -> Comparison:
    if se == 0:  # no spread at all: any non-zero difference is certain, a zero one is none
        p = 0.0 if difference != 0 else 1.0
        return Comparison(test, n, difference, difference, difference, p, df)
    half = student_t.ppf(0.5 + LEVEL / 2, df) * se
    p = 2 * student_t.sf(abs(difference) / se, df)
    return Comparison(test, n, difference, difference - half, difference + half, float(p), df)


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the t interval of a mean at ``LEVEL`` (n >= 2; None otherwise)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if len(values) < 2:
        return None
    mean, half = statistics.fmean(values), student_t.ppf(0.5 + LEVEL / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979) of several tests' p-values, in their order: the i-th smallest is
    multiplied by (m - i + 1), kept monotone, capped at 1. A page that makes m claims claims each at adjusted p < 0.05."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
