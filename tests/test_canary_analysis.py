"""The pure canary core: what a record says (arm, share, events), the evidence and its checks, the look's outcome,
the transitions, and the compare-and-set that lets one of several processes decide. Plus the request-log upgrade
that added the columns the analysis reads."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.canary.analysis import Evidence, Observation, describe, look, observation, ratio_check
from gateway.canary.machine import CanaryState, after_look, initial, operate, weights
from gateway.canary.spec import CanarySpec, Guardrails, RateGuardrail, RatioGuardrail
from gateway.canary.stats import CountTest, Verdict
from gateway.records import FIELDS, Record
from gateway.store.request_log import RecordWriter, connect, read_records

SPEC = CanarySpec(
    candidate="new",
    baseline="old",
    steps=(5.0, 10.0, 50.0, 100.0),
    min_requests_per_step=10,
    min_minutes_per_step=1.0,
    guardrails=Guardrails(
        invalid_call_rate=RateGuardrail(0.05),
        error_rate=RateGuardrail(0.05),
        latency_per_output_token=RatioGuardrail(1.25, 20),
    ),
)


def rec(variant: str = "new", share: float = 0.1, **kw: object) -> Record:
    return Record(ts=kw.pop("ts", 100.0), request_id="r", route="crm", variant=variant, share=share, **kw)  # type: ignore[arg-type]


def test_a_record_counts_for_the_arm_the_policy_routed_it_to() -> None:
    served = observation(SPEC, rec("new", 0.1, tool_verdict="invalid", e2e_s=1.5, output_tokens=12, cost=0.5))
    assert served == Observation(100.0, "candidate", 0.1, invalid=True, latency_per_token=0.125, cost=0.5)
    base = observation(SPEC, rec("old", 0.9, outcome="engine_timeout"))
    assert base is not None and (base.arm, base.rho, base.error, base.cost) == (
        "baseline",
        pytest.approx(0.1),
        True,
        None,
    )
    # The candidate failed before its first byte and the baseline answered: an error of the candidate.
    fell = observation(SPEC, rec("old", 0.9, fallback_from="new", fallback_reason="engine_unreachable"))
    assert fell is not None and (fell.arm, fell.error, fell.invalid) == ("candidate", True, False)
    assert fell.rho == pytest.approx(0.1) and fell.latency_per_token is None
    # Enforce mode retried an invalid tool call on the baseline: an invalid call of the candidate.
    retried = observation(SPEC, rec("old", 0.9, fallback_from="new", fallback_reason="schema_violation"))
    assert retried is not None and (retried.arm, retried.invalid, retried.error) == ("candidate", True, False)
    assert observation(SPEC, rec("new", 0.1, forced=True)) is None  # the client chose: not routed by policy
    # A shadow copy answered nobody: never evidence, whichever variant answered it.
    assert observation(SPEC, rec("new", 0.1, tool_verdict="invalid", shadow=True, primary_id="p")) is None
    assert observation(SPEC, rec("third", 0.1)) is None
    assert observation(SPEC, rec("new", 0.0)) is None  # inconsistent with any canary routing
    assert observation(SPEC, rec("new", 0.1, outcome="client_error")) == Observation(100.0, "candidate", 0.1)


def test_the_count_test_through_the_evidence_reproduces_the_notes_check_value() -> None:
    evidence = Evidence(SPEC)
    for i in range(45):
        evidence.add(Observation(float(i), "baseline", 0.1, invalid=True))
    for i in range(12):
        evidence.add(Observation(float(i), "candidate", 0.1, invalid=True))
    assert evidence.tests["invalid_call_rate"].m == pytest.approx(9.390, abs=5e-4)
    bulk = Evidence(SPEC)
    bulk.add_counts("baseline", 0.1, 900, 45, 0, 0.0)
    bulk.add_counts("candidate", 0.1, 100, 12, 0, 0.0)
    assert bulk.tests["invalid_call_rate"].m == pytest.approx(9.390, abs=5e-4)
    assert bulk.tests["error_rate"].m == 1.0 and bulk.total["candidate"].requests == 100


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.05, 0.1, 0.5])), max_size=60))
def test_counting_in_bulk_is_the_same_as_one_by_one(events: list[tuple[bool, float]]) -> None:
    one, bulk = CountTest(), CountTest()
    for from_candidate, rho in events:
        one.observe(from_candidate, rho)
    for key in {(c, r) for c, r in events}:
        bulk.observe_many(*key, events.count(key))
    assert bulk.log_m == pytest.approx(one.log_m, abs=1e-9) and (bulk.x_a, bulk.x_b) == (one.x_a, one.x_b)


def test_with_unit_user_a_user_counts_once_per_event_kind() -> None:
    spec = CanarySpec("new", "old", (10.0, 100.0), 1, 0.0, unit="user", guardrails=SPEC.guardrails)
    evidence = Evidence(spec)
    for _ in range(5):
        evidence.add(observation(spec, rec("new", 0.1, tool_verdict="invalid", bucket=0.95)))  # type: ignore[arg-type]
    evidence.add(observation(spec, rec("new", 0.1, tool_verdict="invalid", bucket=0.97)))  # type: ignore[arg-type]
    assert evidence.tests["invalid_call_rate"].x_b == 2 and evidence.total["candidate"].invalid == 6
    with pytest.raises(ValueError, match="unit = 'request'"):
        evidence.add_counts("candidate", 0.1, 1, 0, 0, 0.0)


def test_with_unit_user_a_user_is_one_latency_and_cost_sample() -> None:
    """One heavy user's slow requests must not outvote twenty users: per request the candidate's median would be
    that user's latency (ten times the baseline's, a clear fail); per user it is the other users'."""
    guard = RatioGuardrail(1.25, 20)
    spec = CanarySpec(
        "new",
        "old",
        (10.0, 100.0),
        1,
        0.0,
        unit="user",
        guardrails=Guardrails(latency_per_output_token=guard),
    )
    evidence = Evidence(spec)
    slow = {"e2e_s": 10.0, "output_tokens": 10, "cost": 0.5}
    for _ in range(60):
        evidence.add(observation(spec, rec("new", 0.1, bucket=0.5, **slow)))  # type: ignore[arg-type]
    for user in range(20):
        fast = {"e2e_s": 1.0 + user / 100, "output_tokens": 10, "cost": 0.1}
        evidence.add(observation(spec, rec("new", 0.1, bucket=user / 100, **fast)))  # type: ignore[arg-type]
        evidence.add(observation(spec, rec("old", 0.9, bucket=0.6 + user / 100, **fast)))  # type: ignore[arg-type]
    candidate = evidence.step["candidate"]
    assert candidate.requests == 80 and len(candidate.latency) == len(candidate.cost) == 21  # 21 users
    (check,) = look(spec, evidence, 0, 1.0).checks
    assert check.verdict is Verdict.PASS and check.statistic == pytest.approx(1.0, abs=0.02)
    per_request = [0.1 * (1.0 + u / 100) for u in range(20)] + [1.0] * 60
    assert (
        ratio_check("latency", guard, per_request, evidence.step["baseline"].latency).verdict is Verdict.FAIL
    )
    # Without a sticky key a request is its own unit, as with unit = "request".
    evidence.add(observation(spec, rec("new", 0.1, **slow)))  # type: ignore[arg-type]
    assert len(evidence.step["candidate"].latency) == 22


def test_ratio_checks_fail_only_when_clearly_worse() -> None:
    guard = RatioGuardrail(1.25, 20)
    same = [0.01 * (1 + i % 7) for i in range(200)]
    assert ratio_check("latency", guard, same, same).verdict is Verdict.PASS
    assert ratio_check("latency", guard, [2 * v for v in same], same).verdict is Verdict.FAIL
    few = ratio_check("latency", guard, same[:19], same)
    assert few.verdict is Verdict.INCONCLUSIVE and math.isnan(few.statistic)
    # 1.3 times slower on a small, spread sample: over the tolerance, but not clearly: hold, do not fail.
    spread = [0.01 * (1 + i % 10) for i in range(20)]
    unclear = ratio_check("latency", guard, [1.3 * v for v in spread], spread)
    assert unclear.verdict is Verdict.INCONCLUSIVE and unclear.statistic == pytest.approx(1.3)


def _evidence(candidate: int, invalid: int, start: float = 0.0) -> Evidence:
    evidence = Evidence(SPEC, step_start=start)
    for i in range(candidate):
        evidence.add(Observation(start + 1, "candidate", 0.05, invalid=i < invalid, latency_per_token=0.01))
    for _ in range(400):
        evidence.add(Observation(start + 1, "baseline", 0.05, latency_per_token=0.01))
    return evidence


def test_a_look_holds_until_the_minimums_are_met_then_passes_or_fails() -> None:
    assert look(SPEC, _evidence(25, 0), 0, now=30.0).outcome == "hold"  # half a minute of the one required
    passed = look(SPEC, _evidence(25, 0), 0, now=61.0)
    assert passed.outcome == "pass" and passed.minimums_met
    assert look(SPEC, _evidence(5, 0), 0, now=61.0).outcome == "hold"  # too few candidate requests
    failed = look(SPEC, _evidence(25, 25), 0, now=1.0)  # minimums are not needed to fail
    assert failed.outcome == "fail" and failed.failed is not None
    assert failed.failed.guardrail == "invalid_call_rate" and failed.failed.statistic >= 20
    detail = describe(SPEC, _evidence(25, 25), failed)
    assert detail["candidate"]["invalid"] == 25 and detail["candidate"]["invalid_ci"][0] > 0.8
    assert detail["checks"][0]["p_candidate_worse"] > 0.99


def test_transitions_after_a_look() -> None:
    state = initial("crm", "k", 0.0)
    passed = look(SPEC, _evidence(25, 0), 0, now=61.0)
    move = after_look(SPEC, state, passed, 61.0)
    assert move is not None and move.action == "canary_advance" and move.state.step == 1
    assert move.state.step_started_at == 61.0 and move.state.revision == 1
    at_50 = CanaryState("crm", "k", "running", 2, 0.0, 0.0, 0.0, 3)
    promoted = after_look(SPEC, at_50, look(SPEC, _evidence(25, 0), 2, 61.0), 61.0)
    assert (
        promoted is not None and promoted.action == "canary_promote" and promoted.state.status == "promoted"
    )
    failed = look(SPEC, _evidence(25, 25), 0, now=1.0)
    killed = after_look(SPEC, state, failed, 1.0)
    assert killed is not None and killed.kill and killed.state.status == "killed"
    assert "invalid_call_rate" in killed.reason and "step 1/4 (5 %)" in killed.reason
    held = after_look(CanarySpec(**{**_fields(SPEC), "on_fail": "hold"}), state, failed, 1.0)
    assert held is not None and not held.kill and held.state.status == "held"
    paused = CanaryState("crm", "k", "paused", 0, 0.0, 0.0, 0.0)
    assert after_look(SPEC, paused, passed, 61.0) is None  # paused: no advance
    assert after_look(SPEC, paused, failed, 1.0).kill  # type: ignore[union-attr]  # but guardrails still act


def _fields(spec: CanarySpec) -> dict[str, object]:
    return {name: getattr(spec, name) for name in spec.__slots__}


def test_operators_transitions() -> None:
    state = initial("crm", "k", 0.0)
    paused = operate(SPEC, state, "pause", 5.0, "look").state
    assert paused.status == "paused"
    with pytest.raises(ValueError, match="cannot pause a canary that is paused"):
        operate(SPEC, paused, "pause", 6.0, "again")
    held = CanaryState("crm", "k", "held", 1, 10.0, 0.0, 0.0)
    resumed = operate(SPEC, held, "resume", 50.0, "fixed").state
    assert (resumed.status, resumed.epoch, resumed.step_started_at, resumed.step) == (
        "running",
        50.0,
        50.0,
        1,
    )
    promoted = operate(SPEC, state, "promote", 7.0, "ship").state
    assert (promoted.status, promoted.step) == ("promoted", 3) and weights(SPEC, promoted) == (100.0, 0.0)
    aborted = operate(SPEC, promoted, "abort", 8.0, "back").state
    assert weights(SPEC, aborted) == (0.0, 100.0)
    with pytest.raises(ValueError):
        operate(SPEC, aborted, "resume", 9.0, "no")


@given(
    st.integers(0, 3),
    st.sampled_from(["shadow", "running", "paused", "held", "killed", "aborted", "promoted"]),
)
def test_weights_always_give_the_route_whole(step: int, status: str) -> None:
    cand, base = weights(SPEC, CanaryState("crm", "k", status, step, 0, 0, 0))  # type: ignore[arg-type]
    assert cand + base == 100.0 and (status not in ("running", "paused", "held") or cand == SPEC.steps[step])


def test_an_older_request_log_gains_the_canary_columns(tmp_path: Path) -> None:
    path = tmp_path / "requests.db"
    old = [
        f for f in FIELDS if f not in ("forced", "bucket", "engine_url", "shadow", "primary_id")
    ]  # version 1
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE records ({', '.join(old)})")
        db.execute("INSERT INTO records (ts, request_id, route, stream) VALUES (1.0, 'old', 'crm', 0)")
        db.execute("PRAGMA user_version = 1")
    connect(path).close()
    writer = RecordWriter(path)
    writer.start()
    writer.submit(Record(ts=2.0, request_id="new", route="crm", forced=True, bucket=0.25))
    writer.close()
    first, second = read_records(path)
    assert (first.forced, first.bucket) == (False, None)
    assert (second.forced, second.bucket) == (True, 0.25)
