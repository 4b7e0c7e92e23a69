"""Engine pools, the pure part: `GATEWAY_ENGINES` parsed, which member takes a request, and each member's health
(ejection, backoff, half-open trials, probes). The clock is an argument, so every step is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from gateway.pool import HealthPolicy, Pool, parse_engines, pool_ready
from gateway.settings import Settings
from tests.conftest import ROOT

A, B, C = "http://10.0.0.5:8001", "http://10.0.0.6:8001", "http://10.0.0.7:8001"
POLICY = HealthPolicy(eject_after=3, backoff_s=1.0, max_backoff_s=8.0, probe_s=5.0)


def pool_of(*urls: str, policy: HealthPolicy = POLICY) -> Pool:
    return Pool("default", urls, policy)


# --- GATEWAY_ENGINES ----------------------------------------------------------------------------------------


def test_a_name_maps_to_one_url_or_a_list_of_them() -> None:
    parsed = parse_engines({"default": A + "/", "gpu": [B, C + "/"]})
    assert parsed == {"default": (A,), "gpu": (B, C)}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"gpu": [A, "ftp://10.0.0.6"]}, "engine 'gpu': 'ftp://10.0.0.6' is not an http(s) URL"),
        ({"gpu": "10.0.0.6:8001"}, "engine 'gpu': '10.0.0.6:8001' is not an http(s) URL"),
        ({"gpu": []}, "engine 'gpu': the list of URLs is empty"),
        ({"gpu": [A, A + "/"]}, f"engine 'gpu': {A!r} is listed twice"),
        ({"gpu": [A, 8001]}, "engine 'gpu': 8001 is not an http(s) URL"),
        ({"gpu": {"url": A}}, "engine 'gpu': expected a URL or a list of URLs, got dict"),
        ({"gpu": "http://:8001"}, "engine 'gpu': 'http://:8001' has no host"),
        ({"gpu": "http://10.0.0.6:80001"}, "engine 'gpu': 'http://10.0.0.6:80001' is not a valid URL"),
        ([A], "expected a JSON object"),
    ],
)
def test_a_bad_engine_is_refused_naming_the_engine_and_the_url(value: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_engines(value)
    assert message in str(err.value)
    with pytest.raises(ValidationError) as refused:
        Settings(engines=value)
    assert message in str(refused.value)


def test_settings_keep_the_configured_shape_and_give_the_pools() -> None:
    settings = Settings(engines={"default": A + "/", "gpu": [B, C]})
    assert settings.engines == {"default": A, "gpu": [B, C]}  # a single URL stays as it was written
    assert settings.engine_pools == {"default": (A,), "gpu": (B, C)}


def test_the_environment_takes_a_json_list() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_ENGINES"] = json.dumps({"default": [A, B], "cpu": C})
    probe = "from gateway.settings import Settings; print(Settings().engine_pools)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str({"default": (A, B), "cpu": (C,)}), out.stderr


# --- the choice -----------------------------------------------------------------------------------------------


def test_the_member_with_the_fewest_outstanding_requests_is_chosen() -> None:
    pool = pool_of(A, B, C)
    pool.members[0].outstanding, pool.members[1].outstanding, pool.members[2].outstanding = 4, 1, 2
    assert pool.choose(None, 0.0) == 1


def test_ties_go_round_robin() -> None:
    pool = pool_of(A, B, C)
    assert [pool.choose(None, 0.0) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_a_member_holding_the_adapter_is_preferred_over_a_less_busy_one() -> None:
    pool = pool_of(A, B, C)
    pool.members[0].outstanding, pool.members[1].outstanding, pool.members[2].outstanding = 0, 9, 5
    pool.members[1].adapters = frozenset({"crm-formatter@2"})
    pool.members[2].adapters = frozenset({"crm-formatter@2"})
    assert pool.choose("crm-formatter@2", 0.0) == 2  # the least busy of those holding it
    assert pool.choose(None, 0.0) == 0  # the base model: no preference
    assert pool.choose("crm-formatter@3", 0.0) == 0  # held nowhere: the least busy


def test_an_ejected_member_is_passed_over_until_its_backoff_ends() -> None:
    pool = pool_of(A, B)
    eject(pool, 0, at=10.0)
    assert {pool.choose(None, 10.5) for _ in range(4)} == {1}
    assert pool.members[0].state(10.5) == "ejected"
    assert pool.members[0].state(11.0) == "half_open"


def test_a_half_open_member_takes_one_trial_at_a_time() -> None:
    pool = pool_of(A, B)
    eject(pool, 0, at=10.0)
    pool.members[1].outstanding = 3
    assert pool.choose(None, 11.0) == 0 and pool.members[0].trial
    assert pool.choose(None, 11.0) == 1  # the trial is under way: nobody else is sent there
    assert pool.members[0].succeeded(11.2)  # readmitted
    assert pool.members[0].state(11.2) == "healthy" and not pool.members[0].trial


def test_when_no_member_may_take_a_request_all_are_candidates() -> None:
    pool = pool_of(A, B)
    eject(pool, 0, at=10.0)
    eject(pool, 1, at=10.0)
    pool.members[0].outstanding = 2
    assert pool.choose(None, 10.5) == 1  # ejection alone never turns into an error


def test_a_pool_of_one_always_sends_to_its_member() -> None:
    pool = pool_of(A)
    eject(pool, 0, at=10.0)
    assert pool.single and pool.choose(None, 10.5) == 0
    assert pool.describe(0) == "Engine 'default'"  # messages as before pools
    assert pool_of(A, B).describe(1) == f"Engine 'default' at {B}"


def test_a_retry_goes_to_another_member_that_may_take_it_or_nowhere() -> None:
    pool = pool_of(A, B, C)
    pool.members[2].adapters = frozenset({"x@1"})
    assert pool.another("x@1", 0.0, exclude=2) in (0, 1)
    eject(pool, 1, at=0.0)
    assert pool.another(None, 0.5, exclude=0) == 2
    eject(pool, 2, at=0.0)
    assert pool.another(None, 0.5, exclude=0) is None  # never back to the member that just failed


# --- health ---------------------------------------------------------------------------------------------------


def eject(pool: Pool, index: int, *, at: float) -> float:
    backoff = None
    for _ in range(pool.policy.eject_after):
        backoff = pool.members[index].failed(at, pool.policy)
    assert backoff is not None
    return backoff


def test_failures_in_a_row_eject_a_member_and_a_success_between_them_resets_the_count() -> None:
    member = pool_of(A, B).members[0]
    assert member.failed(0.0, POLICY) is None and member.failed(0.0, POLICY) is None
    member.succeeded(0.0)
    assert member.failed(0.0, POLICY) is None and member.failed(0.0, POLICY) is None
    assert member.state(0.0) == "healthy"
    assert member.failed(0.0, POLICY) == 1.0
    assert member.state(0.5) == "ejected"


def test_the_backoff_doubles_with_each_failed_trial_up_to_its_cap() -> None:
    pool = pool_of(A, B)
    member = pool.members[0]
    now = 0.0
    backoffs = [eject(pool, 0, at=now)]
    for _ in range(5):
        now = member.ejected_until  # half-open
        backoff = member.failed(now, POLICY)  # the trial failed
        assert backoff is not None
        backoffs.append(backoff)
    assert backoffs == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert member.succeeded(member.ejected_until)
    assert eject(pool, 0, at=100.0) == 1.0  # readmitted: the next ejection starts over


def test_outcomes_of_requests_sent_before_an_ejection_do_not_change_it() -> None:
    pool = pool_of(A, B)
    member = pool.members[0]
    eject(pool, 0, at=10.0)
    assert not member.succeeded(10.2) and member.state(10.2) == "ejected"
    assert member.failed(10.3, POLICY) is None and member.ejected_until == 11.0


def test_an_ejection_forgets_the_adapters_the_member_held() -> None:
    pool = pool_of(A, B)
    pool.members[0].adapters = frozenset({"crm-formatter@2"})
    eject(pool, 0, at=0.0)
    assert pool.members[0].adapters == frozenset()  # it may have restarted: the reconciler lists them again


def test_a_timeout_clears_a_trial_without_judging_the_member() -> None:
    pool = pool_of(A, B)
    eject(pool, 0, at=0.0)
    assert pool.choose(None, 1.0) == 0
    pool.members[0].settled()
    assert pool.members[0].state(1.0) == "half_open" and pool.members[0].may_take(1.0)


def test_probes_are_due_for_every_member_each_period_and_for_an_ejected_one_when_its_backoff_ends() -> None:
    pool = pool_of(A, B)
    assert pool.probes_due(0.0) == [0, 1]  # never probed
    for member in pool.members:
        member.last_probe = 0.0
    assert pool.probes_due(4.9) == [] and pool.next_probe_at() == 5.0
    eject(pool, 1, at=1.0)
    assert pool.next_probe_at() == 2.0 and pool.probes_due(2.0) == [1]
    pool.members[1].trial = True  # a trial request is under way: no probe beside it
    assert pool.probes_due(2.0) == [] and pool.next_probe_at() == 5.0


def test_a_pool_is_ready_when_one_member_is() -> None:
    assert pool_ready(["ok", "Engine 'default' at http://b: GET v1/models failed"]) == "ok"
    assert pool_ready(["down a", "down b"]) == "down a; down b"
    assert pool_ready(["ok"]) == "ok"
