"""The state store's contract, run against both backends: SQLite's file (one host) and a real Postgres server
(replicas on several hosts). `two` opens two handles on the same storage, as two gateway processes would."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from gateway.canary.machine import CanaryState, Transition, initial
from gateway.devtools.postgres import PostgresServer
from gateway.policy import Flip
from gateway.shadow.overrides import ShadowOverride
from gateway.store.api import AuditQuery, Entry, Replica, StoreError
from gateway.store.postgres import migrate
from gateway.store.state import POSTGRES_MIGRATIONS, TableStore, open_postgres, open_sqlite

Opener = Callable[..., TableStore]


@dataclass
class Backend:
    open: Opener  # a new handle on this test's storage (`clock=`: the store's clock)
    where: Path | str  # the SQLite file or the Postgres URL


KILL = Flip("variant", True, "crm", "ft")


def _kill_entry(reason: str = "drill") -> Entry:
    return Entry("kill_variant", "ops", route="crm", variant="ft", reason=reason, policy_version="v1")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """One test's storage on each backend; every handle opened on it is closed at the end."""
    where: Path | str = tmp_path / "state.db"
    if request.param == "postgres":
        where = request.getfixturevalue("postgres").new_database()
    opened: list[TableStore] = []

    def open_one(clock: Callable[[], float] = time.time) -> TableStore:
        opened.append(
            open_sqlite(where, clock=clock)
            if isinstance(where, Path)
            else open_postgres(where, poll_s=0.2, clock=clock)
        )
        return opened[-1]

    yield Backend(open_one, where)
    for store in opened:
        store.close()


def _refuse(where: Path | str, action: str) -> None:
    """Make the database refuse audit entries of `action` (as a full disk would), per backend."""
    if isinstance(where, Path):
        import sqlite3

        with sqlite3.connect(where) as db:
            db.execute(
                f"CREATE TRIGGER refuse BEFORE INSERT ON audit WHEN NEW.action = '{action}' "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        return
    with psycopg.connect(where, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$ LANGUAGE plpgsql"
        )
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON audit FOR EACH ROW WHEN (NEW.action = '{action}') "
            "EXECUTE FUNCTION refuse()"
        )


def test_a_flip_is_written_with_its_entry_and_seen_by_another_handle(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    seen = two.data_version()
    switches = one.flip(KILL, _kill_entry())
    assert switches.variant_killed("crm", "ft")
    deadline = time.monotonic() + 5
    while two.data_version() == seen and time.monotonic() < deadline:
        time.sleep(0.005)
    assert two.data_version() != seen, "the other handle was not told of the change"
    assert two.switches().variant_killed("crm", "ft")
    (entry,) = two.audit()
    assert (entry.action, entry.actor, entry.route, entry.variant, entry.reason, entry.policy_version) == (
        "kill_variant",
        "ops",
        "crm",
        "ft",
        "drill",
        "v1",
    )
    revived = two.flip(Flip("variant", False, "crm", "ft"), _kill_entry("over"))
    assert not revived.variant_killed("crm", "ft") and not one.switches().variant_killed("crm", "ft")


def test_a_flip_whose_entry_is_refused_writes_nothing(backend: Backend) -> None:
    store = backend.open()
    _refuse(backend.where, "kill_variant")
    with pytest.raises(StoreError, match="disk full"):
        store.flip(KILL, _kill_entry())
    assert not store.switches().variant_killed("crm", "ft") and store.audit() == []


def test_pins_history_and_audit_queries(backend: Backend) -> None:
    store = backend.open()
    store.note_served({("crm", "ft"): "fmt@1"}, actor="gateway", action="start")
    store.note_served({("crm", "ft"): "fmt@1"}, actor="gateway", action="start")  # unchanged: no new row
    swap = Entry("adapter_swap", "ops", route="crm", variant="ft", reason="fix", detail={"adapter": "fmt@2"})
    assert store.pin("crm", "ft", "fmt@2", swap, {("crm", "ft"): "fmt@2"}) == {("crm", "ft"): "fmt@2"}
    assert [(ref, action) for _, ref, _, action in store.history("crm", "ft")] == [
        ("fmt@2", "swap"),
        ("fmt@1", "start"),
    ]
    unpin = Entry("adapter_rollback", "ops", route="crm", variant="ft", reason="back")
    assert store.pin("crm", "ft", None, unpin, {("crm", "ft"): "fmt@1"}) == {}
    store.record(Entry("reload", "ops", policy_version="v2", detail={"routes": ["crm"]}))
    store.record(Entry("drill", "ops", route="other", variant="x"))
    assert [e.action for e in store.audit()] == ["drill", "reload", "adapter_rollback", "adapter_swap"]
    assert [e.action for e in store.audit(AuditQuery(route="crm"))] == ["adapter_rollback", "adapter_swap"]
    assert [e.action for e in store.audit(AuditQuery(limit=1))] == ["drill"]
    oldest = store.audit(AuditQuery(limit=None, actions=("adapter_%", "drill"), oldest_first=True))
    assert [e.action for e in oldest] == ["adapter_swap", "adapter_rollback", "drill"]
    assert oldest[0].detail == {"adapter": "fmt@2"}
    later = store.audit(AuditQuery(since=oldest[-1].at))
    assert later[0].action == "drill" and all(e.at >= oldest[-1].at for e in later)


def test_shadow_overrides_are_written_with_their_entries_and_cleared(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    start = ShadowOverride("crm", "start", "ft", 20.0, "ops", "try it")
    started = one.set_shadow_override(
        "crm", start, Entry("shadow_start", "ops", route="crm", variant="ft", reason="try it")
    )
    assert (
        started
        == two.shadow_overrides()
        == {"crm": ShadowOverride("crm", "start", "ft", 20.0, "ops", "try it", started["crm"].at)}
    )
    assert started["crm"].at == two.audit()[0].at  # the row's time is its audit entry's
    stop = ShadowOverride("crm", "stop", "ft", None, "bob", "enough")
    two.set_shadow_override(
        "crm", stop, Entry("shadow_stop", "bob", route="crm", variant="ft", reason="enough")
    )
    default = ShadowOverride("other", "start", "x", None, "ops", "default share")
    two.set_shadow_override("other", default, Entry("shadow_start", "ops", route="other", variant="x"))
    now = one.shadow_overrides()
    assert [(o.route, o.mode, o.variant, o.share, o.actor, o.reason) for o in now.values()] == [
        ("crm", "stop", "ft", None, "bob", "enough"),
        ("other", "start", "x", None, "ops", "default share"),
    ]
    assert one.set_shadow_override("crm", None, Entry("shadow_clear", "ops", route="crm")) == {
        "other": now["other"]
    }
    assert [e.action for e in two.audit(AuditQuery(route="crm"))] == [
        "shadow_clear",
        "shadow_stop",
        "shadow_start",
    ]


def test_a_shadow_override_whose_entry_is_refused_writes_nothing(backend: Backend) -> None:
    store = backend.open()
    _refuse(backend.where, "shadow_start")
    with pytest.raises(StoreError, match="disk full"):
        store.set_shadow_override("crm", ShadowOverride("crm", "start", "ft"), Entry("shadow_start", "ops"))
    assert store.shadow_overrides() == {} and store.audit() == []


def test_a_signed_out_session_is_seen_by_another_handle_until_it_expires(backend: Backend) -> None:
    now = [1000.0]
    one, two = backend.open(clock=lambda: now[0]), backend.open(clock=lambda: now[0])
    assert one.ended_sessions() == frozenset()
    seen = two.data_version()
    assert one.end_session("sid-a", 1060.0) == {"sid-a"}
    deadline = time.monotonic() + 5
    while two.data_version() == seen and time.monotonic() < deadline:
        time.sleep(0.005)
    assert two.data_version() != seen, "the other handle was not told of the sign-out"
    assert two.end_session("sid-b", 2000.0) == {"sid-a", "sid-b"}
    assert one.end_session("sid-a", 1060.0) == {"sid-a", "sid-b"}  # signing out twice is one sign-out
    assert one.ended_sessions() == two.ended_sessions() == {"sid-a", "sid-b"}
    now[0] = 1060.0  # sid-a's cookie has expired: refused anyway, no longer listed
    assert two.ended_sessions() == {"sid-b"}
    assert two.end_session("sid-c", 1500.0) == {"sid-b", "sid-c"}
    now[0] = 1000.0
    assert one.ended_sessions() == {
        "sid-b",
        "sid-c",
    }  # sid-a's row was deleted by the sign-out after its expiry
    assert one.audit() == []  # a sign-out changes nothing served


def test_of_two_handles_moving_a_canary_only_one_writes(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    start = initial("crm", "k", 0.0)
    started = Entry("canary_start", "canary", route="crm", variant="ft", detail={"candidate": "ft"})
    assert one.start_canary(start, None, started)
    assert not two.start_canary(start, None, started)
    killed = CanaryState("crm", "k", "killed", 0, 0.0, 0.0, 0.0, start.revision + 1)
    move = Transition(killed, "canary_kill", "invalid_call_rate: 2x", kill=True)
    entry = Entry("canary_kill", "canary", route="crm", variant="ft", reason=move.reason)
    assert [s.move_canary(start, move, "ft", entry) for s in (one, two)] == [True, False]
    assert [e.action for e in two.audit()] == ["canary_kill", "canary_start"]
    assert two.switches().variant_killed("crm", "ft") and two.canary_states()["crm"].status == "killed"
    newer = CanaryState("crm", "k2", "running", 0, 5.0, 5.0, 5.0, killed.revision + 1)
    assert two.start_canary(newer, killed, Entry("canary_start", "canary", route="crm"))
    assert one.canary_states()["crm"].key == "k2"


def test_replicas_starting_together_migrate_once(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    stores: list[TableStore] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(open_postgres(url))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors and len(stores) == 4
        with psycopg.connect(url) as conn:
            version = conn.execute("SELECT version FROM schema_versions WHERE component = 'state'").fetchone()
        assert version == (len(POSTGRES_MIGRATIONS),)
    finally:
        for store in stores:
            store.close()


def test_a_database_from_before_shadow_overrides_gains_the_table_and_keeps_its_state(
    postgres: PostgresServer,
) -> None:
    url = postgres.new_database()
    assert (
        migrate(url, "state", POSTGRES_MIGRATIONS[:2]) == 0
    )  # as the release before shadow overrides left it
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO switches (scope, route, variant, killed, reason, actor, at)"
            " VALUES ('variant', 'crm', 'ft', 1, 'old', 'ops', 1.0)"
        )
    store = open_postgres(url)
    try:
        assert store.switches().variant_killed("crm", "ft") and store.shadow_overrides() == {}
        stop = ShadowOverride("crm", "stop", "ft", None, "ops", "quiet")
        assert store.set_shadow_override("crm", stop, Entry("shadow_stop", "ops"))["crm"].mode == "stop"
    finally:
        store.close()


def test_a_database_from_before_console_signouts_gains_the_table(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    assert (
        migrate(url, "state", POSTGRES_MIGRATIONS[:3]) == 0
    )  # as the release before console sign-outs left it
    store = open_postgres(url)
    try:
        assert store.ended_sessions() == frozenset()
        assert store.end_session("sid", time.time() + 60) == {"sid"}
    finally:
        store.close()
    assert migrate(url, "state", POSTGRES_MIGRATIONS) == len(POSTGRES_MIGRATIONS)  # nothing left to apply


def test_a_cut_listen_connection_is_caught_by_the_poll_and_reopened(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    writer, reader = open_postgres(url), open_postgres(url, poll_s=0.3)
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            cut = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
            ).fetchall()
        assert cut, "no LISTEN connection to cut"
        seen = reader.data_version()
        writer.flip(KILL, _kill_entry())
        deadline = time.monotonic() + 3
        while not reader.switches().variant_killed("crm", "ft") or reader.data_version() == seen:
            assert time.monotonic() < deadline, "the reader never caught up"
            time.sleep(0.01)
        time.sleep(0.5)  # the listener has reconnected: the next change is announced, not polled
        with psycopg.connect(url, autocommit=True) as admin:
            listening = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
            ).fetchone()
        assert listening == (2,)
    finally:
        writer.close()
        reader.close()


def test_a_readonly_sqlite_file_from_before_a_table_reads_it_as_empty(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE switches (scope TEXT, route TEXT, variant TEXT, killed INTEGER)")
    store = open_sqlite(path, readonly=True)
    try:
        assert store.canary_states() == {} and store.audit() == [] and not store.switches().global_kill
        assert store.shadow_overrides() == {} and store.ended_sessions() == frozenset()
    finally:
        store.close()


def test_replicas_heartbeat_are_listed_while_alive_and_leave(backend: Backend) -> None:
    one, two = backend.open(), backend.open()
    one.heartbeat(Replica("a", "host-1", 10, 100.0, "v1", "s1", 200.0))
    two.heartbeat(Replica("b", "host-2", 20, 150.0, "v1", "s1", 190.0))
    one.heartbeat(Replica("a", "host-1", 10, 100.0, "v2", "s2", 210.0, ("fmt@2",)))  # the same replica, later
    assert [(r.id, r.policy_version, r.last_seen) for r in two.replicas(since=180.0)] == [
        ("a", "v2", 210.0),
        ("b", "v1", 190.0),
    ]
    assert [(r.id, r.adapters) for r in two.replicas(since=195.0)] == [
        ("a", ("fmt@2",))
    ]  # b is silent since 190
    one.leave("a")
    assert [r.id for r in one.replicas(since=0.0)] == ["b"]
