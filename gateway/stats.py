"""The shared statistics: proportions and their intervals, paired comparisons, percentiles and medians. Pure.

One home for the formulas more than one part of the gateway uses: the Wilson score interval (`gateway report`,
load-test results, the canary's per-arm summaries), McNemar's test and Newcombe's interval for a paired
difference of proportions (load-test comparisons), percentiles (type 7 for reports, nearest rank for the
overhead benchmark), the median and a distribution-free interval for it (the canary's ratio guardrails).
Standard library only: no I/O, no clock, no randomness. Each function names its source; tests/test_stats.py
holds the published check values. The canary's sequential tests (anytime-valid count test, mSPRT) are the
canary's own and live in `canary.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "EXACT_BELOW",
    "McNemar",
    "Paired",
    "chi2_sf_1df",
    "mcnemar",
    "median",
    "median_interval",
    "paired_difference_ci",
    "percentile",
    "percentile_nearest_rank",
    "wilson",
]

EXACT_BELOW = 25  # discordant pairs: under this, McNemar's exact (binomial) test


# --- proportions --------------------------------------------------------------------------------------------


def wilson(x: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for x successes in n trials (Wilson 1927; Newcombe 1998, method 3).

        centre = (p + z²/2n) / (1 + z²/n),  half = z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n),  p = x/n

    Preferred over the normal approximation because invalid-call rates are small proportions, where the
    Wald interval collapses to zero width or crosses 0. With n = 0 nothing is known: (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    p = x / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # At x = 0 and x = n the bounds are exactly 0 and 1; rounding would otherwise leave 1e-16 gaps.
    low = 0.0 if x <= 0 else max(0.0, center - half)
    high = 1.0 if x >= n else min(1.0, center + half)
    return low, high


def chi2_sf_1df(statistic: float) -> float:
    """P(X >= statistic) for X chi-square with one degree of freedom: X = Z² for a standard normal Z, so the
    tail is P(|Z| >= sqrt(statistic)) = erfc(sqrt(statistic / 2)). 3.841 gives 0.05."""
    return math.erfc(math.sqrt(statistic / 2))


# --- paired proportions -------------------------------------------------------------------------------------
#
# In a paired design every item is tried by both arms, so each item gives one of four outcomes: both have the
# property (n11), only the reference (n10), only the candidate (n01), neither (n00). Only the discordant items
# (n10, n01) carry evidence of a difference (McNemar 1947).


@dataclass(frozen=True, slots=True)
class Paired:
    """A paired 2×2 table."""

    n11: int  # both had the property (e.g. success)
    n10: int  # only the reference had it
    n01: int  # only the candidate had it
    n00: int  # neither

    @property
    def n(self) -> int:
        return self.n11 + self.n10 + self.n01 + self.n00

    @property
    def reference_rate(self) -> float | None:
        return (self.n11 + self.n10) / self.n if self.n else None

    @property
    def candidate_rate(self) -> float | None:
        return (self.n11 + self.n01) / self.n if self.n else None

    @property
    def difference(self) -> float | None:
        """candidate − reference."""
        return (self.n01 - self.n10) / self.n if self.n else None


@dataclass(frozen=True, slots=True)
class McNemar:
    p_value: float
    method: str  # "exact" | "chi2-cc" | "none" (no discordant pairs: nothing to test)
    statistic: float | None  # the chi-square statistic (chi2-cc only)


def mcnemar(n10: int, n01: int) -> McNemar:
    """Two-sided McNemar test on the discordant counts (McNemar 1947).

    With fewer than `EXACT_BELOW` discordant pairs, the exact test: a binomial test of n01 among n10 + n01
    against one half, p = min(1, 2 · sum_{i <= min(n10, n01)} C(n, i) / 2^n). From there on, the chi-square
    statistic with Edwards' continuity correction, (|n10 − n01| − 1)² / (n10 + n01), on one degree of freedom:
    the usual textbook rule.
    """
    if n10 < 0 or n01 < 0:
        raise ValueError("counts must be non-negative")
    n = n10 + n01
    if n == 0:
        return McNemar(1.0, "none", None)
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, i) for i in range(min(n10, n01) + 1))
        return McNemar(min(1.0, 2 * tail / 2**n), "exact", None)
    statistic = (abs(n10 - n01) - 1) ** 2 / n
    return McNemar(chi2_sf_1df(statistic), "chi2-cc", statistic)


def paired_difference_ci(t: Paired, z: float = 1.96) -> tuple[float, float]:
    """Newcombe's hybrid score interval for candidate − reference on paired data (Newcombe 1998, Stat Med
    17:2635, method 10, with the corrected phi); (-1, 1) with no pairs.

    With p1, p2 the candidate's and the reference's rates, (l1, u1), (l2, u2) their Wilson intervals and phi the
    table's corrected phi coefficient:

        delta   = sqrt((p1 − l1)² − 2 phi (p1 − l1)(u2 − p2) + (u2 − p2)²)
        epsilon = sqrt((u1 − p1)² − 2 phi (u1 − p1)(p2 − l2) + (p2 − l2)²)
        interval = (p1 − p2 − delta, p1 − p2 + epsilon)

    It stays inside [-1, 1] and does not collapse to zero width at 0 or n discordant items, where the Wald
    interval does. With phi = 0 it is the square-and-add interval for independent proportions.
    """
    n = t.n
    if n == 0:
        return -1.0, 1.0
    x1, x2 = t.n11 + t.n01, t.n11 + t.n10  # candidate, reference
    p1, p2 = x1 / n, x2 / n
    l1, u1 = wilson(x1, n, z)
    l2, u2 = wilson(x2, n, z)
    phi = _phi(t)
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    theta = p1 - p2
    return max(-1.0, theta - delta), min(1.0, theta + epsilon)


def _phi(t: Paired) -> float:
    """The phi coefficient of the 2×2 table, with Newcombe's correction: a positive association is reduced by
    n/2 (floored at 0), as Fagerland, Lydersen & Laake (Stat Med, 2014) give the interval.
    Without it, a table with no discordant pairs has phi = 1 and the interval collapses to [0, 0]. 0 when a
    margin is empty."""
    margins = (t.n11 + t.n10) * (t.n01 + t.n00) * (t.n11 + t.n01) * (t.n10 + t.n00)
    if margins == 0:
        return 0.0
    cross: float = t.n11 * t.n00 - t.n10 * t.n01
    if cross > 0:
        cross = max(cross - t.n / 2, 0.0)
    return cross / math.sqrt(margins)


# --- percentiles and medians --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks: with the values sorted and
    h = (n − 1) q / 100, x[floor h] + (h − floor h)(x[floor h + 1] − x[floor h]).

    This is Hyndman & Fan's "type 7" (numpy's default `linear`, Excel's PERCENTILE.INC, `statistics.quantiles`
    with method="inclusive"), chosen so the figures match what a reader gets from numpy or a spreadsheet. None
    for no values.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def percentile_nearest_rank(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank: the smallest value with at least q % of the values at or
    below it, x[ceil(q n / 100)] (1-based; the smallest value for q = 0). Always one of the measured values,
    never an interpolation: the overhead benchmark reports its latencies this way. None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = math.ceil(q * len(ordered) / 100)
    return ordered[min(len(ordered), max(1, rank)) - 1]


def median(values: Sequence[float]) -> float:
    """The middle value, or the mean of the two middle ones for an even count (`statistics.median`'s
    definition); ValueError for no values."""
    if not values:
        raise ValueError("the median of no values is undefined")
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def median_interval(values: Sequence[float]) -> tuple[float, float]:
    """A distribution-free 95 % interval for the median: the order statistics (0-based, of the sorted values)
    floor(n/2 − 0.98 sqrt(n)) and ceil(n/2 + 0.98 sqrt(n)) − 1, clamped to the sample.

    The count of values below the median is binomial(n, 1/2); its normal approximation puts 95 % of it within
    n/2 ± 1.96 sqrt(n)/2 (Conover, Practical Nonparametric Statistics, the confidence interval for a quantile).
    For n = 10 that is the 2nd and 9th smallest values, the exact binomial answer. ValueError for no values.
    """
    if not values:
        raise ValueError("the median of no values is undefined")
    ordered = sorted(values)
    n = len(ordered)
    half = 0.98 * math.sqrt(n)
    low = max(0, math.floor(n / 2 - half))
    high = min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low], ordered[high]
