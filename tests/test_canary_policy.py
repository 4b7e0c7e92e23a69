"""`[canary]` in a route's policy: the issue's example loads as written; every bad canary is refused by name; the
step share becomes the candidate's routing share, and sticky users keep their variant as the share grows."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.canary.machine import CanaryState, canary_key, with_canaries
from gateway.canary.spec import Guardrails, RateGuardrail, RatioGuardrail
from gateway.control.adapters import scan
from gateway.control.live import LiveView
from gateway.control.policies import load_policies
from gateway.errors import ConfigError
from gateway.policy import PolicySnapshot, Switches, Timeouts, bucket, plan
from tests.adapter_factory import adapter_policy, make_adapter
from tests.conftest import CRM_POLICY

ENGINES = {"default": "http://127.0.0.1:8001"}
DEFAULTS = Timeouts(2.0, 60.0, 300.0)

# Exactly as in issue 4.
ISSUE_CANARY = """
[canary]
candidate = "formatter"              # a variant of this route
baseline = "baseline"
steps = [5, 10, 25, 50, 100]         # percent of the route's traffic
min_requests_per_step = 400          # candidate requests before a step may end
min_minutes_per_step = 2
unit = "user"                        # "request" or "user" (the sticky key); see the statistics notes
on_fail = "kill"                     # kill | hold

[canary.guardrails]
invalid_call_rate = { alpha = 0.05 }                 # anytime-valid test, candidate vs baseline
error_rate = { alpha = 0.05 }
latency_per_output_token = { max_ratio = 1.25 }      # candidate / baseline, with a tolerance
cost_per_request = { max_ratio = 1.10 }
"""


def load(tmp_path: Path, text: str) -> PolicySnapshot:
    (tmp_path / "crm.toml").write_text(text)
    return load_policies(tmp_path, ENGINES, DEFAULTS)


def test_the_issue_example_loads_as_written(tmp_path: Path) -> None:
    route = load(tmp_path, CRM_POLICY + ISSUE_CANARY).routes["crm-assistant"]
    spec = route.canary
    assert spec is not None
    assert (spec.candidate, spec.baseline, spec.steps) == ("formatter", "baseline", (5, 10, 25, 50, 100))
    assert (spec.min_requests_per_step, spec.min_minutes_per_step, spec.unit, spec.on_fail) == (
        400,
        2,
        "user",
        "kill",
    )
    assert spec.guardrails == Guardrails(
        RateGuardrail(0.05), RateGuardrail(0.05), RatioGuardrail(1.25, 100), RatioGuardrail(1.10, 100)
    )


BAD = [
    ('candidate = "formatter"', 'candidate = "nope"', "canary.candidate: 'nope' is not a variant"),
    ('baseline = "baseline"', 'baseline = "formatter"', "two different variants"),
    ("steps = [5, 10, 25, 50, 100]", "steps = [5, 25, 10, 100]", "steps must increase strictly"),
    ("steps = [5, 10, 25, 50, 100]", "steps = [5, 10, 50]", "steps must end at 100"),
    ("steps = [5, 10, 25, 50, 100]", "steps = [100]", "at least 2"),
    ("steps = [5, 10, 25, 50, 100]", "steps = [0, 100]", "greater than 0"),
    ('on_fail = "kill"', 'on_fail = "page"', "on_fail"),
    ('unit = "user"', 'unit = "session"', "unit"),
    ("min_requests_per_step = 400", "min_requests_per_step = 0", "min_requests_per_step"),
    ("{ alpha = 0.05 }                 #", "{ alpha = 1.5 }  #", "alpha"),
    ("{ max_ratio = 1.25 }", "{ max_ratio = 0.9 }", "max_ratio"),
    ("{ max_ratio = 1.25 }", "{ max_ratio = 1.25, window = 3 }", "window"),
    ("min_minutes_per_step = 2", "min_minutes_per_step = 2\nspeed = 1", "speed"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD)
def test_bad_canaries_are_refused_naming_the_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in ISSUE_CANARY
    with pytest.raises(ConfigError) as err:
        load(tmp_path, CRM_POLICY + ISSUE_CANARY.replace(old, new, 1))
    assert message in err.value.message and "crm.toml" in err.value.message


def test_canary_cross_checks_against_the_route(tmp_path: Path) -> None:
    third = CRM_POLICY + '\n[variants.other]\nmodel = "crm-base"\nweight = 5\n' + ISSUE_CANARY
    with pytest.raises(ConfigError, match=r"variants \['other'\] have a weight"):
        load(tmp_path, third)
    unsticky = CRM_POLICY.replace('sticky = "header:x-user-id"', 'sticky = "none"') + ISSUE_CANARY
    with pytest.raises(ConfigError, match="'user' needs a sticky key"):
        load(tmp_path, unsticky)
    unpriced = CRM_POLICY.replace(
        'price = { input_per_mtok = 0.30, output_per_mtok = 0.90, currency = "EUR" }', ""
    )
    with pytest.raises(ConfigError, match="price in the same currency"):
        load(tmp_path, unpriced + ISSUE_CANARY)
    trusted = CRM_POLICY.replace('fallback = ["baseline"]', 'fallback = ["formatter"]')
    with pytest.raises(ConfigError, match="cannot also be a fallback"):
        load(tmp_path, trusted + ISSUE_CANARY)
    no_guardrails = ISSUE_CANARY.split("[canary.guardrails]")[0]
    with pytest.raises(ConfigError, match="at least one guardrail"):
        load(tmp_path, CRM_POLICY + no_guardrails)


def _state(route_policy: PolicySnapshot, status: str, step: int) -> dict[str, CanaryState]:
    route = route_policy.routes["crm-assistant"]
    return {"crm-assistant": CanaryState("crm-assistant", canary_key(route), status, step, 0, 0, 0)}  # type: ignore[arg-type]


def test_the_step_is_the_candidates_share_and_promotion_keeps_the_baseline_as_fallback(
    tmp_path: Path,
) -> None:
    policy = load(tmp_path, CRM_POLICY + ISSUE_CANARY)
    first = plan(with_canaries(policy, {}).routes["crm-assistant"], Switches())
    assert first.shares == {"baseline": 0.95, "formatter": pytest.approx(0.05)}
    third = plan(with_canaries(policy, _state(policy, "running", 2)).routes["crm-assistant"], Switches())
    assert third.shares == {"baseline": 0.75, "formatter": 0.25}
    promoted = with_canaries(policy, _state(policy, "promoted", 4)).routes["crm-assistant"]
    assert plan(promoted, Switches()).shares["formatter"] == 1.0 and promoted.fallback == ("baseline",)
    for status in ("killed", "aborted"):
        out = plan(with_canaries(policy, _state(policy, status, 2)).routes["crm-assistant"], Switches())
        assert out.shares["baseline"] == 1.0
    # A state that belongs to another canary (another key) is ignored: the new canary starts at its first step.
    stale = {"crm-assistant": CanaryState("crm-assistant", "other", "promoted", 4, 0, 0, 0)}
    assert plan(with_canaries(policy, stale).routes["crm-assistant"], Switches()).shares["formatter"] == 0.05


def test_sticky_users_on_the_candidate_stay_on_it_as_the_share_grows(tmp_path: Path) -> None:
    policy = load(tmp_path, CRM_POLICY + ISSUE_CANARY)
    users = [f"user-{i}" for i in range(2000)]
    previous: set[str] = set()
    for step in range(4):
        p = plan(with_canaries(policy, _state(policy, "running", step)).routes["crm-assistant"], Switches())
        on = {u for u in users if p.decide(bucket(u, "crm-assistant")).variant.name == "formatter"}
        assert previous <= on
        assert abs(len(on) / len(users) - p.shares["formatter"]) < 0.03
        previous = on


def test_the_live_view_follows_the_canary_state(tmp_path: Path) -> None:
    policy = load(tmp_path, CRM_POLICY + ISSUE_CANARY)
    live = LiveView(policy, Switches())
    assert live.view.plans["crm-assistant"].shares["formatter"] == pytest.approx(0.05)
    live.set_canaries(_state(policy, "running", 3))
    assert live.view.plans["crm-assistant"].shares["formatter"] == 0.5
    live.set_policy(policy)  # a reload keeps the canary's state
    assert live.view.plans["crm-assistant"].shares["formatter"] == 0.5


def test_a_canary_candidate_is_release_gated_even_at_weight_zero(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    make_adapter(adapters, "crm-formatter", "1", invalid_rate=0.2)
    canary = '[canary]\ncandidate = "formatter"\nbaseline = "baseline"\nsteps = [5, 100]\n'
    canary += "[canary.guardrails]\ninvalid_call_rate = { alpha = 0.05 }\n"
    (tmp_path / "crm.toml").write_text(adapter_policy("1", weight=0) + canary)
    with pytest.raises(ConfigError, match="release gate"):
        load_policies(tmp_path, ENGINES, DEFAULTS, scan(adapters))
    (tmp_path / "crm.toml").write_text(adapter_policy("1", weight=0))
    assert load_policies(tmp_path, ENGINES, DEFAULTS, scan(adapters)).routes["crm-assistant"].canary is None
