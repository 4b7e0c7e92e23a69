"""`TableStore`: the state store (`store.api.StateStore`) on a `Database`, SQLite's file or a shared Postgres.

Each table's SQL lives in its own module (`switches`, `pins`, `canaries`, `shadow_overrides`, `console_sessions`,
`audit`), in the dialect both backends share; this class composes them: every change to what is served is one write
transaction with its audit entry. `open_sqlite` and `open_postgres` build it on each backend with the schema of
every table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from gateway.canary.machine import CanaryState, Transition
from gateway.policy import Flip, Switches
from gateway.shadow.overrides import ShadowOverride
from gateway.store import audit, canaries, console_sessions, pins, replicas, shadow_overrides, switches
from gateway.store.api import (
    AuditEntry,
    AuditQuery,
    Conn,
    Database,
    Entry,
    MissingTable,
    Pins,
    Replica,
    Served,
    ShadowOverrides,
)
from gateway.store.sqlite import SqliteDatabase

T = TypeVar("T")
SQLITE_SCHEMA = (
    switches.SQLITE
    + pins.SQLITE
    + canaries.SQLITE
    + audit.SQLITE
    + replicas.SQLITE
    + shadow_overrides.SQLITE
    + console_sessions.SQLITE
)
# Postgres migrations: step i takes a database from version i to i + 1; append, never edit a released step.
POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (switches.POSTGRES, pins.POSTGRES, canaries.POSTGRES, audit.POSTGRES),
    (replicas.POSTGRES,),
    (shadow_overrides.POSTGRES,),
    (console_sessions.POSTGRES,),
)


class _Lost(Exception):
    """Another process changed the canary row first: roll the transaction back."""


def open_sqlite(path: Path, *, readonly: bool = False, clock: Callable[[], float] = time.time) -> TableStore:
    return TableStore(SqliteDatabase(path, schema=SQLITE_SCHEMA, readonly=readonly), clock=clock)


def open_postgres(
    url: str, *, poll_s: float = 1.0, readonly: bool = False, clock: Callable[[], float] = time.time
) -> TableStore:
    """The state tables in a Postgres database shared by every replica (migrated first, by one replica).
    `readonly=True` (reports): no migration and no listener; a table not there yet reads as empty."""
    from gateway.store.postgres import PostgresDatabase, migrate  # psycopg only where Postgres is used

    if not readonly:
        migrate(url, "state", POSTGRES_MIGRATIONS)
    return TableStore(PostgresDatabase(url, poll_s=poll_s, listen=not readonly), clock=clock)


class TableStore:
    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        return self._db.data_version()

    def _read(self, read: Callable[[Conn], T], empty: T) -> T:
        try:
            with self._db.reading() as db:
                return read(db)
        except MissingTable:
            return empty

    @contextmanager
    def _write(self, *, notify: bool = True) -> Iterator[tuple[Conn, float]]:
        with self._db.writing(notify=notify) as db:
            yield db, self._clock()

    # -- kill switches -------------------------------------------------------------------------------------

    def switches(self) -> Switches:
        return self._read(switches.read, Switches())

    def flip(self, flip: Flip, entry: Entry) -> Switches:
        with self._write() as (db, at):
            switches.write(db, flip, actor=entry.actor, reason=entry.reason or "", at=at)
            audit.insert(db, entry, at=at)
        return self.switches()

    # -- adapter versions ----------------------------------------------------------------------------------

    def pins(self) -> Pins:
        return self._read(pins.read, {})

    def pin(
        self, route: str, variant: str, ref: str | None, entry: Entry, served: Mapping[tuple[str, str], str]
    ) -> Pins:
        with self._write() as (db, at):
            pins.write(db, route, variant, ref)
            audit.insert(db, entry, at=at)
            pins.note_served(
                db, served, actor=entry.actor, action=entry.action.removeprefix("adapter_"), at=at
            )
        return self.pins()

    def note_served(self, served: Mapping[tuple[str, str], str], *, actor: str, action: str) -> None:
        with self._write() as (db, at):
            pins.note_served(db, served, actor=actor, action=action, at=at)

    def history(self, route: str, variant: str) -> list[Served]:
        return self._read(lambda db: pins.history(db, route, variant), [])

    # -- shadow overrides ----------------------------------------------------------------------------------

    def shadow_overrides(self) -> ShadowOverrides:
        return self._read(shadow_overrides.read, {})

    def set_shadow_override(
        self, route: str, override: ShadowOverride | None, entry: Entry
    ) -> ShadowOverrides:
        with self._write() as (db, at):
            shadow_overrides.write(db, route, override, at=at)
            audit.insert(db, entry, at=at)
        return self.shadow_overrides()

    # -- console sessions signed out ------------------------------------------------------------------------

    def ended_sessions(self) -> frozenset[str]:
        return self._read(lambda db: console_sessions.ended(db, now=self._clock()), frozenset())

    def end_session(self, sid: str, expires: float) -> frozenset[str]:
        with self._write() as (db, at):
            console_sessions.end(db, sid, expires, now=at)
            return console_sessions.ended(db, now=at)

    # -- audit log -----------------------------------------------------------------------------------------

    def record(self, entry: Entry, served: Mapping[tuple[str, str], str] | None = None) -> None:
        with self._write() as (db, at):
            if served is not None:
                pins.note_served(db, served, actor=entry.actor, action=entry.action, at=at)
            audit.insert(db, entry, at=at)

    def audit(self, query: AuditQuery | None = None) -> list[AuditEntry]:
        wanted = query or AuditQuery()
        return self._read(lambda db: audit.select(db, wanted), [])

    # -- replicas ------------------------------------------------------------------------------------------

    def heartbeat(self, replica: Replica) -> None:
        with self._write(notify=False) as (db, _):
            replicas.beat(db, replica)

    def replicas(self, since: float) -> list[Replica]:
        return self._read(lambda db: replicas.seen_since(db, since), [])

    def leave(self, replica_id: str) -> None:
        with self._write(notify=False) as (db, _):
            replicas.remove(db, replica_id)

    # -- canaries ------------------------------------------------------------------------------------------

    def canary_states(self) -> dict[str, CanaryState]:
        return self._read(canaries.read, {})

    def start_canary(self, new: CanaryState, previous: CanaryState | None, entry: Entry) -> bool:
        try:
            with self._write() as (db, at):
                written = (
                    canaries.insert(db, new, at=at)
                    if previous is None
                    else canaries.replace(db, new, previous, at=at)
                )
                if not written:
                    raise _Lost
                audit.insert(db, entry, at=at)
        except _Lost:
            return False
        return True

    def move_canary(self, before: CanaryState, move: Transition, candidate: str, entry: Entry) -> bool:
        try:
            with self._write() as (db, at):
                if not canaries.replace(db, move.state, before, at=at):
                    raise _Lost
                if move.kill:
                    flip = Flip("variant", True, before.route, candidate)
                    switches.write(db, flip, actor=entry.actor, reason=move.reason, at=at)
                audit.insert(db, entry, at=at)
        except _Lost:
            return False
        return True
