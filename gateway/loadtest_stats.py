"""Paired comparison of two variants on the same inputs: McNemar's test and the difference with its interval. Pure.

In paired mode every golden item is answered by both variants, so each item gives one of four outcomes: both
succeed (n11), only the reference does (n10), only the candidate does (n01), neither (n00). Only the discordant
items (n10, n01) carry evidence of a difference (McNemar 1947). With fewer than 25 of them the exact test is
used (a binomial test of n01 among n10 + n01 against one half, two-sided); from 25 on, the chi-square statistic
with Edwards' continuity correction, the usual textbook rule. The difference of the two proportions
(candidate − reference) gets Newcombe's hybrid score interval for paired data (Newcombe 1998, Stat Med 17:2635,
method 10, with the corrected phi): built from the two Wilson intervals and the phi correlation, it stays inside [-1, 1] and does not
collapse to zero width at 0 or n discordant items, where the Wald interval does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.report import wilson

EXACT_BELOW = 25  # discordant pairs: under this, McNemar's exact (binomial) test


@dataclass(frozen=True, slots=True)
class Paired:
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
    """Two-sided McNemar test on the discordant counts."""
    if n10 < 0 or n01 < 0:
        raise ValueError("counts must be non-negative")
    n = n10 + n01
    if n == 0:
        return McNemar(1.0, "none", None)
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, i) for i in range(min(n10, n01) + 1))
        return McNemar(min(1.0, 2 * tail / 2**n), "exact", None)
    statistic = (abs(n10 - n01) - 1) ** 2 / n
    return McNemar(math.erfc(math.sqrt(statistic / 2)), "chi2-cc", statistic)


def paired_difference_ci(t: Paired, z: float = 1.96) -> tuple[float, float]:
    """Newcombe's method 10 interval for candidate − reference; (-1, 1) with no pairs."""
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
