"""The shadow-gated canary's pure parts (`[canary] shadow_requests`): the policy refuses a shadow phase without copies
of the candidate; the phase routes nobody to the candidate and keeps its copies, which stop once it is over; the
candidate's copies are paired with the requests they copied, in either order, and only those; the guardrails on the
pairs (the count test on discordant pairs with rho = 1/2, the median of the per-pair ratios); and the transitions: a
fail kills (whatever `on_fail` says) with no user served, a pass starts the first step with fresh evidence."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.canary.machine import (
    CanaryState,
    after_look,
    canary_key,
    initial,
    operate,
    weights,
    with_canaries,
)
from gateway.canary.paired import PairedEvidence, describe, look
from gateway.canary.spec import CanarySpec, Guardrails, RateGuardrail, RatioGuardrail
from gateway.canary.stats import Verdict
from gateway.control.policies import load_policies
from gateway.errors import ConfigError
from gateway.policy import PolicySnapshot, Switches, Timeouts, plan
from gateway.records import Record
from tests.conftest import CRM_POLICY

ENGINES = {"default": "http://127.0.0.1:8001"}
DEFAULTS = Timeouts(2.0, 60.0, 300.0)
CANARY = """
[canary]
candidate = "formatter"
baseline = "baseline"
steps = [5, 25, 100]
shadow_requests = 300

[canary.guardrails]
invalid_call_rate = { alpha = 0.05 }
"""
SHADOW = '\n[shadow]\nvariant = "formatter"\nshare = 20\n'

SPEC = CanarySpec(
    candidate="new",
    baseline="old",
    steps=(5.0, 25.0, 100.0),
    min_requests_per_step=10,
    min_minutes_per_step=0.0,
    on_fail="hold",  # the shadow phase kills anyway
    guardrails=Guardrails(
        invalid_call_rate=RateGuardrail(0.05),
        error_rate=RateGuardrail(0.05),
        latency_per_output_token=RatioGuardrail(1.25, 20),
    ),
    shadow_requests=40,
)
_ids = iter(range(10**9))


def load(tmp_path: Path, text: str) -> PolicySnapshot:
    (tmp_path / "crm.toml").write_text(text)
    return load_policies(tmp_path, ENGINES, DEFAULTS)


# -- the policy ------------------------------------------------------------------------------------------------


def test_shadow_requests_loads_with_a_shadow_of_the_candidate(tmp_path: Path) -> None:
    route = load(tmp_path, CRM_POLICY + SHADOW + CANARY).routes["crm-assistant"]
    assert route.canary is not None and route.canary.shadow_requests == 300
    without = load(tmp_path, CRM_POLICY + CANARY.replace("shadow_requests = 300\n", ""))
    assert without.routes["crm-assistant"].canary.shadow_requests is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            CRM_POLICY + CANARY,
            "canary.shadow_requests: the shadow phase pairs copies answered by the candidate",
        ),
        (
            CRM_POLICY + SHADOW.replace('"formatter"', '"baseline"') + CANARY,
            "add a [shadow] table with variant = 'formatter'",
        ),
        (CRM_POLICY + SHADOW.replace("share = 20", "share = 0") + CANARY, "share is 0"),
        (CRM_POLICY + SHADOW + CANARY.replace("= 300", "= 0"), "canary.shadow_requests"),
        (CRM_POLICY + SHADOW + CANARY.replace("= 300", '= "300"'), "canary.shadow_requests"),
    ],
)
def test_a_shadow_phase_without_copies_of_the_candidate_is_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert message in err.value.message and "crm.toml" in err.value.message


def test_the_shadow_phase_routes_nobody_to_the_candidate_and_copies_stop_after_it(tmp_path: Path) -> None:
    policy = load(tmp_path, CRM_POLICY + SHADOW + CANARY)
    route = policy.routes["crm-assistant"]
    first = plan(with_canaries(policy, {}).routes["crm-assistant"], Switches())
    assert first.shares == {"baseline": 1.0, "formatter": 0.0}
    assert first.shadow is not None and first.shadow.variant.name == "formatter"
    for status, shares in (("running", {"baseline": 0.95, "formatter": 0.05}), ("killed", None)):
        state = CanaryState("crm-assistant", canary_key(route), status, 0, 0, 0, 0)  # type: ignore[arg-type]
        after = plan(with_canaries(policy, {"crm-assistant": state}).routes["crm-assistant"], Switches())
        assert after.shadow is None
        assert shares is None or after.shares == pytest.approx(shares)
    # A canary without a shadow phase leaves the route's [shadow] as written.
    plain = load(tmp_path, CRM_POLICY + SHADOW + CANARY.replace("shadow_requests = 300\n", ""))
    assert plan(with_canaries(plain, {}).routes["crm-assistant"], Switches()).shadow is not None


# -- the machine -----------------------------------------------------------------------------------------------


def test_a_canary_with_a_shadow_phase_starts_in_it_serving_nobody() -> None:
    state = initial("crm", "k", 5.0, SPEC)
    assert (state.status, state.step, state.epoch) == ("shadow", 0, 5.0) and weights(SPEC, state) == (
        0.0,
        100.0,
    )
    plain = CanarySpec(**{**_fields(SPEC), "shadow_requests": None})
    assert (
        initial("crm", "k", 5.0, plain).status == "running" and initial("crm", "k", 5.0).status == "running"
    )


def test_a_failed_shadow_phase_kills_whatever_on_fail_says_and_says_no_user_was_served() -> None:
    evidence = PairedEvidence(SPEC)
    for _ in range(12):
        _pair(evidence, base={"tool_verdict": "valid"}, cand={"tool_verdict": "invalid"})
    seen = look(SPEC, evidence, 0.0, 60.0)
    assert seen.outcome == "fail" and not seen.minimums_met  # a fail needs no minimum
    move = after_look(SPEC, initial("crm", "k", 0.0, SPEC), seen, 60.0)
    assert move is not None and move.kill and move.action == "canary_kill" and move.state.status == "killed"
    assert move.reason.startswith("invalid_call_rate: ")
    assert "in the shadow phase (12/40 pairs): no user was served by the candidate" in move.reason
    detail = describe(SPEC, evidence, seen)
    assert (detail["phase"], detail["users_served"], detail["minimums"]["pairs"]) == ("shadow", 0, [12, 40])
    assert detail["candidate"]["invalid"] == 12 and detail["baseline"]["invalid"] == 0


def test_a_passed_shadow_phase_starts_the_first_step_with_fresh_evidence() -> None:
    evidence = PairedEvidence(SPEC)
    state = initial("crm", "k", 0.0, SPEC)
    for i in range(40):
        if i == 39:
            assert look(SPEC, evidence, 0.0, 1.0).outcome == "hold"  # 39 pairs: not yet
            assert after_look(SPEC, state, look(SPEC, evidence, 0.0, 1.0), 1.0) is None
        _pair(evidence, base={"e2e_s": 1.0, "output_tokens": 10}, cand={"e2e_s": 1.1, "output_tokens": 10})
    seen = look(SPEC, evidence, 0.0, 90.0)
    assert seen.outcome == "pass" and seen.pairs == 40
    move = after_look(SPEC, state, seen, 90.0)
    assert move is not None and not move.kill and move.action == "canary_advance"
    assert (move.state.status, move.state.step, move.state.step_started_at, move.state.epoch) == (
        "running",
        0,
        90.0,
        90.0,
    )
    assert move.reason == "shadow phase passed (40/40 pairs): now 5 %"
    assert weights(SPEC, move.state) == (5.0, 95.0)


def test_operators_may_promote_or_abort_a_shadow_phase_not_pause_it() -> None:
    state = initial("crm", "k", 0.0, SPEC)
    promoted = operate(SPEC, state, "promote", 1.0, "ship").state
    assert (promoted.status, weights(SPEC, promoted)) == ("promoted", (100.0, 0.0))
    assert operate(SPEC, state, "abort", 1.0, "no").state.status == "aborted"
    for op in ("pause", "resume"):
        with pytest.raises(ValueError, match=f"cannot {op} a canary that is shadow"):
            operate(SPEC, state, op, 1.0, "x")  # type: ignore[arg-type]


# -- the pairs -------------------------------------------------------------------------------------------------


def served(request_id: str, variant: str = "old", **kw: object) -> Record:
    fields: dict[str, object] = {"ts": 100.0, "route": "crm", "variant": variant, "share": 1.0, **kw}
    return Record(request_id=request_id, **fields)  # type: ignore[arg-type]


def copy(primary: str, variant: str = "new", **kw: object) -> Record:
    fields: dict[str, object] = {"ts": 100.0, "route": "crm", "variant": variant, "share": 0.2, **kw}
    return Record(request_id=f"{primary}-shadow", shadow=True, primary_id=primary, **fields)  # type: ignore[arg-type]


def _pair(evidence: PairedEvidence, *, base: dict[str, object], cand: dict[str, object]) -> None:
    """One pair: a request the baseline answered with `base`'s fields, and the candidate's copy with `cand`'s."""
    rid = f"r{next(_ids)}"
    evidence.add(served(rid, **base))
    evidence.add(copy(rid, **cand))


def test_copies_pair_with_their_requests_in_either_order_and_only_those() -> None:
    evidence = PairedEvidence(SPEC)
    evidence.add(served("a"))
    evidence.add(copy("a"))
    evidence.add(copy("b"))  # the copy committed first
    assert evidence.pairs == 1 and evidence.waiting == 1
    evidence.add(served("b"))
    assert evidence.pairs == 2 and evidence.waiting == 0
    evidence.add(served("c", forced=True))  # named its variant: not routed by policy
    evidence.add(copy("c"))
    evidence.add(served("d"))
    evidence.add(copy("d", outcome="shadow_dropped", error_code="in_flight_limit"))
    evidence.add(served("e"))
    evidence.add(copy("e", outcome="server_shutdown"))  # cut at shutdown: says nothing of the candidate
    evidence.add(served("f"))
    evidence.add(copy("f", variant="third"))  # another variant's copy
    evidence.add(served("g", variant="third"))
    evidence.add(copy("g"))
    assert evidence.pairs == 2 and evidence.waiting == 2  # c and g wait for a request that will not come
    assert evidence.users_served == 0
    evidence.add(served("h", variant="new"))
    evidence.add(served("i", variant="new", forced=True))  # a load test naming the candidate: not a user's
    assert evidence.users_served == 1


def test_a_copy_whose_request_never_comes_is_dropped_from_the_buffer() -> None:
    evidence = PairedEvidence(SPEC, max_wait_s=60.0, max_unmatched=3)
    evidence.add(copy("early", ts=10.0))
    evidence.add(served("later", ts=71.0))
    assert evidence.waiting == 0 and evidence.unpaired == 1
    for i in range(5):
        evidence.add(copy(f"x{i}", ts=80.0))
    assert evidence.waiting == 3 and evidence.unpaired == 3
    evidence.add(served("x4", ts=80.0))  # the newest copy is still there
    assert evidence.pairs == 1


def _m(x_a: int, x_b: int, grid: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0, 5.0)) -> float:
    """docs/canary-statistics.md §1 at rho = 1/2: q(r) = r / (r + 1)."""
    rho = 0.5
    total = 0.0
    for r in grid:
        q = rho * r / (rho * r + 1 - rho)
        total += (q / rho) ** x_b * ((1 - q) / (1 - rho)) ** x_a / len(grid)
    return total


def test_discordant_pairs_feed_the_count_test_at_rho_one_half() -> None:
    evidence = PairedEvidence(SPEC)
    for _ in range(7):  # invalid only on the candidate's copy
        _pair(evidence, base={"tool_verdict": "valid"}, cand={"tool_verdict": "invalid"})
    for _ in range(3):  # invalid only on the served answer
        _pair(evidence, base={"tool_verdict": "invalid"}, cand={"tool_verdict": "valid"})
    for _ in range(4):  # concordant: both invalid, both valid
        _pair(evidence, base={"tool_verdict": "invalid"}, cand={"tool_verdict": "invalid"})
        _pair(evidence, base={"tool_verdict": "valid"}, cand={"tool_verdict": "valid"})
    for _ in range(5):  # the served side's verdict not checked: no invalid-call evidence, but errors count
        _pair(
            evidence,
            base={"tool_verdict": "none"},
            cand={"tool_verdict": "invalid", "outcome": "engine_error"},
        )
    _pair(evidence, base={"outcome": "engine_timeout"}, cand={})
    test = evidence.tests["invalid_call_rate"]
    assert (test.x_b, test.x_a) == (7, 3) and test.m == pytest.approx(_m(3, 7), rel=1e-9)
    errors = evidence.tests["error_rate"]
    assert (errors.x_b, errors.x_a) == (5, 1) and errors.m == pytest.approx(_m(1, 5), rel=1e-9)
    checks = {c.guardrail: c for c in look(SPEC, evidence, 0.0, 1.0).checks}
    invalid = checks["invalid_call_rate"]
    assert (invalid.counts["candidate_only"], invalid.counts["baseline_only"], invalid.counts["pairs"]) == (
        7,
        3,
        18,
    )
    assert invalid.statistic == pytest.approx(_m(3, 7), rel=1e-9) and invalid.bound == 20.0
    assert checks["error_rate"].counts["pairs"] == 24


@pytest.mark.parametrize(("x_b", "x_a", "expected"), [(12, 3, 9.928), (20, 6, 26.253), (10, 10, 0.383)])
def test_the_paired_check_values_of_the_statistics_page(x_b: int, x_a: int, expected: float) -> None:
    """docs/canary-statistics.md §6: x_b pairs invalid only on the candidate's copy, x_a only on the served answer."""
    evidence = PairedEvidence(SPEC)
    for _ in range(x_b):
        _pair(evidence, base={"tool_verdict": "valid"}, cand={"tool_verdict": "invalid"})
    for _ in range(x_a):
        _pair(evidence, base={"tool_verdict": "invalid"}, cand={"tool_verdict": "valid"})
    check = next(c for c in look(SPEC, evidence, 0.0, 1.0).checks if c.guardrail == "invalid_call_rate")
    assert check.statistic == pytest.approx(expected, abs=5e-4)
    assert check.verdict is (Verdict.FAIL if expected >= 20 else Verdict.PASS)


def test_the_count_test_fails_exactly_when_m_reaches_one_over_alpha() -> None:
    x_b = next(n for n in range(1, 100) if _m(0, n) >= 20.0)  # candidate-only pairs, none the other way
    evidence = PairedEvidence(SPEC)
    for n in range(1, x_b + 1):
        _pair(evidence, base={"tool_verdict": "valid"}, cand={"tool_verdict": "invalid"})
        verdict = next(c for c in look(SPEC, evidence, 0.0, 1.0).checks if c.guardrail == "invalid_call_rate")
        assert verdict.verdict is (Verdict.FAIL if n == x_b else Verdict.PASS)


def test_with_unit_user_a_user_counts_once_per_guardrail_and_is_one_ratio_sample() -> None:
    spec = CanarySpec(**{**_fields(SPEC), "unit": "user"})
    evidence = PairedEvidence(spec)
    for _ in range(6):
        _pair(
            evidence,
            base={"tool_verdict": "valid", "bucket": 0.5, "e2e_s": 1.0, "output_tokens": 10},
            cand={"tool_verdict": "invalid", "bucket": 0.5, "e2e_s": 3.0, "output_tokens": 10},
        )
    assert evidence.tests["invalid_call_rate"].x_b == 1 and evidence.pairs == 6
    assert evidence.ratios["latency_per_output_token"].values() == [pytest.approx(3.0)]


def test_ratio_checks_on_pairs_fail_only_when_the_median_ratio_is_clearly_above() -> None:
    def latency(ratios: list[float]) -> Verdict:
        evidence = PairedEvidence(SPEC)
        for r in ratios:
            _pair(evidence, base={"e2e_s": 1.0, "output_tokens": 10}, cand={"e2e_s": r, "output_tokens": 10})
        return next(
            c for c in look(SPEC, evidence, 0.0, 1.0).checks if c.guardrail == "latency_per_output_token"
        ).verdict

    assert latency([2.0] * 19) is Verdict.INCONCLUSIVE  # min_samples = 20 pairs
    assert latency([2.0] * 20) is Verdict.FAIL
    assert latency([1.0 + i / 100 for i in range(40)]) is Verdict.PASS  # median 1.195 ≤ 1.25
    assert latency([1.0] * 20 + [1.5] * 21) is Verdict.INCONCLUSIVE  # median 1.5, its interval reaches 1.0
    # A copy that failed has no latency: no ratio.
    evidence = PairedEvidence(SPEC)
    _pair(evidence, base={"e2e_s": 1.0, "output_tokens": 10}, cand={"outcome": "engine_error"})
    assert evidence.ratios["latency_per_output_token"].values() == []


def _fields(spec: CanarySpec) -> dict[str, object]:
    return {name: getattr(spec, name) for name in spec.__slots__}
