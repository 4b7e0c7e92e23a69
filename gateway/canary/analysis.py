"""The canary's evidence and what one look at it concludes: fail, pass or hold. Pure: no I/O, no clock.

Units and attribution (docs/canary-statistics.md, "Units and traps"):
- Shadow copies (`shadow` records) were never served to anyone and are never evidence of a canary.
- A request belongs to the arm the policy routed it to: its `fallback_from` when the routed variant failed and
  another answered (a failure before the first byte is an error of the routed arm; an enforce-mode retry after an
  invalid tool call is an invalid call of the routed arm), else its `variant`. Requests whose variant the client
  forced (`x-gateway-variant`: load tests, drills) were not routed by policy and are left out.
- Invalid calls are counted per request ("had at least one invalid tool call"), so a candidate that calls more
  tools per request is not compared per call; errors are the variant's failures (engine error or timeout, broken
  stream, gateway error), not the client's.
- The candidate's routing share rho is taken from each record: its `share` when the candidate served it, and
  1 - `share` when the baseline did (a canary route has no other variant with a weight; `canary.config`).
- With `unit = "user"` each user (the sticky key's bucket) counts at most once per event kind over the canary: a
  sticky user's outcomes are correlated, so counting each of their requests would overstate the evidence. For the
  same reason each user is one latency and one cost sample (the mean over their requests in the step).

Rates (invalid calls, errors) use the anytime-valid count test (Lindon & Malek), accumulated over the whole canary
(from its start, or from the last resume after a held failure) so that its error bound covers every look of every
step. Latency per output token and cost per request compare medians over the current step: FAIL only when the
candidate is clearly worse (the lower 95 % bound of its median above `max_ratio` times the upper bound of the
baseline's), PASS when the point ratio is within `max_ratio`, else inconclusive (hold): a ratio check on point
estimates, looked at every second, would otherwise fail healthy canaries on noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from gateway.canary.spec import CanarySpec, RateGuardrail, RatioGuardrail
from gateway.canary.stats import CountTest, Verdict, prob_b_worse
from gateway.records import Record
from gateway.stats import median, median_interval, wilson

Arm = Literal["candidate", "baseline"]
Outcome = Literal["fail", "pass", "hold"]
ERRORS: Final = frozenset({"engine_error", "engine_timeout", "stream_error", "gateway_error"})
RATES: Final = ("invalid_call_rate", "error_rate")
RATIOS: Final = ("latency_per_output_token", "cost_per_request")


@dataclass(frozen=True, slots=True)
class Observation:
    ts: float
    arm: Arm
    rho: float  # the candidate's routing share when the request was routed
    invalid: bool = False
    error: bool = False
    unit: float | None = (
        None  # the user (sticky bucket) with unit = "user"; None: the request is its own unit
    )
    latency_per_token: float | None = None  # seconds per output token, successful requests only
    cost: float | None = None


def observation(spec: CanarySpec, rec: Record) -> Observation | None:
    """What a record says about the canary, or None when it is not evidence (a shadow copy, forced, another
    variant)."""
    routed = rec.fallback_from or rec.variant
    if rec.shadow or rec.forced or rec.share is None or routed not in (spec.candidate, spec.baseline):
        return None
    arm: Arm = "candidate" if routed == spec.candidate else "baseline"
    rho = rec.share if rec.variant == spec.candidate else 1.0 - rec.share
    rho = min(1.0, max(0.0, rho))
    if (arm == "candidate" and rho <= 0.0) or (arm == "baseline" and rho >= 1.0):
        return None  # inconsistent with the routing in force (a record from before the canary)
    unit = rec.bucket if spec.unit == "user" else None
    if rec.fallback_from:
        failed = (rec.fallback_reason or "").startswith("engine_")
        return Observation(rec.ts, arm, rho, invalid=not failed, error=failed, unit=unit)
    ok = rec.outcome == "ok"
    per_token = rec.e2e_s / rec.output_tokens if ok and rec.e2e_s and rec.output_tokens else None
    return Observation(
        rec.ts,
        arm,
        rho,
        invalid=rec.tool_verdict == "invalid",
        error=rec.outcome in ERRORS,
        unit=unit,
        latency_per_token=per_token,
        cost=rec.cost if ok else None,
    )


@dataclass(slots=True)
class Samples:
    """Samples of one measure: one per request (or pair), or with unit = "user" one per user (the mean of the
    user's values), so that a user who sends many requests is still one sample."""

    plain: list[float] = field(default_factory=list)
    by_unit: dict[float, list[float]] = field(default_factory=dict)

    def add(self, unit: float | None, value: float) -> None:
        if unit is None:  # unit = "request", or a request without a sticky key: its own unit
            self.plain.append(value)
        else:
            self.by_unit.setdefault(unit, []).append(value)

    def values(self) -> list[float]:
        return self.plain + [sum(v) / len(v) for v in self.by_unit.values()]


@dataclass(slots=True)
class ArmTally:
    """One arm's counts, and its latency and cost samples (`Samples`)."""

    requests: int = 0
    invalid: int = 0
    errors: int = 0
    _latency: Samples = field(default_factory=Samples)
    _cost: Samples = field(default_factory=Samples)

    def add(self, obs: Observation) -> None:
        self.requests += 1
        self.invalid += obs.invalid
        self.errors += obs.error
        if obs.latency_per_token is not None:
            self._latency.add(obs.unit, obs.latency_per_token)
        if obs.cost is not None:
            self._cost.add(obs.unit, obs.cost)

    @property
    def latency(self) -> list[float]:
        return self._latency.values()

    @property
    def cost(self) -> list[float]:
        return self._cost.values()

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "invalid": self.invalid,
            "invalid_rate": _rate(self.invalid, self.requests),
            "invalid_ci": wilson(self.invalid, self.requests),
            "errors": self.errors,
            "error_rate": _rate(self.errors, self.requests),
            "error_ci": wilson(self.errors, self.requests),
            "latency_per_token_median": _median_or_none(self.latency),
            "cost_median": _median_or_none(self.cost),
        }


def _rate(x: int, n: int) -> float | None:
    return x / n if n else None


def _median_or_none(values: list[float]) -> float | None:
    return median(values) if values else None


class Evidence:
    """Everything seen of one canary since its epoch: the sequential tests over the whole canary, request
    counts over the whole canary, and the tallies of the current step (requests at or after its start)."""

    def __init__(self, spec: CanarySpec, step_start: float = -math.inf) -> None:
        self.spec = spec
        self.tests = rate_tests(spec)
        self._seen: dict[str, set[float]] = {name: set() for name in self.tests}
        self.total = {"candidate": ArmTally(), "baseline": ArmTally()}
        self.step_start = step_start
        self.step = {"candidate": ArmTally(), "baseline": ArmTally()}

    def add(self, obs: Observation) -> None:
        for name, test in self.tests.items():
            happened = obs.invalid if name == "invalid_call_rate" else obs.error
            if happened and self._first(name, obs.unit):
                test.observe(obs.arm == "candidate", obs.rho)
        self.total[obs.arm].add(obs)
        if obs.ts >= self.step_start:
            self.step[obs.arm].add(obs)

    def add_counts(self, arm: Arm, rho: float, requests: int, invalid: int, errors: int, ts: float) -> None:
        """`requests` requests of one arm at one share, `invalid` and `errors` of them with that event, and no
        latency or cost samples: the simulations' fast path (unit = "request" only: no user to count once)."""
        if self.spec.unit != "request":
            raise ValueError("counts in bulk need unit = 'request'")
        for name, test in self.tests.items():
            test.observe_many(arm == "candidate", rho, invalid if name == "invalid_call_rate" else errors)
        tallies = [self.total[arm], *([self.step[arm]] if ts >= self.step_start else [])]
        for tally in tallies:
            tally.requests += requests
            tally.invalid += invalid
            tally.errors += errors

    def next_step(self, started_at: float) -> None:
        """Start the next step's tallies; observations added afterwards at or after `started_at` count in it."""
        self.step_start = started_at
        self.step = {"candidate": ArmTally(), "baseline": ArmTally()}

    def _first(self, name: str, unit: float | None) -> bool:
        return first_of_unit(self._seen[name], unit)


def rate_tests(spec: CanarySpec) -> dict[str, CountTest]:
    """A fresh count test per rate guardrail the spec declares, by guardrail name."""
    g = spec.guardrails
    rates = (("invalid_call_rate", g.invalid_call_rate), ("error_rate", g.error_rate))
    return {name: CountTest(alpha=r.alpha) for name, r in rates if r is not None}


def first_of_unit(seen: set[float], unit: float | None) -> bool:
    """Whether this is the unit's first event of a kind (`seen`: the units that had one); a request that is its
    own unit (None) always is. With unit = "user" a user counts once per event kind."""
    if unit is None:
        return True
    if unit in seen:
        return False
    seen.add(unit)
    return True


@dataclass(frozen=True, slots=True)
class Check:
    """One guardrail at one look: its verdict, the statistic and the bound it was compared with, the counts."""

    guardrail: str
    verdict: Verdict
    statistic: float  # M of the count test, or candidate median / baseline median
    bound: float  # 1/alpha, or max_ratio
    counts: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "guardrail": self.guardrail,
            "verdict": self.verdict.value,
            "statistic": _finite(self.statistic),
            "bound": self.bound,
            **self.counts,
        }


def _finite(value: float) -> float | str | None:
    """JSON has no inf or NaN: inf is written as the string "inf", NaN (not computed) as null."""
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else "inf"


def rate_check(name: str, guardrail: RateGuardrail, test: CountTest, total: dict[str, ArmTally]) -> Check:
    n_b, n_a = total["candidate"].requests, total["baseline"].requests
    x_b, x_a = test.x_b, test.x_a
    counts = {
        "candidate_events": x_b,
        "baseline_events": x_a,
        "candidate_requests": n_b,
        "baseline_requests": n_a,
    }
    return count_check(name, guardrail, test, counts)


def count_check(name: str, guardrail: RateGuardrail, test: CountTest, counts: dict[str, Any]) -> Check:
    """The count test's verdict: FAIL once M >= 1/alpha (M is shown capped below float overflow)."""
    log_m = test.log_m  # once: it is a log-sum-exp over the grid
    verdict = Verdict.FAIL if log_m >= -math.log(guardrail.alpha) else Verdict.PASS
    return Check(name, verdict, math.exp(min(log_m, 709.0)), 1.0 / guardrail.alpha, counts)


def ratio_check(name: str, guardrail: RatioGuardrail, candidate: list[float], baseline: list[float]) -> Check:
    counts: dict[str, Any] = {"candidate_samples": len(candidate), "baseline_samples": len(baseline)}
    if min(len(candidate), len(baseline)) < guardrail.min_samples:
        return Check(name, Verdict.INCONCLUSIVE, math.nan, guardrail.max_ratio, counts)
    c_mid, b_mid = median(candidate), median(baseline)
    ratio = c_mid / b_mid if b_mid > 0 else (1.0 if c_mid <= 0 else math.inf)
    c_low, _ = median_interval(candidate)
    _, b_high = median_interval(baseline)
    counts.update(candidate_median=c_mid, baseline_median=b_mid, candidate_low=c_low, baseline_high=b_high)
    if c_low > guardrail.max_ratio * b_high:
        verdict = Verdict.FAIL
    elif ratio <= guardrail.max_ratio:
        verdict = Verdict.PASS
    else:
        verdict = Verdict.INCONCLUSIVE
    return Check(name, verdict, ratio, guardrail.max_ratio, counts)


@dataclass(frozen=True, slots=True)
class Look:
    """What one look concludes, with everything it was decided on (the audit entry's detail)."""

    outcome: Outcome
    step: int
    share: float
    checks: tuple[Check, ...]
    minimums_met: bool
    candidate_requests: int  # in the step; in the shadow phase, those the policy routed to the candidate (0)
    minutes: float
    pairs: int | None = None  # the shadow phase's pairs (`canary.paired`); None in a served step

    @property
    def failed(self) -> Check | None:
        return next((c for c in self.checks if c.verdict is Verdict.FAIL), None)


def checks(spec: CanarySpec, evidence: Evidence) -> tuple[Check, ...]:
    g = spec.guardrails
    out = [
        rate_check(name, r, evidence.tests[name], evidence.total)
        for name, r in (("invalid_call_rate", g.invalid_call_rate), ("error_rate", g.error_rate))
        if r is not None
    ]
    cand, base = evidence.step["candidate"], evidence.step["baseline"]
    if g.latency_per_output_token is not None:
        out.append(ratio_check(RATIOS[0], g.latency_per_output_token, cand.latency, base.latency))
    if g.cost_per_request is not None:
        out.append(ratio_check(RATIOS[1], g.cost_per_request, cand.cost, base.cost))
    return tuple(out)


def look(spec: CanarySpec, evidence: Evidence, step: int, now: float) -> Look:
    """Fail when any guardrail failed; pass when the step's minimums are met and every guardrail passed; else
    hold (inconclusive, or minimums not met)."""
    found = checks(spec, evidence)
    requests = evidence.step["candidate"].requests
    minutes = max(0.0, now - evidence.step_start) / 60.0
    met = requests >= spec.min_requests_per_step and minutes >= spec.min_minutes_per_step
    outcome: Outcome = "hold"
    if any(c.verdict is Verdict.FAIL for c in found):
        outcome = "fail"
    elif met and all(c.verdict is Verdict.PASS for c in found):
        outcome = "pass"
    return Look(outcome, step, spec.share(step), found, met, requests, minutes)


def describe(spec: CanarySpec, evidence: Evidence, seen: Look) -> dict[str, Any]:
    """A look with the numbers behind it, for the audit entry, the status answer and the report: the step's
    counts and rates with 95 % Wilson intervals per arm, each guardrail's statistic and bound, and (for people,
    never for the kill) P(candidate worse) under Beta(1, 1) priors."""
    described = []
    for check in seen.checks:
        row = check.as_dict()
        if check.guardrail in RATES:
            x_a, n_a = row["baseline_events"], row["baseline_requests"]
            x_b, n_b = row["candidate_events"], row["candidate_requests"]
            row["p_candidate_worse"] = (
                prob_b_worse(min(x_a, n_a), n_a, min(x_b, n_b), n_b) if n_a and n_b else None
            )
        described.append(row)
    return {
        "step": seen.step,
        "share": seen.share,
        "outcome": seen.outcome,
        "unit": spec.unit,
        "minimums": {
            "candidate_requests": [seen.candidate_requests, spec.min_requests_per_step],
            "minutes": [round(seen.minutes, 3), spec.min_minutes_per_step],
        },
        "candidate": evidence.step["candidate"].summary(),
        "baseline": evidence.step["baseline"].summary(),
        "checks": described,
    }
