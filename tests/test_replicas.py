"""Gateway replicas sharing one Postgres database (`GATEWAY_DATABASE_URL`), each with a data directory of its own:
what an operator changes through one replica, every replica honours."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.app import create_app
from gateway.devtools.postgres import PostgresServer
from gateway.errors import ConfigError
from gateway.settings import Settings
from tests.conftest import ROOT, GatewayFactory, RunningGateway
from tests.test_admin import ask, user_on

KILL = "/admin/routes/crm-assistant/variants/formatter/kill"
REVIVE = "/admin/routes/crm-assistant/variants/formatter/revive"


def _replicas(
    make_gateway: GatewayFactory, postgres: PostgresServer, tmp_path: Path, n: int
) -> list[RunningGateway]:
    url = postgres.new_database()
    return [
        make_gateway(database_url=url, data_dir=tmp_path / f"replica-{i}", state_poll_s=0.5) for i in range(n)
    ]


def _killed_on(gw: RunningGateway) -> bool:
    return gw.app.components.live.view.switches.variant_killed("crm-assistant", "formatter")


def test_a_kill_through_one_replica_is_honoured_by_the_others(
    make_gateway: GatewayFactory, postgres: PostgresServer, tmp_path: Path
) -> None:
    one, two, three = _replicas(make_gateway, postgres, tmp_path, 3)
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


def test_an_unreachable_database_stops_the_gateway_from_starting(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql://gateway@127.0.0.1:1/gateway",
        data_dir=tmp_path / "var",
        policies_dir=ROOT / "policies",
        auth="off",
    )
    with pytest.raises(ConfigError, match=r"GATEWAY_DATABASE_URL: cannot open the state database: .*refused"):
        create_app(settings)


def test_the_database_url_must_be_postgres() -> None:
    with pytest.raises(ValidationError, match="must be a postgresql:// URL"):
        Settings(database_url="mysql://db/gateway")
