"""gateway/canary_stats.py: the check values of docs/canary-statistics.md, properties, and a small simulation."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.canary.stats import (
    CountTest,
    Verdict,
    count_test_m,
    msprt,
    msprt_decision,
    prob_b_worse,
    ratio_within,
)

GRID = (1.25, 1.5, 2, 3, 5)

rhos = st.floats(min_value=0.01, max_value=0.99)
events = st.lists(st.booleans(), max_size=200)


# --- check values (docs/canary-statistics.md) -------------------------------------------------------------------


@pytest.mark.parametrize(("x_b", "expected"), [(5, 0.370), (12, 9.390), (20, 11487.6)])
def test_count_test_reproduces_doc_check_values(x_b: int, expected: float) -> None:
    assert round(count_test_m(45, x_b, 0.1, GRID), 3 if expected < 100 else 1) == expected


@pytest.mark.parametrize(("x_b", "expected"), [(5, 0.370), (12, 9.390), (20, 11487.6)])
def test_count_test_event_by_event_matches_closed_form(x_b: int, expected: float) -> None:
    test = CountTest(GRID)
    for _ in range(45):
        test.observe(False, 0.1)
    for _ in range(x_b):
        test.observe(True, 0.1)
    assert test.m == pytest.approx(expected, abs=5e-4 if expected < 100 else 5e-2)
    assert test.rejects is (expected >= 20.0)
    assert (test.x_a, test.x_b) == (45, x_b)


@pytest.mark.parametrize(("x_b", "expected"), [(5, 0.754), (12, 1.540), (20, 3.380)])
def test_msprt_reproduces_doc_check_values(x_b: int, expected: float) -> None:
    assert round(msprt(45, 900, x_b, 100, tau=0.02, theta0=0.0, smooth=False), 3) == expected


def test_prob_b_worse_reproduces_doc_check_value() -> None:
    assert round(prob_b_worse(45, 900, 12, 100), 4) == 0.9966


# --- count test properties ---------------------------------------------------------------------------------------


def test_count_test_starts_at_one() -> None:
    test = CountTest()
    assert test.m == 1.0
    assert test.log_m == pytest.approx(0.0, abs=1e-12)
    assert not test.rejects
    assert count_test_m(0, 0, 0.3) == pytest.approx(1.0)


@given(events, st.lists(rhos, min_size=1, max_size=5))
def test_m_is_non_negative_and_log_m_finite(sequence: list[bool], shares: list[float]) -> None:
    test = CountTest()
    for i, from_candidate in enumerate(sequence):
        test.observe(from_candidate, shares[i % len(shares)])
    assert test.m >= 0.0
    assert math.isfinite(test.log_m)


@given(events, rhos, st.booleans())
def test_baseline_event_never_raises_m_and_candidate_event_never_lowers_it(
    sequence: list[bool], rho: float, from_candidate: bool
) -> None:
    # Every grid point is > 1: a baseline event multiplies each term by 1/(ρr + 1 − ρ) < 1, a candidate event by
    # r/(ρr + 1 − ρ) ≥ 1.
    test = CountTest()
    for event in sequence:
        test.observe(event, rho)
    before = test.log_m
    test.observe(from_candidate, rho)
    if from_candidate:
        assert test.log_m >= before - 1e-12
    else:
        assert test.log_m < before + 1e-12


@given(st.integers(0, 300), st.integers(0, 300), rhos)
def test_per_event_update_matches_fixed_share_formula_in_any_order(x_a: int, x_b: int, rho: float) -> None:
    test = CountTest()
    for from_candidate in [True] * x_b + [False] * x_a:
        test.observe(from_candidate, rho)
    assert test.log_m == pytest.approx(math.log(count_test_m(x_a, x_b, rho)), rel=1e-9, abs=1e-9)


def test_weights_are_normalised() -> None:
    assert count_test_m(45, 12, 0.1, GRID, [3, 3, 3, 3, 3]) == pytest.approx(count_test_m(45, 12, 0.1, GRID))


def test_share_of_one_leaves_m_unchanged_by_candidate_events() -> None:
    test = CountTest()
    for _ in range(50):
        test.observe(True, 1.0)
    assert test.m == pytest.approx(1.0)


def test_huge_evidence_reports_infinity_not_overflow() -> None:
    assert count_test_m(0, 5000, 0.01) == math.inf


@pytest.mark.parametrize(
    "kwargs",
    [{"grid": (1.0, 2.0)}, {"grid": ()}, {"weights": (1.0,)}, {"weights": (1, 0, 1, 1, 1)}, {"alpha": 1.0}],
)
def test_count_test_rejects_bad_configuration(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CountTest(**kwargs)  # type: ignore[arg-type]


def test_candidate_event_at_zero_share_is_an_error() -> None:
    with pytest.raises(ValueError):
        CountTest().observe(True, 0.0)
    with pytest.raises(ValueError):
        CountTest().observe(False, 1.5)


# --- mSPRT, P(B worse), ratio guardrail -------------------------------------------------------------------------


def test_msprt_decision_needs_direction_and_minimum_count() -> None:
    worse = msprt_decision(450, 9000, 100, 1000, tau=0.02)  # 5 % vs 10 %
    assert worse.rejects and worse.delta == pytest.approx(0.05) and worse.statistic >= 20
    better = msprt_decision(900, 9000, 50, 1000, tau=0.02)  # 10 % vs 5 %: Λ is two-sided
    assert better.statistic >= 20 and not better.rejects
    too_few = msprt_decision(45, 90, 50, 99, tau=0.02, min_n=100)
    assert not too_few.enough_data and not too_few.rejects
    within_margin = msprt_decision(450, 9000, 100, 1000, tau=0.02, theta0=0.2)  # far below the margin
    assert within_margin.statistic >= 20 and not within_margin.rejects


@given(st.integers(1, 500), st.integers(0, 500))
def test_msprt_is_at_most_one_when_difference_equals_theta0(n: int, x: int) -> None:
    x = min(x, n)
    assert msprt(x, n, x, n, tau=0.02) <= 1.0


@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_prob_b_worse_is_a_probability_and_complementary(n_a: int, n_b: int, data: st.DataObject) -> None:
    x_a = data.draw(st.integers(0, n_a))
    x_b = data.draw(st.integers(0, n_b))
    p = prob_b_worse(x_a, n_a, x_b, n_b)
    assert 0.0 <= p <= 1.0
    assert p + prob_b_worse(x_b, n_b, x_a, n_a) == pytest.approx(1.0, abs=1e-9)


def test_ratio_within_pass_fail_inconclusive() -> None:
    baseline = [10.0, 11.0, 12.0, 13.0, 500.0]  # one outlier does not move the median
    ok = ratio_within([11.0, 12.0, 13.0, 14.0, 15.0], baseline, max_ratio=1.1, min_n=5)
    assert ok.verdict is Verdict.PASS
    assert (ok.candidate_median, ok.baseline_median) == (13.0, 12.0)
    assert ok.ratio == pytest.approx(13 / 12)
    slow = ratio_within([14.0, 14.0, 15.0, 16.0], baseline, max_ratio=1.1, min_n=4)
    assert slow.verdict is Verdict.FAIL and slow.candidate_median == 14.5
    few = ratio_within([1.0, 2.0], baseline, max_ratio=1.1, min_n=5)
    assert few.verdict is Verdict.INCONCLUSIVE and few.n_candidate == 2 and math.isnan(few.ratio)


@given(st.lists(st.floats(0.0, 1e6), min_size=1, max_size=50), st.floats(1.0, 3.0))
def test_identical_samples_always_pass(values: list[float], max_ratio: float) -> None:
    assert ratio_within(values, values, max_ratio, min_n=1).verdict is Verdict.PASS


# --- small seeded simulation (loadtests/canary_simulation.py runs the full one) ----------------------------------


def _killed(rng: random.Random, rate_a: float, rate_b: float, rho: float = 0.1, requests: int = 4000) -> bool:
    test = CountTest()
    for request in range(1, requests + 1):
        to_candidate = rng.random() < rho
        if rng.random() < (rate_b if to_candidate else rate_a):
            test.observe(to_candidate, rho)
        if request % 50 == 0 and test.rejects:
            return True
    return False


def test_simulation_healthy_canaries_are_rarely_killed() -> None:
    rng = random.Random(7)
    share = sum(_killed(rng, 0.05, 0.05) for _ in range(200)) / 200
    assert share < 0.10  # Ville: ≤ α = 5 % in expectation over every look


def test_simulation_doubled_invalid_rate_is_caught_most_of_the_time() -> None:
    rng = random.Random(11)
    share = sum(_killed(rng, 0.05, 0.10) for _ in range(100)) / 100
    assert share > 0.7
