"""Operators' runtime shadow overrides (`gateway shadow start|stop|clear`): how each applies on top of the policy
file's `[shadow]` (and its defaults), that a reload keeps them and a stale one is ignored and reported, that every
bad request is refused before anything changes, and, through real gateways in front of the simulated engine, that
the copies follow the override, every change is audited with its actor and reason, and another process sharing
the state database follows it too."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.control.policies import load_policies
from gateway.errors import BadRequest, Conflict, GatewayError, NotFound
from gateway.policy import PolicySnapshot, ShadowSpec, Timeouts
from gateway.shadow.overrides import (
    ShadowOverride,
    check_clear,
    check_start,
    check_stop,
    problem,
    with_shadow_overrides,
)
from tests.conftest import CRM_POLICY, AppGatewayFactory, Gateway
from tests.test_shadow import chat, policy, settled

ENGINES = {"default": "http://127.0.0.1:8001"}
DEFAULTS = Timeouts(2.0, 60.0, 300.0)
ROUTE = "crm-assistant"
UNPRICED = '\n[variants.plain]\nmodel = "crm-base"\nweight = 0\n'
LIMITED = (
    '\n[shadow]\nvariant = "formatter"\nshare = 20\nmax_in_flight = 3\nmax_cost_per_hour = 0.5\n'
    'stream = "non_stream"\n'
)
SHADOW = "/admin/shadow/crm-assistant"


def load(tmp_path: Path, text: str) -> PolicySnapshot:
    (tmp_path / "crm.toml").write_text(text)
    return load_policies(tmp_path, ENGINES, DEFAULTS)


def start(variant: str, share: float | None = None, route: str = ROUTE) -> ShadowOverride:
    return ShadowOverride(route, "start", variant, share, "alice", "why")


def stop(variant: str) -> ShadowOverride:
    return ShadowOverride(ROUTE, "stop", variant, None, "alice", "why")


def shadow_with(policy: PolicySnapshot, override: ShadowOverride) -> ShadowSpec | None:
    return with_shadow_overrides(policy, {override.route: override}).routes[ROUTE].shadow


# --- how an override applies (pure) ----------------------------------------------------------------------


def test_a_start_takes_the_declared_limits_and_the_declared_share_only_for_the_declared_variant(
    tmp_path: Path,
) -> None:
    declared = load(tmp_path, CRM_POLICY + LIMITED)
    assert shadow_with(declared, start("formatter")) == ShadowSpec("formatter", 20.0, 3, 0.5, "non_stream")
    assert shadow_with(declared, start("formatter", 5)) == ShadowSpec("formatter", 5.0, 3, 0.5, "non_stream")
    assert shadow_with(declared, start("baseline")) == ShadowSpec("baseline", 100.0, 3, 0.5, "non_stream")
    assert shadow_with(declared, stop("formatter")) is None
    overridden = with_shadow_overrides(declared, {ROUTE: start("baseline", 7)})
    assert overridden.version == declared.version  # what is served did not change
    assert [v.weight for v in overridden.routes[ROUTE].variants] == [90, 10]
    assert with_shadow_overrides(declared, {}) is declared


def test_a_start_on_a_route_without_a_shadow_gets_the_defaults(tmp_path: Path) -> None:
    declared = load(tmp_path, CRM_POLICY)
    assert shadow_with(declared, start("formatter")) == ShadowSpec("formatter", 100.0, 8, None, "as_sent")
    assert shadow_with(declared, start("formatter", 12.5)) == ShadowSpec(
        "formatter", 12.5, 8, None, "as_sent"
    )
    assert shadow_with(declared, stop("formatter")) is None


def test_a_stale_override_is_not_applied_and_says_why(tmp_path: Path) -> None:
    declared = load(tmp_path, CRM_POLICY + UNPRICED + LIMITED)
    route = declared.routes[ROUTE]
    for override, why in (
        (start("gone"), "'gone' is no longer a variant of 'crm-assistant'"),
        (start("plain"), "'plain' has no price, so the route's shadow budget (0.5/h) cannot be counted"),
    ):
        assert problem(route, override) == why
        assert with_shadow_overrides(declared, {ROUTE: override}) is declared  # nothing of it applies
    assert problem(None, start("formatter", route="old-route")) == "the policy has no route 'old-route'"
    assert with_shadow_overrides(declared, {"old-route": start("formatter", route="old-route")}) is declared
    # A stop is the route's: it holds while the route exists, whichever variant the policy shadows now.
    assert problem(route, stop("gone")) is None and shadow_with(declared, stop("gone")) is None
    unbudgeted = load(tmp_path, CRM_POLICY + UNPRICED)
    assert shadow_with(unbudgeted, start("plain")) == ShadowSpec("plain", 100.0)


def _refused(call: Any, kind: type[GatewayError], code: str) -> GatewayError:
    with pytest.raises(kind) as err:
        call()
    assert err.value.code == code
    return err.value


def test_each_change_is_checked_against_the_policy_first(tmp_path: Path) -> None:
    declared = load(tmp_path, CRM_POLICY + UNPRICED + LIMITED)
    check_start(declared, ROUTE, "baseline", None)
    check_start(declared, ROUTE, "formatter", 100)
    _refused(lambda: check_start(declared, "nope", "formatter", None), NotFound, "not_found")
    assert (
        _refused(lambda: check_start(declared, ROUTE, "nope", None), NotFound, "not_found").param == "variant"
    )
    for share in (0, -1, 100.5, 150):
        err = _refused(
            lambda s=share: check_start(declared, ROUTE, "formatter", s), BadRequest, "invalid_value"
        )
        assert err.param == "share"
    _refused(lambda: check_start(declared, ROUTE, "plain", None), Conflict, "shadow_unpriced")

    check_stop(declared, {}, ROUTE, "formatter")
    _refused(lambda: check_stop(declared, {}, ROUTE, "baseline"), Conflict, "shadow_mismatch")
    _refused(lambda: check_stop(declared, {}, ROUTE, "nope"), NotFound, "not_found")
    bare = load(tmp_path, CRM_POLICY)
    _refused(lambda: check_stop(bare, {}, ROUTE, "formatter"), Conflict, "no_shadow")
    held = {ROUTE: stop("formatter")}
    err = _refused(lambda: check_stop(bare, held, ROUTE, "formatter"), Conflict, "no_shadow")
    assert "stopped by alice: why" in err.message

    _refused(lambda: check_clear(declared, {}, ROUTE), Conflict, "no_override")
    _refused(lambda: check_clear(declared, {}, "nope"), NotFound, "not_found")
    gone = start("formatter", route="old-route")
    assert check_clear(declared, {"old-route": gone}, "old-route") == gone  # a stale one can always go


# --- through a gateway ----------------------------------------------------------------------------------------


def unshadowed() -> str:
    """`tests.test_shadow.policy`'s route (baseline serves everything, candidate at weight 0) without its `[shadow]`."""
    return policy("crm-formatter").split("[shadow]")[0]


def post(gw: Gateway, verb: str, **body: Any) -> dict[str, Any]:
    r = gw.admin("POST", f"{SHADOW}/{verb}", json={"reason": f"{verb} it", **body})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def reload(gw: Gateway, tmp_path: Path, text: str) -> None:
    (tmp_path / "policies" / "crm.toml").write_text(text)
    assert gw.admin("POST", "/admin/reload", json={"reason": "edit"}).status_code == 200


def copies_of(gw: Gateway, n: int) -> list[Any]:
    """The shadow records of `n` more requests."""
    _, before = settled(gw)
    for _ in range(n):
        assert chat(gw).headers["x-gateway-variant"] == "baseline"
    _, after = settled(gw)
    return after[len(before) :]


def test_start_copies_a_route_without_a_shadow_and_a_reload_keeps_it_until_cleared(
    make_app_gateway: AppGatewayFactory, tmp_path: Path
) -> None:
    gw = make_app_gateway(policies={"crm.toml": unshadowed()})
    assert copies_of(gw, 5) == []
    answer = post(gw, "start", variant="candidate", share=40, actor="alice")
    assert answer["shadow"] == {
        "variant": "candidate",
        "share": 40.0,
        "max_in_flight": 8,
        "max_cost_per_hour": None,
        "stream": "as_sent",
    }
    assert answer["declared"] is None and answer["override"]["mode"] == "start"
    assert (answer["override"]["actor"], answer["override"]["stale"]) == ("alice", False)
    n = 200
    copies = copies_of(gw, n)
    # Binomial: 40 % of 200 is 80, sd 6.9; 4.5 sd either side fails a correct gateway once in 150,000 runs.
    assert abs(len(copies) - n * 0.4) <= 4.5 * math.sqrt(n * 0.4 * 0.6)
    assert all(c.shadow and c.variant == "candidate" and c.outcome == "ok" and c.share == 0.4 for c in copies)

    reload(
        gw, tmp_path, unshadowed().replace("weight = 100", "weight = 99")
    )  # the file still has no [shadow]
    assert gw.admin("GET", SHADOW).json()["shadow"]["share"] == 40.0
    assert len(copies_of(gw, 60)) > 0  # P(no copy of 60 at 40 %) = 5e-14

    cleared = post(gw, "clear")
    assert (cleared["shadow"], cleared["override"]) == (None, None)
    assert copies_of(gw, 20) == []
    entries = gw.app.components.state.audit()
    assert [(e.action, e.actor, e.reason, e.variant) for e in entries if e.action.startswith("shadow")] == [
        ("shadow_clear", "admin", "clear it", "candidate"),
        ("shadow_start", "alice", "start it", "candidate"),
    ]
    assert entries[-1].detail == {"share": 40.0}


def test_stop_silences_a_declared_shadow_through_a_reload_and_clear_brings_it_back(
    make_app_gateway: AppGatewayFactory, tmp_path: Path
) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("crm-formatter", share=100)})
    assert len(copies_of(gw, 3)) == 3
    answer = post(gw, "stop", variant="candidate", actor="bob")
    assert answer["shadow"] is None and answer["declared"]["variant"] == "candidate"
    assert copies_of(gw, 10) == []
    (entry,) = gw.app.components.state.audit()
    assert (entry.action, entry.actor, entry.reason, entry.route, entry.variant) == (
        "shadow_stop",
        "bob",
        "stop it",
        ROUTE,
        "candidate",
    )
    assert entry.policy_version == gw.app.components.live.view.policy.version

    reload(gw, tmp_path, policy("crm-formatter", share=100, max_in_flight=7))
    assert copies_of(gw, 10) == []  # the reload did not undo the stop
    status = gw.admin("GET", "/admin/status").json()["shadow_overrides"]
    assert [(o["route"], o["mode"], o["stale"]) for o in status] == [(ROUTE, "stop", False)]

    post(gw, "clear")
    copies = copies_of(gw, 4)
    assert len(copies) == 4 and all(c.outcome == "ok" for c in copies)  # the file's [shadow] again
    assert gw.admin("GET", SHADOW).json()["shadow"]["max_in_flight"] == 7


def test_a_start_replaces_the_declared_variant_and_a_stop_must_name_the_one_in_force(
    make_app_gateway: AppGatewayFactory,
) -> None:
    text = policy("crm-formatter", share=100)
    text += '\n[variants.other]\nmodel = "crm-base"\nweight = 0\n'
    gw = make_app_gateway(policies={"crm.toml": text})
    answer = post(gw, "start", variant="other")  # no share: the declared share is candidate's, so 100
    assert (answer["shadow"]["variant"], answer["shadow"]["share"]) == ("other", 100.0)
    assert answer["declared"]["variant"] == "candidate"
    assert {c.variant for c in copies_of(gw, 5)} == {"other"}
    r = gw.admin("POST", f"{SHADOW}/stop", json={"variant": "candidate", "reason": "x"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "shadow_mismatch"
    assert "'other'" in r.json()["error"]["message"]
    post(gw, "stop", variant="other")
    r = gw.admin("POST", f"{SHADOW}/stop", json={"variant": "other", "reason": "again"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_shadow"
    assert copies_of(gw, 5) == []


def test_a_stale_override_after_a_reload_is_ignored_reported_and_clearable(
    make_app_gateway: AppGatewayFactory, tmp_path: Path
) -> None:
    gw = make_app_gateway(policies={"crm.toml": unshadowed()})
    post(gw, "start", variant="candidate", share=100)
    assert len(copies_of(gw, 2)) == 2
    reload(gw, tmp_path, policy(None))  # the candidate variant is gone from the file
    assert copies_of(gw, 5) == []  # requests are served as usual, and nothing is copied
    state = gw.admin("GET", SHADOW).json()
    assert state["shadow"] is None
    assert (state["override"]["stale"], state["override"]["problem"]) == (
        True,
        "'candidate' is no longer a variant of 'crm-assistant'",
    )
    (listed,) = gw.admin("GET", "/admin/status").json()["shadow_overrides"]
    assert listed["stale"] is True
    reload(gw, tmp_path, unshadowed())  # back: the override applies again
    assert gw.admin("GET", SHADOW).json()["override"]["stale"] is False
    assert len(copies_of(gw, 2)) == 2
    reload(gw, tmp_path, policy(None))
    assert post(gw, "clear")["override"] is None
    assert gw.admin("GET", "/admin/status").json()["shadow_overrides"] == []


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str | None, str]] = [
    ("start", {"variant": "candidate"}, 400, "reason", "missing_required_parameter"),
    ("start", {"reason": "r"}, 400, "variant", "missing_required_parameter"),
    ("start", {"variant": "nope", "reason": "r"}, 404, "variant", "not_found"),
    ("start", {"variant": "candidate", "share": 0, "reason": "r"}, 400, "share", "invalid_value"),
    ("start", {"variant": "candidate", "share": 150, "reason": "r"}, 400, "share", "invalid_value"),
    ("start", {"variant": "candidate", "share": "20", "reason": "r"}, 400, "share", "invalid_type"),
    ("start", {"variant": "candidate", "share": True, "reason": "r"}, 400, "share", "invalid_type"),
    ("start", {"variant": "candidate", "reason": "r", "shar": 2}, 400, "shar", "unknown_parameter"),
    ("stop", {"variant": "candidate"}, 400, "reason", "missing_required_parameter"),
    ("stop", {"variant": "candidate", "reason": "r"}, 409, None, "no_shadow"),
    ("stop", {"variant": "nope", "reason": "r"}, 404, "variant", "not_found"),
    ("stop", {"variant": "candidate", "share": 5, "reason": "r"}, 400, "share", "unknown_parameter"),
    ("clear", {}, 400, "reason", "missing_required_parameter"),
    ("clear", {"reason": "r"}, 409, None, "no_override"),
]


VARIANT = {"variant": "candidate", "reason": "r"}


def test_bad_requests_get_a_clear_error_and_change_nothing(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": unshadowed()})
    for verb, body, status, param, code in BAD_REQUESTS:
        r = gw.admin("POST", f"{SHADOW}/{verb}", json=body)
        assert r.status_code == status, (verb, body, r.text)
        error = r.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), body
        assert error["message"]
    for verb, body in (("start", VARIANT), ("stop", VARIANT), ("clear", {"reason": "r"})):
        r = gw.admin("POST", f"/admin/shadow/nope/{verb}", json=body)
        assert r.status_code == 404 and r.json()["error"]["message"] == "No route 'nope'."
        assert gw.http.post(f"{SHADOW}/{verb}", json=body).status_code == 401
    assert gw.app.components.state.audit() == [] and gw.app.components.state.shadow_overrides() == {}
    assert copies_of(gw, 3) == []


def test_an_override_whose_audit_entry_cannot_be_written_changes_nothing(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(policies={"crm.toml": unshadowed()})
    with sqlite3.connect(gw.settings.state_db) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit WHEN NEW.action = 'shadow_start' "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    r = gw.admin("POST", f"{SHADOW}/start", json={"variant": "candidate", "reason": "r"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_failed"
    assert gw.app.components.state.shadow_overrides() == {}
    assert gw.admin("GET", SHADOW).json()["override"] is None
    assert copies_of(gw, 3) == []


def test_an_override_reaches_another_process_and_survives_a_restart(
    make_app_gateway: AppGatewayFactory,
) -> None:
    a = make_app_gateway(policies={"crm.toml": unshadowed()})
    b = make_app_gateway(policies={"crm.toml": unshadowed()})  # the same state database
    post(a, "start", variant="candidate", share=100)
    started = time.perf_counter()
    while b.app.components.live.view.plans[ROUTE].shadow is None:
        assert time.perf_counter() - started < 2.0, "the other process did not pick the override up"
        time.sleep(0.01)
    assert len(copies_of(b, 2)) == 2
    post(b, "clear")
    while a.app.components.live.view.plans[ROUTE].shadow is not None:
        assert time.perf_counter() - started < 4.0, "the clear did not reach the first process"
        time.sleep(0.01)
    post(a, "start", variant="candidate", share=50)
    a.stop()
    b.stop()
    again = make_app_gateway(policies={"crm.toml": unshadowed()})
    assert again.admin("GET", SHADOW).json()["shadow"]["share"] == 50.0
