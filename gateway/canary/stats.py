"""Statistics for deciding a canary from data that keeps arriving (docs/canary-statistics.md).

This module owns the numbers, not the decisions' plumbing: the anytime-valid count test of Lindon & Malek (the one
an unattended kill switch may use), the mSPRT for two proportions of Johari, Pekelis & Walsh, Evan Miller's
P(p_B > p_A) for people's dashboards (never for an unattended kill), and a ratio guardrail for latency per output
token and cost per request. It is pure: standard library ``math`` and the shared `stats` (the median) only, no
I/O, no clock, no randomness. Arm A is the baseline and arm B the candidate (canary) throughout; "worse" means a
higher rate of invalid events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from gateway.stats import median

__all__ = [
    "DEFAULT_GRID",
    "CountTest",
    "MsprtDecision",
    "RatioVerdict",
    "Verdict",
    "count_test_m",
    "msprt",
    "msprt_decision",
    "prob_b_worse",
    "ratio_within",
]

DEFAULT_GRID: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 5.0)

# math.exp overflows above ~709.78; a likelihood ratio that large is reported as +inf.
_MAX_EXP = 709.0


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def _exp(log_value: float) -> float:
    return math.inf if log_value > _MAX_EXP else math.exp(log_value)


def _check_rho(rho: float) -> None:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"routing share rho must lie in [0, 1], got {rho!r}")


def _validated_mixture(
    grid: Sequence[float], weights: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Grid ratios r_k > 1 and log-weights normalised to sum 1 (a sum above 1 would break Ville's bound)."""
    ratios = tuple(float(r) for r in grid)
    if not ratios or not all(math.isfinite(r) and r > 1.0 for r in ratios):
        raise ValueError(f"grid must be a non-empty sequence of finite ratios > 1, got {grid!r}")
    raw = tuple(1.0 for _ in ratios) if weights is None else tuple(float(w) for w in weights)
    if len(raw) != len(ratios) or not all(math.isfinite(w) and w > 0.0 for w in raw):
        raise ValueError(f"weights must be {len(ratios)} finite positive numbers, got {weights!r}")
    total = math.fsum(raw)
    return ratios, tuple(math.log(w / total) for w in raw)


def _event_log_factor(ratio: float, from_candidate: bool, rho: float) -> float:
    """log of q(r)/rho (candidate event) or (1 - q(r))/(1 - rho) (baseline event).

    With q(r) = rho r / (rho r + 1 - rho) both factors simplify to r / (rho r + 1 - rho) and 1 / (rho r + 1 - rho),
    which stay finite at rho = 1 (where a baseline event cannot happen).
    """
    log_denominator = math.log(rho * ratio + 1.0 - rho)
    return (math.log(ratio) if from_candidate else 0.0) - log_denominator


class CountTest:
    """Anytime-valid test that the candidate's invalid-event rate is no worse than the baseline's.

    Source: Lindon & Malek, "Anytime-Valid Inference for Multinomial Count Data", NeurIPS 2022. Each request goes
    to the candidate with probability rho fixed before its outcome; if the candidate is no worse, each invalid event
    comes from it with probability rho. For a rate ratio r = p_B / p_A let q(r) = rho r / (rho r + 1 - rho); over a
    grid of ratios r_k > 1 with weights w_k summing to 1,

        M = sum_k w_k * prod_events (q(r_k)/rho if from the candidate else (1 - q(r_k))/(1 - rho)),

    each event using the rho in force when its request was routed. Under "no worse" M is a nonnegative
    (super)martingale with M_0 = 1, so P(ever M >= 1/alpha) <= alpha (Ville's inequality): it may be looked at
    after every event. One log-likelihood accumulator per grid point; M is their weighted log-sum-exp.
    """

    __slots__ = ("_log_lik", "_log_weights", "_ratios", "alpha", "x_a", "x_b")

    def __init__(
        self,
        grid: Sequence[float] = DEFAULT_GRID,
        weights: Sequence[float] | None = None,
        alpha: float = 0.05,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
        self._ratios, self._log_weights = _validated_mixture(grid, weights)
        self._log_lik = [0.0] * len(self._ratios)
        self.alpha = alpha
        self.x_a = 0
        self.x_b = 0

    def observe(self, from_candidate: bool, rho: float) -> None:
        """Add one invalid event, routed to the candidate or not, under routing share ``rho``."""
        _check_rho(rho)
        if from_candidate and rho == 0.0:
            raise ValueError("an event cannot come from the candidate when its routing share is 0")
        for k, ratio in enumerate(self._ratios):
            self._log_lik[k] += _event_log_factor(ratio, from_candidate, rho)
        if from_candidate:
            self.x_b += 1
        else:
            self.x_a += 1

    def observe_many(self, from_candidate: bool, rho: float, count: int) -> None:
        """``count`` events at once, each as ``observe`` would add it: M depends on the events' counts per share
        and arm, not on their order, so a batch between two looks is one update (the simulations' fast path)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if count == 0:
            return
        _check_rho(rho)
        if from_candidate and rho == 0.0:
            raise ValueError("an event cannot come from the candidate when its routing share is 0")
        for k, ratio in enumerate(self._ratios):
            self._log_lik[k] += count * _event_log_factor(ratio, from_candidate, rho)
        if from_candidate:
            self.x_b += count
        else:
            self.x_a += count

    @property
    def log_m(self) -> float:
        """log M, computed by log-sum-exp so that it neither overflows nor underflows."""
        return _log_sum_exp([w + ll for w, ll in zip(self._log_weights, self._log_lik, strict=True)])

    @property
    def m(self) -> float:
        """The mixture likelihood ratio M (+inf when it exceeds the float range)."""
        return _exp(self.log_m)

    @property
    def rejects(self) -> bool:
        """True once M >= 1/alpha: the candidate is worse, with type-I error at most alpha over all looks."""
        return self.log_m >= -math.log(self.alpha)


def count_test_m(
    x_a: int,
    x_b: int,
    rho: float,
    grid: Sequence[float] = DEFAULT_GRID,
    weights: Sequence[float] | None = None,
) -> float:
    """M of the Lindon & Malek count test for a routing share ``rho`` fixed throughout (see ``CountTest``).

        M = sum_k w_k * (q(r_k)/rho)^x_B * ((1 - q(r_k))/(1 - rho))^x_A,  q(r) = rho r / (rho r + 1 - rho)

    ``x_a`` invalid events from the baseline, ``x_b`` from the candidate; computed in log space.
    """
    _check_rho(rho)
    if x_a < 0 or x_b < 0:
        raise ValueError("event counts must be non-negative")
    if x_b > 0 and rho == 0.0:
        raise ValueError("events cannot come from the candidate when its routing share is 0")
    ratios, log_weights = _validated_mixture(grid, weights)
    terms = [
        w + x_b * _event_log_factor(r, True, rho) + x_a * _event_log_factor(r, False, rho)
        for r, w in zip(ratios, log_weights, strict=True)
    ]
    return _exp(_log_sum_exp(terms))


def _proportion(x: int, n: int, smooth: bool) -> float:
    return (x + 0.5) / (n + 1) if smooth else x / n


def _check_counts(x: int, n: int) -> None:
    if n <= 0 or not 0 <= x <= n:
        raise ValueError(f"need 0 <= x <= n and n > 0, got x={x}, n={n}")


def _msprt_log(x_a: int, n_a: int, x_b: int, n_b: int, tau: float, theta0: float, smooth: bool) -> float:
    _check_counts(x_a, n_a)
    _check_counts(x_b, n_b)
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    p_a, p_b = _proportion(x_a, n_a, smooth), _proportion(x_b, n_b, smooth)
    s2 = p_a * (1.0 - p_a) / n_a + p_b * (1.0 - p_b) / n_b
    gap = x_b / n_b - x_a / n_a - theta0
    if s2 == 0.0:  # only unsmoothed, with 0 % or 100 % in both arms: the limit s2 -> 0
        return -math.inf if gap == 0.0 else math.inf
    tau2 = tau * tau
    return 0.5 * math.log(s2 / (s2 + tau2)) + tau2 * gap * gap / (2.0 * s2 * (s2 + tau2))


def msprt(
    x_a: int, n_a: int, x_b: int, n_b: int, tau: float, theta0: float = 0.0, smooth: bool = True
) -> float:
    """Mixture SPRT statistic Lambda for the difference of two proportions.

    Source: Johari, Pekelis & Walsh, "Always Valid Inference", Operations Research 2022 (normal mixture of width
    tau over the difference). With p = x/n, Delta = p_B - p_A and s^2 = p_A(1-p_A)/n_A + p_B(1-p_B)/n_B,

        Lambda = sqrt(s^2 / (s^2 + tau^2)) * exp(tau^2 (Delta - theta0)^2 / (2 s^2 (s^2 + tau^2)))

    ``smooth`` uses (x + 1/2)/(n + 1) inside s^2 only (Delta always uses x/n), so that s^2 > 0. The statistic is
    two-sided; ``msprt_decision`` adds the direction and the minimum sample the normal approximation needs.
    """
    return _exp(_msprt_log(x_a, n_a, x_b, n_b, tau, theta0, smooth))


@dataclass(frozen=True, slots=True)
class MsprtDecision:
    """Outcome of ``msprt_decision``: Lambda, the observed difference, and whether to kill."""

    statistic: float
    delta: float
    enough_data: bool
    rejects: bool


def msprt_decision(
    x_a: int,
    n_a: int,
    x_b: int,
    n_b: int,
    tau: float,
    *,
    alpha: float = 0.05,
    theta0: float = 0.0,
    min_n: int = 100,
    smooth: bool = True,
) -> MsprtDecision:
    """Kill when Lambda >= 1/alpha and Delta > theta0, and only once each arm has at least ``min_n`` requests.

    Source as ``msprt``. The minimum count per arm guards the normal approximation behind Lambda; below it the
    answer is "not enough data" (hold, do not promote), never a kill.
    """
    statistic = msprt(x_a, n_a, x_b, n_b, tau, theta0, smooth)
    delta = x_b / n_b - x_a / n_a
    enough = min(n_a, n_b) >= min_n
    rejects = enough and delta > theta0 and statistic >= 1.0 / alpha
    return MsprtDecision(statistic=statistic, delta=delta, enough_data=enough, rejects=rejects)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def prob_b_worse(x_a: int, n_a: int, x_b: int, n_b: int) -> float:
    """P(p_B > p_A) with Beta(1, 1) priors: for dashboards and reports, never for an unattended kill.

    Source: Evan Miller, "Formulas for Bayesian A/B Testing" (2015). With alpha = x + 1, beta = n - x + 1 per arm,

        P(p_B > p_A) = sum_{i=0}^{alpha_B - 1} B(alpha_A + i, beta_A + beta_B)
                       / ((beta_B + i) B(1 + i, beta_B) B(alpha_A, beta_A))

    evaluated term by term with ``math.lgamma``; the sum has x_B + 1 terms.
    """
    _check_counts(x_a, n_a)
    _check_counts(x_b, n_b)
    a_a, b_a = x_a + 1, n_a - x_a + 1
    a_b, b_b = x_b + 1, n_b - x_b + 1
    log_norm = _log_beta(a_a, b_a)
    terms = (
        math.exp(_log_beta(a_a + i, b_a + b_b) - math.log(b_b + i) - _log_beta(1 + i, b_b) - log_norm)
        for i in range(a_b)
    )
    return min(1.0, max(0.0, math.fsum(terms)))


class Verdict(Enum):
    """A guardrail's answer; INCONCLUSIVE means hold the current step (Argo Rollouts' semantics)."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class RatioVerdict:
    """Outcome of ``ratio_within`` with the numbers it was decided on."""

    verdict: Verdict
    candidate_median: float
    baseline_median: float
    ratio: float
    max_ratio: float
    n_candidate: int
    n_baseline: int


def _ratio(candidate: float, baseline: float) -> float:
    if baseline > 0.0:
        return candidate / baseline
    return 1.0 if candidate <= 0.0 else math.inf


def ratio_within(
    candidate: Sequence[float], baseline: Sequence[float], max_ratio: float, min_n: int
) -> RatioVerdict:
    """Guardrail: is the candidate's median at most ``max_ratio`` times the baseline's?

    For latency per output token and cost per request (non-negative values). Medians, not means: both metrics are
    heavy-tailed (a few long generations or retries), and one outlier in a small window would swing a mean and
    fail a healthy canary; the median compares the typical request. It is a tolerance check on point estimates,
    not a significance test: ``min_n`` per arm is what keeps it from reacting to a handful of requests, and below
    it the answer is INCONCLUSIVE (hold, do not promote). PASS when median_B <= max_ratio * median_A, else FAIL.
    """
    if not (math.isfinite(max_ratio) and max_ratio > 0.0):
        raise ValueError(f"max_ratio must be finite and > 0, got {max_ratio!r}")
    if min_n < 1:
        raise ValueError(f"min_n must be >= 1, got {min_n}")
    n_b, n_a = len(candidate), len(baseline)
    if min(n_a, n_b) < min_n:
        return RatioVerdict(Verdict.INCONCLUSIVE, math.nan, math.nan, math.nan, max_ratio, n_b, n_a)
    med_b, med_a = median(candidate), median(baseline)
    ratio = _ratio(med_b, med_a)
    verdict = Verdict.PASS if ratio <= max_ratio else Verdict.FAIL
    return RatioVerdict(verdict, med_b, med_a, ratio, max_ratio, n_b, n_a)
