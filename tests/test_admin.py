"""Kill switches, reload, status and audit through the admin API, as an operator uses them."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest

from tests.conftest import CLIENT_TOKEN, CRM_POLICY, FORCER_TOKEN, AppGatewayFactory, Gateway, sdk_client

MESSAGES = [{"role": "user", "content": "Set Globex to won, 5000 EUR."}]

ADMIN_ROUTES = [
    ("POST", "/admin/routes/crm-assistant/variants/formatter/kill"),
    ("POST", "/admin/routes/crm-assistant/variants/formatter/revive"),
    ("POST", "/admin/routes/crm-assistant/kill"),
    ("POST", "/admin/routes/crm-assistant/revive"),
    ("POST", "/admin/kill-all"),
    ("POST", "/admin/revive-all"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/status"),
    ("GET", "/admin/audit"),
    ("GET", "/admin/shadow/crm-assistant"),
    ("POST", "/admin/shadow/crm-assistant/start"),
    ("POST", "/admin/shadow/crm-assistant/stop"),
    ("POST", "/admin/shadow/crm-assistant/clear"),
]


def ask(gw: Gateway, user: str | None = None, token: str = CLIENT_TOKEN, variant: str | None = None) -> str:
    headers = {}
    if user:
        headers["x-user-id"] = user
    if variant:
        headers["x-gateway-variant"] = variant
    raw = sdk_client(gw, token).chat.completions.with_raw_response.create(
        model="crm-assistant", messages=MESSAGES, extra_headers=headers
    )
    return raw.headers["x-gateway-variant"]


def user_on(gw: Gateway, variant: str) -> str:
    for i in range(500):
        if ask(gw, f"user-{i}") == variant:
            return f"user-{i}"
    raise AssertionError(f"no user landed on {variant}")


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_every_admin_route_needs_the_token(
    make_app_gateway: AppGatewayFactory, method: str, path: str
) -> None:
    gw = make_app_gateway()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {CLIENT_TOKEN}"}):
        r = gw.http.request(method, path, headers=headers, json={"reason": "x"})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert gw.app.components.state.audit() == []  # nothing happened


def test_the_admin_api_is_off_without_a_token(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(admin_token=None)
    r = gw.admin("GET", "/admin/status")
    assert r.status_code == 403 and "GATEWAY_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_killing_a_variant_moves_its_users_to_the_fallback_at_once(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    canary_user, base_user = user_on(gw, "formatter"), user_on(gw, "baseline")
    started = time.perf_counter()
    r = gw.admin(
        "POST",
        "/admin/routes/crm-assistant/variants/formatter/kill",
        json={"reason": "invalid calls up", "actor": "alice"},
    )
    assert r.status_code == 200
    assert ask(gw, canary_user) == "baseline"  # the very next request
    flip_to_served = time.perf_counter() - started
    assert ask(gw, base_user) == "baseline"
    assert ask(gw, token=FORCER_TOKEN, variant="formatter") == "baseline"  # never served, forced or not
    assert r.json()["routes"]["crm-assistant"]["variants"]["formatter"]["effective_share"] == 0
    assert (
        gw.admin(
            "POST", "/admin/routes/crm-assistant/variants/formatter/revive", json={"reason": "fixed"}
        ).status_code
        == 200
    )
    assert ask(gw, canary_user) == "formatter"  # revive restores the configured weights: same users again
    entries = gw.admin("GET", "/admin/audit").json()["entries"]
    assert [e["action"] for e in entries] == ["revive_variant", "kill_variant"]
    kill = entries[1]
    assert (kill["actor"], kill["reason"], kill["route"], kill["variant"]) == (
        "alice",
        "invalid calls up",
        "crm-assistant",
        "formatter",
    )
    assert kill["policy_version"] == gw.app.components.live.view.policy.version
    print(f"kill to first request on the fallback: {flip_to_served * 1000:.1f} ms")


def test_a_flip_needs_a_reason_and_a_known_target(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    assert gw.admin("POST", "/admin/routes/crm-assistant/kill", json={}).status_code == 400
    assert gw.admin("POST", "/admin/routes/crm-assistant/kill", content=b"{oops").status_code == 400
    assert gw.admin("POST", "/admin/routes/nope/kill", json={"reason": "x"}).status_code == 404
    assert (
        gw.admin("POST", "/admin/routes/crm-assistant/variants/nope/kill", json={"reason": "x"}).status_code
        == 404
    )
    assert gw.app.components.state.audit() == []


def test_route_and_global_kills_send_everything_to_the_fallback(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    canary_user = user_on(gw, "formatter")
    for path in ("/admin/routes/crm-assistant", "/admin"):
        kill, revive = (
            (f"{path}/kill", f"{path}/revive")
            if path != "/admin"
            else ("/admin/kill-all", "/admin/revive-all")
        )
        assert gw.admin("POST", kill, json={"reason": "drill"}).status_code == 200
        assert {ask(gw, canary_user), ask(gw, f"x-{random.random()}")} == {"baseline"}
        assert gw.admin("POST", revive, json={"reason": "drill over"}).status_code == 200
        assert ask(gw, canary_user) == "formatter"


def test_killing_the_last_live_variant_needs_force_then_503s(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    gw.admin("POST", "/admin/routes/crm-assistant/variants/formatter/kill", json={"reason": "a"})
    r = gw.admin("POST", "/admin/routes/crm-assistant/variants/baseline/kill", json={"reason": "b"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "last_live_variant"
    r = gw.admin(
        "POST", "/admin/routes/crm-assistant/variants/baseline/kill", json={"reason": "b", "force": True}
    )
    assert r.status_code == 200
    with pytest.raises(openai.APIStatusError) as err:
        ask(gw, "u1")
    assert err.value.status_code == 503
    assert err.value.body["code"] == "no_live_variant"  # type: ignore[index]
    assert gw.records()[-1].outcome == "no_live_variant"


def test_switches_survive_a_restart(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    gw.admin("POST", "/admin/routes/crm-assistant/variants/formatter/kill", json={"reason": "regression"})
    gw.stop()
    again = make_app_gateway()
    assert again.admin("GET", "/admin/status").json()["routes"]["crm-assistant"]["variants"]["formatter"][
        "killed"
    ]
    assert ask(again, token=FORCER_TOKEN, variant="formatter") == "baseline"


def test_a_flip_in_one_process_reaches_another_sharing_the_database(
    make_app_gateway: AppGatewayFactory,
) -> None:
    a = make_app_gateway()
    b = make_app_gateway()
    a.admin("POST", "/admin/routes/crm-assistant/variants/formatter/kill", json={"reason": "seen by b?"})
    started = time.perf_counter()
    while ask(b, token=FORCER_TOKEN, variant="formatter") != "baseline":
        assert time.perf_counter() - started < 2.0
        time.sleep(0.01)
    print(f"flip seen by the other process after {(time.perf_counter() - started) * 1000:.0f} ms")


def test_reload_swaps_the_policy_and_a_bad_file_keeps_the_old_one(
    make_app_gateway: AppGatewayFactory, tmp_path: Path
) -> None:
    gw = make_app_gateway()
    before = gw.app.components.live.view.policy.version
    policy_file = tmp_path / "policies" / "crm-assistant.toml"
    policy_file.write_text(CRM_POLICY.replace("weight = 10", "weight = 30"))
    r = gw.admin("POST", "/admin/reload", json={"reason": "ramp"})
    assert r.status_code == 200 and r.json()["previous_version"] == before
    after = r.json()["policy_version"]
    assert after != before
    status = gw.admin("GET", "/admin/status").json()
    assert status["routes"]["crm-assistant"]["variants"]["formatter"]["effective_share"] == pytest.approx(
        0.25
    )

    policy_file.write_text(CRM_POLICY.replace('fallback = ["baseline"]', 'fallback = ["nope"]'))
    r = gw.admin("POST", "/admin/reload", json={})
    assert r.status_code == 500 and r.json()["error"]["type"] == "config_error"
    assert "nope" in r.json()["error"]["message"]
    assert gw.app.components.live.view.policy.version == after  # the old policy stays live
    assert ask(gw, "someone") in ("baseline", "formatter")
    actions = [e["action"] for e in gw.admin("GET", "/admin/audit").json()["entries"]]
    assert actions == ["reload_rejected", "reload"]


def test_a_kill_under_load_loses_no_request_and_the_split_follows_the_weights(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    served: list[tuple[float, str]] = []
    failures: list[BaseException] = []
    killed_at: list[float] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        c = sdk_client(gw)
        for _ in range(150):
            try:
                sent = time.perf_counter()
                raw = c.chat.completions.with_raw_response.create(
                    model="crm-assistant", messages=MESSAGES, extra_headers={"x-user-id": f"u{rng.random()}"}
                )
                served.append((sent, raw.headers["x-gateway-variant"]))
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while len(served) < 300 and not failures:
        time.sleep(0.01)
    r = gw.admin("POST", "/admin/routes/crm-assistant/variants/formatter/kill", json={"reason": "under load"})
    killed_at.append(time.perf_counter())
    assert r.status_code == 200
    for t in threads:
        t.join()
    assert failures == []
    assert len(served) == 600
    records = gw.records()
    assert len(records) == 600 and all(rec.outcome == "ok" for rec in records)
    before = Counter(v for t, v in served if t < killed_at[0] - 0.05)
    share = before["formatter"] / sum(before.values())
    assert 0.05 < share < 0.16  # 10 % ± 4 standard errors at n ≈ 300
    # Requests sent after the flip was acknowledged were all decided after it: none may reach the killed variant.
    after = [v for t, v in served if t > killed_at[0]]
    assert len(after) > 100 and set(after) == {"baseline"}
