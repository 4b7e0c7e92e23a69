"""Adapters at runtime, against a simulated engine that loads and unloads LoRA adapters like vLLM: loading what
the policy references, hot swaps under load, the release gate, refusing broken versions, and engine restarts.
The gateways run in process (tests/conftest.py); each test's engine is a real process of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from gateway.store.api import Replica
from tests.adapter_factory import adapter_policy, make_adapter
from tests.conftest import (
    FORCER_TOKEN,
    AppGatewayFactory,
    Gateway,
    SimEngineProcess,
    engine_models,
    sdk_client,
    wait_for,
)

MESSAGES = [{"role": "user", "content": "Hooli: negotiation, 9000 EUR."}]


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    make_adapter(root, version="1", seed=1)
    make_adapter(root, version="2", seed=2)
    make_adapter(root, version="3", seed=3, invalid_rate=0.31)  # fails the gate
    return root


def ask(gw: Gateway, variant: str = "formatter") -> httpx.Response:
    return gw.http.post(
        "/v1/chat/completions",
        json={"model": "crm-assistant", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {FORCER_TOKEN}", "x-gateway-variant": variant},
    )


def actions(gw: Gateway) -> list[str]:
    return [e["action"] for e in gw.admin("GET", "/admin/audit?limit=1000").json()["entries"]]


@pytest.fixture
def own_engine() -> Iterator[SimEngineProcess]:
    engine = SimEngineProcess()
    yield engine
    engine.stop()


@pytest.fixture
def sim_engine_url(own_engine: SimEngineProcess) -> str:
    """Every test here gets an engine of its own: gateways unload the catalog versions their policy does not
    reference, so a gateway of an earlier test still shutting down could unload what this test just loaded."""
    return own_engine.url


def test_the_referenced_version_is_loaded_and_serves(
    make_app_gateway: AppGatewayFactory, adapters: Path, sim_engine_url: str
) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    wait_for(lambda: "crm-formatter@1" in engine_models(sim_engine_url))
    r = ask(gw)
    assert r.status_code == 200 and r.headers["x-gateway-variant"] == "formatter"
    assert r.json()["model"] == "crm-formatter@1"
    (rec,) = [rec for rec in gw.records() if rec.variant == "formatter"]
    assert rec.adapter == "crm-formatter@1" and rec.engine_model == "crm-formatter@1"
    listed = {a["ref"]: a for a in gw.admin("GET", "/admin/adapters").json()["adapters"]}
    assert listed["crm-formatter@1"]["referenced_by"] == ["crm-assistant/formatter"]
    assert listed["crm-formatter@3"]["lineage"]["evaluation"]["invalid_call_rate"] == 0.31
    assert "adapter_load" in actions(gw)


def test_a_hot_swap_under_load_loses_no_request(
    make_app_gateway: AppGatewayFactory, adapters: Path, tmp_path: Path, sim_engine_url: str
) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    wait_for(lambda: "crm-formatter@1" in engine_models(sim_engine_url))
    failures: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def load() -> None:
        c = sdk_client(gw, FORCER_TOKEN)
        while not stop.is_set():
            try:
                raw = c.chat.completions.with_raw_response.create(
                    model="crm-assistant", messages=MESSAGES, extra_headers={"x-gateway-variant": "formatter"}
                )
                served.append(raw.parse().model)
            except openai.APIError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(served) >= 3)  # traffic on @1 before the swap (not a fixed sleep: CI machines vary)
    (tmp_path / "policies" / "crm.toml").write_text(adapter_policy("2", weight=50))
    r = gw.admin("POST", "/admin/reload", json={"reason": "swap to @2"})
    assert r.status_code == 200, r.text
    assert "crm-formatter@2" in engine_models(sim_engine_url)  # loaded before the policy went live
    count = len(served)
    wait_for(lambda: len(served) >= count + 3)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert served[-1] == "crm-formatter@2" and "crm-formatter@1" in served
    wait_for(lambda: "crm-formatter@1" not in engine_models(sim_engine_url))  # unloaded once unused
    assert {"adapter_load", "reload", "adapter_unload"} <= set(actions(gw))
    assert len(gw.records()) == len(served)


def test_the_release_gate_refuses_a_regressed_version_on_reload(
    make_app_gateway: AppGatewayFactory, adapters: Path, tmp_path: Path, sim_engine_url: str
) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    wait_for(lambda: "crm-formatter@1" in engine_models(sim_engine_url))
    version = gw.app.components.live.view.policy.version
    (tmp_path / "policies" / "crm.toml").write_text(adapter_policy("3", weight=50))
    r = gw.admin("POST", "/admin/reload", json={"reason": "try @3"})
    assert r.status_code == 500 and "max_invalid_call_rate" in r.json()["error"]["message"]
    assert gw.app.components.live.view.policy.version == version
    assert "reload_rejected" in actions(gw) and "reload" not in actions(gw)


def test_a_broken_version_never_reaches_the_engine(
    make_app_gateway: AppGatewayFactory, adapters: Path, tmp_path: Path, sim_engine_url: str
) -> None:
    broken = make_adapter(adapters, version="9", seed=9)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\xc0\x7f")  # a NaN, and a changed digest
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    loads = httpx.get(sim_engine_url + "/sim/stats").json()["adapter_loads"]
    (tmp_path / "policies" / "crm.toml").write_text(adapter_policy("9", weight=50))
    r = gw.admin("POST", "/admin/reload", json={"reason": "try @9"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_weights_sha256"
    assert "crm-formatter@9" not in engine_models(sim_engine_url)
    assert httpx.get(sim_engine_url + "/sim/stats").json()["adapter_loads"] == loads
    assert {"adapter_rejected", "reload_rejected"} <= set(actions(gw))


def test_an_engine_restart_is_reconciled_and_requests_fall_back_meanwhile(
    make_app_gateway: AppGatewayFactory, adapters: Path, own_engine: SimEngineProcess
) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("2", weight=50)},
        adapters_dir=adapters,
        reconcile_s=0.5,
        engines={"default": own_engine.url},
    )
    wait_for(lambda: "crm-formatter@2" in engine_models(own_engine.url))
    own_engine.restart()  # a restarted vLLM has forgotten its adapters
    # Until the reconciler notices, the engine answers 404 for the adapter and the gateway falls back.
    answers = [ask(gw) for _ in range(5)]
    assert all(r.status_code == 200 for r in answers)
    assert {r.headers["x-gateway-variant"] for r in answers} <= {"baseline", "formatter"}
    wait_for(lambda: "crm-formatter@2" in engine_models(own_engine.url))
    assert ask(gw).headers["x-gateway-variant"] == "formatter"
    fell_back = [rec for rec in gw.records() if rec.fallback_from == "formatter"]
    assert all(rec.variant == "baseline" and rec.outcome == "ok" for rec in fell_back)
    assert actions(gw).count("adapter_load") == 2  # at start, and again after the restart


def test_swap_and_rollback_in_one_command_each(
    make_app_gateway: AppGatewayFactory, adapters: Path, sim_engine_url: str
) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    base = "/admin/routes/crm-assistant/variants/formatter/adapter"
    r = gw.admin(
        "POST", base, json={"adapter": "crm-formatter@2", "reason": "ship the fixes", "actor": "ana"}
    )
    assert r.status_code == 200, r.text
    assert (r.json()["previous"], r.json()["adapter"]) == ("crm-formatter@1", "crm-formatter@2")
    assert "crm-formatter@2" in engine_models(sim_engine_url)  # loaded before the swap went live
    assert ask(gw).json()["model"] == "crm-formatter@2"
    assert ask(gw).headers["x-gateway-policy-version"].startswith(gw.app.components.live.files.version + "+")
    gated = gw.admin("POST", base, json={"adapter": "crm-formatter@3", "reason": "try it"})
    assert gated.status_code == 409 and "release gate" in gated.json()["error"]["message"]
    back = gw.admin("POST", base + "/rollback", json={"reason": "formatter regressed", "actor": "ana"})
    assert back.status_code == 200 and back.json()["adapter"] == "crm-formatter@1"
    assert ask(gw).json()["model"] == "crm-formatter@1"
    entries = gw.admin("GET", "/admin/audit").json()["entries"]
    swaps = [
        (e["action"], e["actor"], e["detail"]["adapter"])
        for e in entries
        if e["action"].startswith("adapter_s") or e["action"] == "adapter_rollback"
    ]
    assert swaps == [
        ("adapter_rollback", "ana", "crm-formatter@1"),
        ("adapter_swap", "ana", "crm-formatter@2"),
    ]


def test_a_swap_survives_a_restart(make_app_gateway: AppGatewayFactory, adapters: Path) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    gw.admin(
        "POST",
        "/admin/routes/crm-assistant/variants/formatter/adapter",
        json={"adapter": "crm-formatter@2", "reason": "x"},
    )
    gw.stop()
    again = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    variant = again.app.components.live.view.policy.routes["crm-assistant"].variant("formatter")
    assert variant is not None and variant.adapter == "crm-formatter@2"


def test_lineage_answers_what_served_a_route_and_who_changed_it(
    make_app_gateway: AppGatewayFactory, adapters: Path, sim_engine_url: str
) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=adapters, reconcile_s=0.2
    )
    wait_for(lambda: "crm-formatter@1" in engine_models(sim_engine_url))
    started = time.time()
    ask(gw)
    gw.admin(
        "POST",
        "/admin/routes/crm-assistant/variants/formatter/adapter",
        json={"adapter": "crm-formatter@2", "reason": "ship the fixes", "actor": "ana"},
    )
    ask(gw)
    gw.records()
    body = gw.admin(
        "GET", f"/admin/lineage?route=crm-assistant&since={started - 1}&until={time.time() + 1}"
    ).json()
    served = {(row["variant"], row["adapter"]): row for row in body["served"]}
    assert served["formatter", "crm-formatter@1"]["requests"] == 1
    assert served["formatter", "crm-formatter@2"]["lineage"]["dataset_sha256"] == "d" * 64
    assert (
        served["formatter", "crm-formatter@1"]["policy_version"]
        != served["formatter", "crm-formatter@2"]["policy_version"]
    )
    assert any(c["action"] == "adapter_swap" and c["actor"] == "ana" for c in body["changes"])
    assert gw.admin("GET", "/admin/lineage").status_code == 400


def test_a_version_another_replica_references_is_not_unloaded(
    make_app_gateway: AppGatewayFactory, tmp_path: Path, adapters: Path, sim_engine_url: str
) -> None:
    gw = make_app_gateway(
        {"crm.toml": adapter_policy("1", weight=50)},
        adapters_dir=adapters,
        reconcile_s=0.1,
        engines={"default": sim_engine_url},
    )
    wait_for(lambda: "crm-formatter@1" in engine_models(sim_engine_url))
    store = gw.app.components.state
    other = Replica("other", "host-2", 1, time.time(), "v", "s", time.time(), ("crm-formatter@1",))
    store.heartbeat(other)  # another replica, whose policy still serves @1
    (tmp_path / "policies" / "crm.toml").write_text(adapter_policy("2", weight=50))
    assert gw.admin("POST", "/admin/reload", json={"reason": "to @2"}).status_code == 200
    deadline = time.monotonic() + 1.5  # five times the unload grace (3 reconcile rounds)
    while time.monotonic() < deadline:
        store.heartbeat(replace(other, last_seen=time.time()))
        assert "crm-formatter@1" in engine_models(sim_engine_url), "unloaded under another replica"
        time.sleep(0.05)
    store.leave("other")  # once no replica references it, it goes
    wait_for(lambda: "crm-formatter@1" not in engine_models(sim_engine_url))
