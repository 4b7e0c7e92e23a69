"""Admin bodies and queries are checked whole before anything changes, and a change lands with its audit entry or
not at all: what an operator (or a script with a typo) relies on when a kill switch is one request away."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CRM_POLICY, AppGatewayFactory, Gateway, sdk_client

MESSAGES = [{"role": "user", "content": "Set Globex to won, 5000 EUR."}]
FLIP = "/admin/routes/crm-assistant/variants/formatter/kill"
DRILL = "/admin/routes/crm-assistant/drills"
GOOD_DRILL = {"variant": "formatter", "time_to_baseline_ms": 12.5, "probes": 7, "fallback": "baseline"}

# Every admin endpoint that takes a body, with a body it would otherwise accept (or at least act on).
BODY_ENDPOINTS = [
    (FLIP, {"reason": "r"}),
    ("/admin/routes/crm-assistant/revive", {"reason": "r"}),
    ("/admin/kill-all", {"reason": "r"}),
    ("/admin/reload", {"reason": "r"}),
    ("/admin/routes/crm-assistant/canary/pause", {"reason": "r"}),
    ("/admin/routes/crm-assistant/variants/formatter/adapter", {"reason": "r", "adapter": "crm-formatter@2"}),
    ("/admin/routes/crm-assistant/variants/formatter/adapter/rollback", {"reason": "r"}),
    (DRILL, {"reason": "r", **GOOD_DRILL}),
    ("/admin/shadow/crm-assistant/start", {"reason": "r", "variant": "formatter", "share": 10}),
    ("/admin/shadow/crm-assistant/stop", {"reason": "r", "variant": "formatter"}),
    ("/admin/shadow/crm-assistant/clear", {"reason": "r"}),
]

# (change to the body, param, code): each must be a 400 naming the field before anything is done.
BAD_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"reason": {"a": 1}}, "reason", "invalid_type"),
    ({"reason": 42}, "reason", "invalid_type"),
    ({"reason": None}, "reason", "invalid_type"),
    ({"reason": "x" * 1001}, "reason", "string_above_max_length"),
    ({"actor": ["alice"]}, "actor", "invalid_type"),
    ({"actor": "a" * 201}, "actor", "string_above_max_length"),
    ({"forse": True}, "forse", "unknown_parameter"),
]


def ask(gw: Gateway) -> str:
    raw = sdk_client(gw).chat.completions.with_raw_response.create(model="crm-assistant", messages=MESSAGES)
    return raw.headers["x-gateway-variant"]


def edit_policy(tmp_path: Path) -> None:
    """Change the route's policy file, so that a reload would have something to put live."""
    (tmp_path / "policies" / "crm-assistant.toml").write_text(
        CRM_POLICY.replace("weight = 10", "weight = 30")
    )


def refused(r: httpx.Response, param: str | None, code: str, status: int = 400) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    if param:
        assert param in error["message"]


@pytest.mark.parametrize(("path", "good"), BODY_ENDPOINTS)
def test_every_admin_body_is_checked_before_anything_changes(
    make_app_gateway: AppGatewayFactory, tmp_path: Path, path: str, good: dict[str, Any]
) -> None:
    gw = make_app_gateway()
    version = gw.app.components.live.view.policy.version
    edit_policy(tmp_path)
    for change, param, code in BAD_FIELDS:
        refused(gw.admin("POST", path, json={**good, **change}), param, code)
    refused(gw.admin("POST", path, json=[good]), None, "invalid_type")
    refused(gw.admin("POST", path, content=b'{"reason": "r",'), None, "invalid_json")
    refused(gw.admin("POST", path, json={**good, "pad": "x" * 70_000}), None, "payload_too_large", 413)
    long_actor = {"x-gateway-actor": "a" * 201}
    refused(
        gw.admin("POST", path, json=good, headers=long_actor), "x-gateway-actor", "string_above_max_length"
    )
    assert gw.app.components.state.audit() == []  # nothing happened, so nothing was audited
    assert gw.app.components.live.view.policy.version == version
    assert gw.admin("GET", "/admin/status").json()["switches"] == {
        "global_kill": False,
        "routes": [],
        "variants": [],
    }


def test_force_is_a_json_boolean_and_a_string_never_kills_the_last_variant(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    assert gw.admin("POST", FLIP, json={"reason": "a"}).status_code == 200
    last = "/admin/routes/crm-assistant/variants/baseline/kill"
    for force in ("false", "true", 1, 0, None, [], {}):
        refused(gw.admin("POST", last, json={"reason": "b", "force": force}), "force", "invalid_type")
    assert ask(gw) == "baseline"  # the route still serves
    assert [e.action for e in gw.app.components.state.audit()] == ["kill_variant"]
    assert gw.admin("POST", last, json={"reason": "b", "force": False}).status_code == 409
    assert gw.admin("POST", last, json={"reason": "b", "force": True}).status_code == 200


def test_a_reload_with_a_bad_reason_leaves_the_old_policy_live_and_unaudited(
    make_app_gateway: AppGatewayFactory, tmp_path: Path
) -> None:
    gw = make_app_gateway()
    before = gw.app.components.live.view.policy.version
    edit_policy(tmp_path)
    r = gw.admin("POST", "/admin/reload", json={"reason": {"why": "ramp"}})
    refused(r, "reason", "invalid_type")
    assert gw.app.components.live.view.policy.version == before
    assert gw.app.components.state.audit() == []
    r = gw.admin("POST", "/admin/reload", json={"reason": " ramp ", "actor": "alice"})
    assert r.status_code == 200 and r.json()["previous_version"] == before
    (entry,) = gw.app.components.state.audit()
    assert (entry.action, entry.actor, entry.reason) == ("reload", "alice", "ramp")
    assert entry.policy_version == gw.app.components.live.view.policy.version != before
    assert gw.admin("POST", "/admin/reload", json={}).status_code == 200  # a reload's reason is optional


def test_a_reload_goes_live_only_once_its_audit_entry_is_written(
    make_app_gateway: AppGatewayFactory, tmp_path: Path
) -> None:
    gw = make_app_gateway()
    before = gw.app.components.live.view.policy.version
    # The database refuses the reload's audit entry (as a full disk or a read-only file would).
    with sqlite3.connect(gw.settings.state_db) as db:
        db.execute(
            "CREATE TRIGGER refuse_reload BEFORE INSERT ON audit WHEN NEW.action = 'reload' "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    edit_policy(tmp_path)
    r = gw.admin("POST", "/admin/reload", json={"reason": "ramp"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_failed"
    assert "did not change" in r.json()["error"]["message"]
    assert gw.app.components.live.view.policy.version == before  # the old policy is still the one in force
    status = gw.admin("GET", "/admin/status").json()
    assert status["policy_version"] == before
    assert status["routes"]["crm-assistant"]["variants"]["formatter"]["weight"] == 10


def test_a_kill_whose_audit_entry_cannot_be_written_changes_nothing(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    with sqlite3.connect(gw.settings.state_db) as db:
        db.execute(
            "CREATE TRIGGER refuse_kill BEFORE INSERT ON audit WHEN NEW.action = 'kill_variant' "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    r = gw.admin("POST", "/admin/routes/crm-assistant/variants/formatter/kill", json={"reason": "drill"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_failed"
    assert not gw.app.components.live.view.switches.variant_killed("crm-assistant", "formatter")
    assert not gw.app.components.state.switches().variant_killed("crm-assistant", "formatter")
    status = gw.admin("GET", "/admin/status").json()
    assert status["switches"]["variants"] == []


def test_drill_bodies_are_checked_and_recorded(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    nested: Any = 1
    for _ in range(300):
        nested = [nested]
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"probes": nested}, "probes", "invalid_type"),
        ({"probes": "7"}, "probes", "invalid_type"),
        ({"probes": 7.5}, "probes", "invalid_type"),
        ({"probes": True}, "probes", "invalid_type"),
        ({"probes": -1}, "probes", "invalid_value"),
        ({"probes": 10**12}, "probes", "invalid_value"),
        ({"time_to_baseline_ms": "12"}, "time_to_baseline_ms", "invalid_type"),
        ({"time_to_baseline_ms": -1}, "time_to_baseline_ms", "invalid_value"),
        ({"time_to_baseline_ms": 1e300}, "time_to_baseline_ms", "invalid_value"),
        ({"fallback": {"name": "baseline"}}, "fallback", "invalid_type"),
        ({"variant": ["formatter"]}, "variant", "invalid_type"),
    ]
    for change, param, code in bad:
        r = gw.admin("POST", DRILL, json={"reason": "drill", **GOOD_DRILL, **change})
        refused(r, param, code)
        if param == "probes" and code == "invalid_value":
            assert "1000000000" in r.json()["error"]["message"]  # the limit is named
    missing = {k: v for k, v in GOOD_DRILL.items() if k != "time_to_baseline_ms"}
    refused(
        gw.admin("POST", DRILL, json={"reason": "drill", **missing}),
        "time_to_baseline_ms",
        "missing_required_parameter",
    )
    assert gw.app.components.state.audit() == []
    r = gw.admin("POST", DRILL, json={"reason": "drill", **GOOD_DRILL})
    assert r.status_code == 200
    (entry,) = gw.app.components.state.audit()
    assert (entry.action, entry.route, entry.variant) == ("drill", "crm-assistant", "formatter")
    assert entry.detail == {"time_to_baseline_ms": 12.5, "probes": 7, "fallback": "baseline"}


@pytest.mark.parametrize(
    ("query", "param", "code"),
    [
        ("/admin/audit?limit=abc", "limit", "invalid_type"),
        ("/admin/audit?limit=2.5", "limit", "invalid_type"),
        ("/admin/audit?limit=0", "limit", "invalid_value"),
        ("/admin/audit?limit=10001", "limit", "invalid_value"),
        ("/admin/audit?since=nan", "since", "invalid_value"),
        ("/admin/audit?since=yesterday", "since", "invalid_type"),
        ("/admin/audit?since=1767225600000", "since", "invalid_value"),  # milliseconds, not seconds
        ("/admin/lineage?route=crm-assistant&until=inf", "until", "invalid_value"),
        ("/admin/lineage?route=crm-assistant&since=1e400", "since", "invalid_value"),
    ],
)
def test_admin_queries_name_the_bad_parameter(
    make_app_gateway: AppGatewayFactory, query: str, param: str, code: str
) -> None:
    gw = make_app_gateway()
    refused(gw.admin("GET", query), param, code)


def test_admin_queries_within_their_limits_answer(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    assert gw.admin("POST", FLIP, json={"reason": "a"}).status_code == 200
    assert len(gw.admin("GET", "/admin/audit?limit=1&since=0").json()["entries"]) == 1
    assert gw.admin("GET", "/admin/audit?limit=10000").status_code == 200
    lineage = gw.admin("GET", "/admin/lineage?route=crm-assistant&since=0&until=99999999999")
    assert lineage.status_code == 200 and [c["action"] for c in lineage.json()["changes"]] == ["kill_variant"]
