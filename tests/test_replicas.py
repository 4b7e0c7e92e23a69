"""Gateway replicas sharing one Postgres database (`GATEWAY_DATABASE_URL`), each with a data directory of its own:
what an operator changes through one replica, every replica honours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError

from gateway.app import create_app
from gateway.devtools.postgres import PostgresServer
from gateway.errors import ConfigError
from gateway.policy import served_adapters
from gateway.settings import Settings
from gateway.store.request_log import read_records
from tests.adapter_factory import adapter_policy, make_adapter
from tests.conftest import (
    ADMIN_TOKEN,
    CRM_POLICY,
    FORCER_TOKEN,
    ROOT,
    AppGatewayFactory,
    Gateway,
    SimEngineProcess,
    engine_models,
    sdk_client,
    wait_for,
)
from tests.test_admin import ask, user_on
from tests.test_admin_input import edit_policy
from tests.test_canary_gateway import ask as canary_ask
from tests.test_canary_gateway import audit, canary_policy, drive_until

KILL = "/admin/routes/crm-assistant/variants/formatter/kill"
REVIVE = "/admin/routes/crm-assistant/variants/formatter/revive"
ADAPTER = "/admin/routes/crm-assistant/variants/formatter/adapter"


def _replicas(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path, n: int
) -> list[Gateway]:
    url = postgres.new_database()
    return [
        make_app_gateway(
            database_url=url, data_dir=tmp_path / f"replica-{i}", state_poll_s=0.5, heartbeat_s=0.2
        )
        for i in range(n)
    ]


def _killed_on(gw: Gateway) -> bool:
    return gw.app.components.live.view.switches.variant_killed("crm-assistant", "formatter")


def test_a_kill_through_one_replica_is_honoured_by_the_others(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    one, two, three = _replicas(make_app_gateway, postgres, tmp_path, 3)
    canary_user = user_on(two, "formatter")
    assert ask(three, canary_user) == "formatter"  # sticky users land alike on every replica
    r = one.admin("POST", KILL, json={"reason": "invalid calls up", "actor": "alice"})
    answered = time.monotonic()
    assert r.status_code == 200
    while not (_killed_on(two) and _killed_on(three)):
        assert time.monotonic() - answered < 2.0, "a replica is still routing to the killed variant"
        time.sleep(0.002)
    assert ask(two, canary_user) == "baseline" and ask(three, canary_user) == "baseline"
    (entry,) = three.admin("GET", "/admin/audit").json()["entries"]  # one audit log for every replica
    assert (entry["action"], entry["actor"]) == ("kill_variant", "alice")
    assert three.admin("POST", REVIVE, json={"reason": "fixed"}).status_code == 200
    deadline = time.monotonic() + 2.0
    while _killed_on(one):
        assert time.monotonic() < deadline, "the revive did not reach the first replica"
        time.sleep(0.002)
    assert ask(one, canary_user) == "formatter"


def test_a_shadow_override_through_one_replica_is_honoured_by_the_others(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    one, two = _replicas(make_app_gateway, postgres, tmp_path, 2)

    def share_on(gw: Gateway) -> float | None:
        shadow = gw.app.components.live.view.plans["crm-assistant"].shadow
        return None if shadow is None else shadow.spec.share

    start = {"variant": "formatter", "share": 30, "reason": "try", "actor": "alice"}
    assert one.admin("POST", "/admin/shadow/crm-assistant/start", json=start).status_code == 200
    wait_for(lambda: share_on(two) == 30.0, timeout=2.0)
    stop = {"variant": "formatter", "reason": "enough"}
    assert two.admin("POST", "/admin/shadow/crm-assistant/stop", json=stop).status_code == 200
    wait_for(lambda: share_on(one) is None and one.app.components.live.shadow_overrides != {}, timeout=2.0)
    entries = one.admin("GET", "/admin/audit").json()["entries"]
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("shadow_stop", "admin"),
        ("shadow_start", "alice"),
    ]


def test_an_unreachable_database_stops_the_gateway_from_starting(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "crm.toml").write_text(CRM_POLICY)
    settings = Settings(
        database_url="postgresql://gateway@127.0.0.1:1/gateway",
        data_dir=tmp_path / "var",
        policies_dir=tmp_path / "policies",
        auth="off",
    )
    with pytest.raises(ConfigError, match=r"GATEWAY_DATABASE_URL: cannot open the state database: .*refused"):
        create_app(settings)


def test_the_database_url_must_be_postgres() -> None:
    with pytest.raises(ValidationError, match="must be a postgresql:// URL"):
        Settings(database_url="mysql://db/gateway")


def _status_when(gw: Gateway, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        status = gw.admin("GET", "/admin/status").json()
        if done(status):
            return status
        assert time.monotonic() < deadline, f"status never settled: {status['replicas']}"
        time.sleep(0.05)


def test_status_lists_every_replica_and_flags_the_one_that_differs(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    one, two, three = _replicas(make_app_gateway, postgres, tmp_path, 3)
    status = _status_when(two, lambda s: len(s["replicas"]) == 3)
    ids = {gw.app.components.replica_id for gw in (one, two, three)}
    assert {r["id"] for r in status["replicas"]} == ids and status[
        "answered_by"
    ] == two.app.components.replica_id
    assert all(r["in_step"] for r in status["replicas"])
    edit_policy(tmp_path)  # the policy files change, and only the first replica reloads them
    assert one.admin("POST", "/admin/reload", json={"reason": "ramp"}).status_code == 200
    status = _status_when(three, lambda s: not all(r["in_step"] for r in s["replicas"]))
    (differs,) = [r for r in status["replicas"] if not r["in_step"]]
    assert differs["id"] == one.app.components.replica_id
    assert differs["policy_version"] == one.app.components.live.view.policy.version
    two.stop()  # a replica that stops leaves the list
    _status_when(three, lambda s: two.app.components.replica_id not in {r["id"] for r in s["replicas"]})


def test_postgres_away_for_20_s_under_load_loses_no_request_and_no_record(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    one, two = _replicas(make_app_gateway, postgres, tmp_path, 2)
    sent: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def load(gw: Gateway) -> None:
        while not stop.is_set():
            try:
                sent.append(ask(gw))
            except BaseException as err:  # reported below
                failures.append(err)
            time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(gw,)) for gw in (one, two)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        with postgres.down():
            ready = _until(one, lambda r: r["degraded"])  # still ready: it serves on the last known state
            assert ready["ready"] is True and ready["store"].startswith("unreachable")
            refused = two.admin("POST", KILL, json={"reason": "during the outage"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "audit_failed"
            assert b"gateway_store_up 0" in one.http.get("/metrics", headers=_METRICS).content
            time.sleep(20.0 - 1.0)
        _until(one, lambda r: not r["degraded"])
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert len(sent) > 200  # requests kept flowing through the outage (about 1,000 on an idle machine)
    assert not _killed_on(one) and not _killed_on(two)  # the refused kill did not happen anywhere
    one.stop()  # both drain: every record reaches the database
    two.stop()
    assert len(read_records(postgres_url(one))) == len(sent)


_METRICS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def postgres_url(gw: Gateway) -> str:
    url = gw.settings.database_url
    assert url is not None
    return url.get_secret_value()


def _until(gw: Gateway, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 30  # generous: a loaded machine reconnects slowly
    while not done(ready := gw.http.get("/readyz").json()):
        assert time.monotonic() < deadline, f"/readyz never settled: {ready}"
        time.sleep(0.05)
    return ready


def test_the_report_reads_every_replicas_records_from_postgres(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    replicas = _replicas(make_app_gateway, postgres, tmp_path, 2)
    for gw in replicas:
        for i in range(10):
            ask(gw, f"user-{i}")
        gw.records()  # flushed to the shared table
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_DATABASE_URL=postgres_url(replicas[0]), GATEWAY_DATA_DIR=str(tmp_path / "elsewhere"))
    report = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "report", "--json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert report.returncode == 0, report.stderr
    assert sum(row["requests"] for row in json.loads(report.stdout)) == 20
    text = subprocess.run(  # the table, and the canaries' part read from the state in Postgres
        [sys.executable, "-m", "gateway.cli", "report"], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert text.returncode == 0 and "baseline" in text.stdout, text.stderr


def _listening(conn: psycopg.Connection[Any]) -> int:
    (n,) = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
    ).fetchone() or (0,)
    return int(n)


def _propagation(flipper: Gateway, others: list[Gateway], killed: bool) -> float:
    """Seconds from the flip's answer to the last of `others` routing by it."""
    path = KILL if killed else REVIVE
    assert flipper.admin("POST", path, json={"reason": "propagation"}).status_code == 200
    answered = time.monotonic()
    while any(_killed_on(gw) != killed for gw in others):
        assert time.monotonic() - answered < 5.0, "a replica never routed by the flip"
        time.sleep(0.0005)
    return time.monotonic() - answered


def test_a_flip_reaches_every_replica_within_a_second(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    one, two, three = _replicas(make_app_gateway, postgres, tmp_path, 3)
    times = sorted(_propagation(one, [two, three], killed=i % 2 == 0) for i in range(60))
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    print(f"\nflip → every replica, 60 flips: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 1.0
    # With the LISTEN connection cut just before each flip, the re-read every state_poll_s (0.5 s) catches it.
    cut_times = []
    for i in range(10):
        with psycopg.connect(postgres_url(one), autocommit=True) as conn:
            wait_for(lambda: _listening(conn) == 3)  # every replica has reconnected since the last cut
            cut = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
            ).fetchall()
        assert len(cut) == 3
        cut_times.append(_propagation(one, [two, three], killed=i % 2 == 0))
    cut_times.sort()
    print(f"with LISTEN cut, 10 flips: p50 {cut_times[5] * 1000:.1f} ms, max {cut_times[-1] * 1000:.1f} ms")
    assert cut_times[-1] < 1.0


def test_a_canary_spread_over_three_replicas_is_killed_once_and_everywhere(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.new_database()
    # Twice the baseline's invalid rate, at half the traffic; the step needs more requests than the test sends,
    # so the only decision it can reach is the kill.
    policy = {"crm.toml": canary_policy("double-invalid", steps="[50, 100]", min_requests=100_000)}
    replicas = [
        make_app_gateway(
            policy,
            database_url=url,
            data_dir=tmp_path / f"replica-{i}",
            canary_interval_s=0.1,
            state_poll_s=0.5,
            heartbeat_s=0.2,
        )
        for i in range(3)
    ]
    clients = [sdk_client(gw) for gw in replicas]
    sent = drive_until(clients, lambda: bool(audit(replicas[0].http, "canary_kill")), timeout=120)
    print(f"\n2x invalid candidate over three replicas killed after {sent} requests")
    time.sleep(1.0)  # any replica that would decide again has had ten looks by now
    (kill,) = audit(replicas[2].http, "canary_kill")  # one decision, in the one audit log
    assert kill["variant"] == "formatter" and kill["reason"].startswith("invalid_call_rate")
    deadline = time.monotonic() + 2
    while not all(
        gw.app.components.live.view.switches.variant_killed("crm-assistant", "formatter") for gw in replicas
    ):
        assert time.monotonic() < deadline, "a replica still routes to the killed candidate"
        time.sleep(0.01)
    for client in clients:
        assert {canary_ask(client) for _ in range(10)} == {"baseline"}


def test_every_answered_request_has_its_record_through_flips_swaps_and_restarts(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    """Two replicas behind a load balancer (here: a list of the replicas in rotation), a pool of two engines, and
    meanwhile: kills and revives, an adapter swap and its rollback, one replica drained and started again, one
    engine member killed and started again. No client sees a failure; Postgres holds one record per answer."""
    root = tmp_path / "adapters"
    make_adapter(root, version="1", seed=1)
    make_adapter(root, version="2", seed=2)
    a, b = SimEngineProcess(), SimEngineProcess()
    url = postgres.new_database()

    def replica(i: int) -> Gateway:
        return make_app_gateway(
            {"crm.toml": adapter_policy("1", weight=50)},
            database_url=url,
            data_dir=tmp_path / f"replica-{i}",
            adapters_dir=root,
            engines={"default": [a.url, b.url]},
            reconcile_s=0.3,
            engine_probe_s=0.2,
            engine_max_backoff_s=0.5,
            state_poll_s=0.5,
            heartbeat_s=0.2,
        )

    rotation = [replica(0), replica(1)]
    answered, failures = [0], []
    stop = threading.Event()

    def load(seed: int) -> None:
        n = seed
        while not stop.is_set():
            gw = rotation[n % len(rotation)]  # a new list is swapped in whole: never a half-made rotation
            n += 1
            try:
                ask(gw, f"user-{n}", token=FORCER_TOKEN, variant=("baseline", "formatter")[n % 2])
                answered[0] += 1
            except Exception as err:  # reported below
                failures.append(repr(err))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all("crm-formatter@1" in engine_models(m.url) for m in (a, b)), timeout=20)
        for gw, path in ((rotation[0], KILL), (rotation[1], REVIVE)):
            assert gw.admin("POST", path, json={"reason": "chaos"}).status_code == 200
            time.sleep(0.3)
        swapped = rotation[1].admin("POST", ADAPTER, json={"adapter": "crm-formatter@2", "reason": "chaos"})
        assert swapped.status_code == 200, swapped.text
        wait_for(lambda: _serve_everywhere(rotation, "crm-formatter@2"))  # a swap reaches every replica
        back = rotation[0].admin("POST", ADAPTER + "/rollback", json={"reason": "chaos"})
        assert back.status_code == 200 and back.json()["adapter"] == "crm-formatter@1", back.text
        wait_for(lambda: _serve_everywhere(rotation, "crm-formatter@1"))
        leaving = rotation[1]
        rotation[:] = [rotation[0]]  # out of the balancer's rotation first, then drained
        time.sleep(0.3)
        leaving.stop()
        rotation[:] = [rotation[0], replica(2)]
        b.kill()  # an engine member dies under load, and comes back
        time.sleep(0.5)
        b.start()
        wait_for(lambda: "crm-formatter@1" in engine_models(b.url), timeout=20)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for gw in rotation:
            gw.stop()  # drained: every record is in the database
        a.stop()
        b.stop()
    assert failures == [], failures[:3]
    assert answered[0] > 100
    assert len(read_records(url)) == answered[0]


def _serve_everywhere(replicas: list[Gateway], ref: str) -> bool:
    return all(
        served_adapters(gw.app.components.live.view.policy)[("crm-assistant", "formatter")] == ref
        for gw in replicas
    )
