"""gateway/stats.py: the shared formulas against published check values, and their properties."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.stats import (
    Paired,
    chi2_sf_1df,
    mcnemar,
    median,
    median_interval,
    paired_difference_ci,
    percentile,
    percentile_nearest_rank,
    wilson,
)

# --- Wilson interval ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0),
        # 5 % invalid over 900 checked requests: p ± ~1.4 points, pulled towards 0.5.
        (45, 900, 0.0376, 0.0663),
    ],
)
def test_wilson_matches_published_values(x: int, n: int, low: float, high: float) -> None:
    assert wilson(x, n) == pytest.approx((low, high), abs=1e-4)


def test_wilson_with_no_trials_knows_nothing() -> None:
    assert wilson(0, 0) == (0.0, 1.0)


@given(st.integers(1, 100_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_point_estimate(xn: tuple[int, int]) -> None:
    x, n = xn
    low, high = wilson(x, n)
    assert 0.0 <= low <= x / n <= high <= 1.0


# --- percentiles --------------------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 95) == pytest.approx(95.05)
    assert percentile([7.0], 95) == 7.0
    assert percentile([1.0, 2.0], 0) == 1.0
    assert percentile([1.0, 2.0], 100) == 2.0
    assert percentile([], 50) is None


@given(st.lists(st.floats(0, 1e4), min_size=2, max_size=200), st.integers(1, 99))
def test_percentile_agrees_with_statistics_inclusive_quantiles(values: list[float], q: int) -> None:
    expected = statistics.quantiles(values, n=100, method="inclusive")[q - 1]
    assert percentile(values, q) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_nearest_rank_percentile_is_always_a_measured_value() -> None:
    # The worked example for the nearest-rank method (Wikipedia, "Percentile"): 15, 20, 35, 40, 50.
    values = [50.0, 15.0, 40.0, 20.0, 35.0]
    expected = {0: 15.0, 5: 15.0, 30: 20.0, 40: 20.0, 50: 35.0, 100: 50.0}
    assert {q: percentile_nearest_rank(values, q) for q in expected} == expected
    # What the overhead benchmark reads: p50 and p99 of 4,000 latencies are the 2,000th and 3,960th smallest.
    latencies = [float(i) for i in range(1, 4001)]
    assert percentile_nearest_rank(latencies, 50) == 2000.0
    assert percentile_nearest_rank(latencies, 99) == 3960.0
    assert percentile_nearest_rank([], 50) is None


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.integers(0, 100))
def test_nearest_rank_has_at_least_q_percent_at_or_below_it(values: list[float], q: int) -> None:
    found = percentile_nearest_rank(values, q)
    assert found in values
    at_or_below = sum(v <= found for v in values)
    below = sum(v < found for v in values)
    assert at_or_below * 100 >= q * len(values)  # at least q % at or below it ...
    assert below * 100 < max(q, 1) * len(values)  # ... and it is the smallest such value


# --- medians ------------------------------------------------------------------------------------------------


def test_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([10.0, 11.0, 12.0, 13.0, 500.0]) == 12.0  # one outlier does not move it
    with pytest.raises(ValueError):
        median([])


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200))
def test_median_agrees_with_the_standard_library(values: list[float]) -> None:
    assert median(values) == statistics.median(values)


def test_median_interval_takes_the_published_order_statistics() -> None:
    # n = 10: the 2nd and 9th smallest values, the exact binomial(10, 1/2) interval (coverage 97.9 %).
    assert median_interval([float(v) for v in range(10, 0, -1)]) == (2.0, 9.0)
    # n = 100: 50 -+ 9.8, so the 41st and 60th smallest.
    assert median_interval([float(v) for v in range(1, 101)]) == (41.0, 60.0)
    assert median_interval([7.0]) == (7.0, 7.0)
    with pytest.raises(ValueError):
        median_interval([])


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300))
def test_median_interval_contains_the_median(values: list[float]) -> None:
    low, high = median_interval(values)
    assert low <= median(values) <= high


# --- McNemar and the paired difference ----------------------------------------------------------------------


def test_chi_square_tail_on_one_degree_of_freedom_matches_the_tables() -> None:
    assert chi2_sf_1df(3.841458820694124) == pytest.approx(0.05, abs=1e-12)
    assert chi2_sf_1df(6.634896601021214) == pytest.approx(0.01, abs=1e-12)
    assert chi2_sf_1df(0.0) == 1.0


def test_mcnemar_exact_and_asymptotic_values() -> None:
    assert mcnemar(0, 5).p_value == pytest.approx(2 / 32) and mcnemar(0, 5).method == "exact"
    assert mcnemar(2, 8).p_value == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar(3, 3).p_value == 1.0 and mcnemar(0, 0).method == "none"
    big = mcnemar(10, 25)  # chi2 = (15 - 1)^2 / 35 = 5.6
    assert big.method == "chi2-cc" and big.statistic == pytest.approx(5.6)
    assert big.p_value == pytest.approx(0.017961, abs=1e-5)


def test_paired_interval_is_close_to_wald_for_large_counts() -> None:
    t = Paired(n11=4000, n10=600, n01=900, n00=4500)
    diff = (t.n01 - t.n10) / t.n
    se = math.sqrt((t.n10 + t.n01) / t.n**2 - (t.n01 - t.n10) ** 2 / t.n**3)
    low, high = paired_difference_ci(t)
    assert t.difference == pytest.approx(diff)
    assert (low, high) == pytest.approx((diff - 1.96 * se, diff + 1.96 * se), abs=1e-3)


tables = st.tuples(*[st.integers(0, 60)] * 4).filter(lambda c: sum(c) > 0)


@given(tables)
def test_paired_interval_contains_the_difference_and_is_antisymmetric(
    counts: tuple[int, int, int, int],
) -> None:
    t = Paired(*counts)
    low, high = paired_difference_ci(t)
    assert t.difference is not None
    assert -1.0 <= low <= t.difference <= high <= 1.0
    swapped = paired_difference_ci(Paired(t.n11, t.n01, t.n10, t.n00))
    assert swapped == pytest.approx((-high, -low), abs=1e-12)


def test_no_discordant_pairs_still_leave_an_honest_interval() -> None:
    low, high = paired_difference_ci(Paired(10, 0, 0, 10))
    assert low < 0 < high  # 20 pairs cannot rule out a difference of a few points


def test_paired_interval_without_association_is_newcombes_square_and_add() -> None:
    # n11 · n00 = n10 · n01: phi = 0, and method 10 reduces to the square-and-add of the two Wilson intervals
    # (Newcombe 1998, Stat Med 17:873, method 10).
    t = Paired(n11=6, n10=3, n01=4, n00=2)
    x1, x2, n = t.n11 + t.n01, t.n11 + t.n10, t.n
    (l1, u1), (l2, u2) = wilson(x1, n), wilson(x2, n)
    p1, p2 = x1 / n, x2 / n
    expected = (
        p1 - p2 - math.hypot(p1 - l1, u2 - p2),
        p1 - p2 + math.hypot(u1 - p1, p2 - l2),
    )
    assert paired_difference_ci(t) == pytest.approx(expected, abs=1e-12)


def test_paired_interval_with_no_pairs_knows_nothing() -> None:
    assert paired_difference_ci(Paired(0, 0, 0, 0)) == (-1.0, 1.0)
