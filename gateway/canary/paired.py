"""The shadow phase's evidence (`[canary] shadow_requests`): each copy the candidate answered paired with the answer
the user got from the baseline, the guardrails tested on the pairs, and what one look at them concludes. Pure: the
controller reads the records and writes the decision.

Pairs. A served record counts when the policy routed it to the baseline (`fallback_from`, else `variant`; not
forced, not a copy); a copy when the candidate answered it (a `shadow` record of the candidate, neither dropped nor
cut at shutdown). They are matched by the copy's `primary_id`. The request log gives records in commit order, and a
copy may commit before or after the request it copied, so each side waits for the other in a buffer: a record is
dropped from it once it is `max_wait_s` older (by `ts`, the request's start) than the newest record read, or when
the buffer holds `max_unmatched` records (the oldest first). Most served records never get a copy (the `[shadow]`
share), so only copies that found no request are counted (`unpaired`), e.g. a copy of a request started before the
phase. Requests the policy routed to the candidate during the phase are counted too (`users_served`): with the
candidate at weight 0 it is 0, which is what the phase promises.

Tests (docs/canary-statistics.md §1, applied to pairs):
- Invalid calls and errors: McNemar's idea made sequential. Among the discordant pairs (the event on exactly one
  side), the event is on the candidate's side with probability n01 / (n01 + n10), and the candidate's rate minus
  the baseline's is exactly (n01 − n10) / n: "no worse" means that probability is at most 1/2. Each discordant pair
  is one event of the same anytime-valid count test as the served phase, with rho = 1/2 (`PAIRED_RHO`), so the
  same α holds over every look (Ville's inequality). Invalid calls count only pairs whose two verdicts were checked
  (valid or invalid), as `shadow.pairs` does. With `unit = "user"` a user's first discordant pair per guardrail is
  the only one counted: the direction of one user's pairs is correlated.
- Latency per output token and cost per request: the ratio copy ÷ served per pair, over pairs both answered `ok`
  (with `unit = "user"`, one sample per user: the mean of their ratios). FAIL when the lower bound of the 95 %
  interval of the median ratio is above `max_ratio`, PASS when the median ratio is within it, else inconclusive;
  at least `min_samples` pairs. A copy is sent as a non-stream request when `[shadow] stream = "non_stream"` and
  waits its turn behind served requests, so its latency is not the user's: per output token removes the length,
  not that difference, hence a tolerance.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from gateway.canary.analysis import (
    ERRORS,
    Check,
    Look,
    Outcome,
    Samples,
    count_check,
    first_of_unit,
    rate_tests,
)
from gateway.canary.spec import CanarySpec, RateGuardrail, RatioGuardrail
from gateway.canary.stats import CountTest, Verdict
from gateway.records import SHADOW_DROPPED, Record
from gateway.stats import median, median_interval, wilson

PAIRED_RHO: Final = 0.5  # a discordant pair is the candidate's with probability <= 1/2 when it is no worse
NOT_EVIDENCE: Final = frozenset({SHADOW_DROPPED, "server_shutdown"})
MAX_UNMATCHED: Final = 100_000  # records waiting for their other side, per side
MAX_WAIT_S: Final = 900.0


@dataclass(frozen=True, slots=True)
class Side:
    """What one side of a pair says: the served answer, or the candidate's copy."""

    ts: float
    unit: float | None  # the user (sticky bucket) with unit = "user"; None: the pair is its own unit
    checked: bool  # the tool-call verdict was checked (valid or invalid)
    invalid: bool
    error: bool
    latency_per_token: float | None  # e2e seconds per output token, answered ok
    cost: float | None  # answered ok


def _side(spec: CanarySpec, rec: Record) -> Side:
    unit = rec.bucket if spec.unit == "user" else None
    if rec.fallback_from:  # as `analysis.observation`: the routed arm failed, or enforce mode retried it
        failed = (rec.fallback_reason or "").startswith("engine_")
        return Side(rec.ts, unit, not failed, not failed, failed, None, None)
    ok = rec.outcome == "ok"
    per_token = rec.e2e_s / rec.output_tokens if ok and rec.e2e_s and rec.output_tokens else None
    return Side(
        rec.ts,
        unit,
        rec.tool_verdict in ("valid", "invalid"),
        rec.tool_verdict == "invalid",
        rec.outcome in ERRORS,
        per_token,
        rec.cost if ok else None,
    )


def _routed(rec: Record) -> str | None:
    return rec.fallback_from or rec.variant


@dataclass(slots=True)
class _Tally:
    """Both sides' events over the pairs, for people (the tests decide)."""

    pairs: int = 0
    checked: int = 0  # pairs whose two verdicts were checked
    served_invalid: int = 0
    copy_invalid: int = 0
    served_errors: int = 0
    copy_errors: int = 0


class PairedEvidence:
    """Everything the shadow phase has seen since its start: the pairs, their tests and ratios."""

    def __init__(
        self, spec: CanarySpec, *, max_unmatched: int = MAX_UNMATCHED, max_wait_s: float = MAX_WAIT_S
    ) -> None:
        self.spec = spec
        self.tests = rate_tests(spec)
        self._seen: dict[str, set[float]] = {name: set() for name in self.tests}
        self.ratios = {"latency_per_output_token": Samples(), "cost_per_request": Samples()}
        self.tally = _Tally()
        self.users_served = 0  # requests the policy routed to the candidate
        self.unpaired = 0  # copies dropped from the buffer without their request
        self._served: OrderedDict[str, Side] = OrderedDict()  # by request id
        self._copies: OrderedDict[str, Side] = OrderedDict()  # by the request id they copied
        self._max_unmatched = max_unmatched
        self._max_wait_s = max_wait_s
        self._newest = -math.inf

    @property
    def pairs(self) -> int:
        return self.tally.pairs

    @property
    def waiting(self) -> int:
        """Copies read whose request has not been read (yet)."""
        return len(self._copies)

    def add(self, rec: Record) -> None:
        """One record of the route, in the order the request log committed them."""
        self._newest = max(self._newest, rec.ts)
        if rec.shadow:
            if rec.variant == self.spec.candidate and rec.outcome not in NOT_EVIDENCE and rec.primary_id:
                self._arrive(self._copies, self._served, rec.primary_id, _side(self.spec, rec), copy=True)
        elif not rec.forced and _routed(rec) == self.spec.candidate:
            self.users_served += 1
        elif not rec.forced and _routed(rec) == self.spec.baseline and rec.outcome not in NOT_EVIDENCE:
            self._arrive(self._served, self._copies, rec.request_id, _side(self.spec, rec), copy=False)
        self._evict(self._copies, counted=True)
        self._evict(self._served, counted=False)

    def _arrive(
        self,
        mine: OrderedDict[str, Side],
        theirs: OrderedDict[str, Side],
        key: str,
        side: Side,
        *,
        copy: bool,
    ) -> None:
        other = theirs.pop(key, None)
        if other is None:
            mine[key] = side
            mine.move_to_end(key)
        elif copy:
            self._pair(other, side)
        else:
            self._pair(side, other)

    def _evict(self, buffer: OrderedDict[str, Side], *, counted: bool) -> None:
        horizon = self._newest - self._max_wait_s
        while buffer and (len(buffer) > self._max_unmatched or next(iter(buffer.values())).ts < horizon):
            buffer.popitem(last=False)
            self.unpaired += counted

    def _pair(self, served: Side, copy: Side) -> None:
        t = self.tally
        t.pairs += 1
        t.served_errors += served.error
        t.copy_errors += copy.error
        both_checked = served.checked and copy.checked
        if both_checked:
            t.checked += 1
            t.served_invalid += served.invalid
            t.copy_invalid += copy.invalid
        unit = copy.unit if copy.unit is not None else served.unit
        for name, test in self.tests.items():
            a, b = (
                (served.invalid, copy.invalid) if name == "invalid_call_rate" else (served.error, copy.error)
            )
            counts = both_checked or name == "error_rate"
            if counts and a != b and self._first(name, unit):
                test.observe(b, PAIRED_RHO)
        ratios = (
            ("latency_per_output_token", served.latency_per_token, copy.latency_per_token),
            ("cost_per_request", served.cost, copy.cost),
        )
        for name, base, cand in ratios:
            if base is not None and cand is not None and base > 0:
                self.ratios[name].add(unit, cand / base)

    def _first(self, name: str, unit: float | None) -> bool:
        return first_of_unit(self._seen[name], unit)


def rate_check(name: str, guardrail: RateGuardrail, test: CountTest, pairs: int) -> Check:
    """The count test over discordant pairs: FAIL once M >= 1/alpha."""
    counts = {"candidate_only": test.x_b, "baseline_only": test.x_a, "pairs": pairs}
    return count_check(name, guardrail, test, counts)


def ratio_check(name: str, guardrail: RatioGuardrail, ratios: list[float]) -> Check:
    """The median of the per-pair ratios against `max_ratio`: FAIL only when its 95 % interval lies above it."""
    counts: dict[str, Any] = {"pairs": len(ratios)}
    if len(ratios) < guardrail.min_samples:
        return Check(name, Verdict.INCONCLUSIVE, math.nan, guardrail.max_ratio, counts)
    middle = median(ratios)
    low, high = median_interval(ratios)
    counts.update(ratio_low=low, ratio_high=high)
    if low > guardrail.max_ratio:
        verdict = Verdict.FAIL
    elif middle <= guardrail.max_ratio:
        verdict = Verdict.PASS
    else:
        verdict = Verdict.INCONCLUSIVE
    return Check(name, verdict, middle, guardrail.max_ratio, counts)


def checks(spec: CanarySpec, evidence: PairedEvidence) -> tuple[Check, ...]:
    g = spec.guardrails
    t = evidence.tally
    out = [
        rate_check(name, r, evidence.tests[name], t.checked if name == "invalid_call_rate" else t.pairs)
        for name, r in (("invalid_call_rate", g.invalid_call_rate), ("error_rate", g.error_rate))
        if r is not None
    ]
    for name, ratio in (
        ("latency_per_output_token", g.latency_per_output_token),
        ("cost_per_request", g.cost_per_request),
    ):
        if ratio is not None:
            out.append(ratio_check(name, ratio, evidence.ratios[name].values()))
    return tuple(out)


def look(spec: CanarySpec, evidence: PairedEvidence, started_at: float, now: float) -> Look:
    """Fail when any guardrail failed; pass once there are `shadow_requests` pairs and every guardrail passed; else
    hold. `candidate_requests` is what the policy routed to the candidate meanwhile (0)."""
    found = checks(spec, evidence)
    met = evidence.pairs >= (spec.shadow_requests or 0)
    outcome: Outcome = "hold"
    if any(c.verdict is Verdict.FAIL for c in found):
        outcome = "fail"
    elif met and all(c.verdict is Verdict.PASS for c in found):
        outcome = "pass"
    minutes = max(0.0, now - started_at) / 60.0
    return Look(outcome, 0, 0.0, found, met, evidence.users_served, minutes, pairs=evidence.pairs)


def describe(spec: CanarySpec, evidence: PairedEvidence, seen: Look) -> dict[str, Any]:
    """A shadow-phase look with the numbers behind it (the audit entry's detail, the status answer, the report):
    `phase` "shadow", `users_served`, the pairs against `shadow_requests`, both sides' invalid calls (over the
    checked pairs, with 95 % Wilson intervals) and errors, and each guardrail's statistic, bound and counts."""
    t = evidence.tally
    return {
        "phase": "shadow",
        "step": seen.step,
        "share": seen.share,
        "outcome": seen.outcome,
        "unit": spec.unit,
        "users_served": seen.candidate_requests,
        "minimums": {"pairs": [t.pairs, spec.shadow_requests], "minutes": [round(seen.minutes, 3), 0.0]},
        "pairs": {
            "paired": t.pairs,
            "checked": t.checked,
            "waiting": evidence.waiting,
            "unpaired": evidence.unpaired,
        },
        "candidate": _summary(t.pairs, t.checked, t.copy_invalid, t.copy_errors),
        "baseline": _summary(t.pairs, t.checked, t.served_invalid, t.served_errors),
        "checks": [c.as_dict() for c in seen.checks],
    }


def _summary(pairs: int, checked: int, invalid: int, errors: int) -> dict[str, Any]:
    return {
        "requests": pairs,
        "checked": checked,
        "invalid": invalid,
        "invalid_rate": invalid / checked if checked else None,
        "invalid_ci": wilson(invalid, checked),
        "errors": errors,
        "error_rate": errors / pairs if pairs else None,
        "error_ci": wilson(errors, pairs),
    }
