"""The report's statistics (ddpm.evaluation.stats) against scipy's own tests, on made-up numbers."""

import math

import pytest
from scipy import stats as scipy_stats

from ddpm.evaluation.stats import compare, paired, welch

A = [30.2, 34.9, 25.1]
B = [38.4, 41.0, 35.8]


def test_paired_matches_scipy():
    ours = paired(A, B)
    theirs = scipy_stats.ttest_rel(A, B)
    interval = theirs.confidence_interval(0.95)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9) and ours.df == 2
    assert (ours.low, ours.high) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert ours.difference == pytest.approx(sum(A) / 3 - sum(B) / 3)


def test_welch_matches_scipy():
    a, b = [1.0, 2.5, 2.0, 3.1], [2.9, 4.4, 3.2]
    ours = welch(a, b)
    theirs = scipy_stats.ttest_ind(a, b, equal_var=False)
    interval = theirs.confidence_interval(0.95)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9) and ours.df == pytest.approx(theirs.df)
    assert (ours.low, ours.high) == (pytest.approx(interval.low), pytest.approx(interval.high))


def test_the_two_standard_error_rule_overclaims_at_n_3():
    """Gap 2.1 with standard error 0.816: past two standard errors (the old rule: "a clear difference"), but Welch's
    test at n = 3 (df 4) gives p = 0.062: cannot tell apart at 95%."""
    a, b = {0: 10.0, 1: 11.0, 2: 12.0}, {3: 12.1, 4: 13.1, 5: 14.1}  # different seeds: Welch
    gap, se = 2.1, math.sqrt(1 / 3 + 1 / 3)
    assert gap > 2 * se
    result = compare(a, b)
    assert result.test == "Welch's t-test" and not result.clear
    assert result.p == pytest.approx(scipy_stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).pvalue)
    assert result.low < 0 < result.high


def test_shared_seeds_are_paired_and_pairing_sees_what_welch_cannot():
    """The same three seeds in both settings, each seed 2.1 worse in b: paired, the difference is certain."""
    a, b = {0: 10.0, 1: 11.0, 2: 12.0}, {0: 12.1, 1: 13.05, 2: 14.2}
    result = compare(a, b)
    assert result.test == "paired t-test" and result.clear and result.n == (3, 3)
    assert not welch(list(a.values()), list(b.values())).clear


def test_one_seed_a_side_gives_no_statistics():
    assert compare({0: 1.0}, {0: 2.0}) is None and compare({0: 1.0, 1: 2.0}, {0: 3.0}) is None


def test_holm_adjusts_step_down_and_keeps_the_order():
    from ddpm.evaluation.stats import holm

    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, max(0.06, 0.06) = 0.06, max(0.06, 0.5) = 0.5
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == [] and holm([0.01]) == [0.01]


def test_a_report_with_several_findings_applies_holm_to_them():
    """ddpm.report's findings: p = 0.01, 0.02, 0.04 become 0.03, 0.04, 0.04 (Holm), so all three survive at 95%;
    with p = 0.01, 0.04, 0.3 only the first does (0.03; 0.08 and 0.3 do not)."""
    from types import SimpleNamespace

    from ddpm.report import holm_lines

    def tests(*ps):
        return [(f"claim {i}", SimpleNamespace(p=p)) for i, p in enumerate(ps)]

    line = holm_lines(tests(0.01, 0.02, 0.04))[-1]
    assert "3 comparisons" in line and "3 remain" in line and "adjusted p = 0.04)" in line
    line = holm_lines(tests(0.01, 0.04, 0.3))[-1]
    assert "1 remain" in line and "claim 0 (adjusted p = 0.03)" in line and "claim 1" not in line
    assert holm_lines(tests(0.01)) == []  # one claim needs no correction
