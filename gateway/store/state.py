"""`SqliteStateStore`: the state store (`store.api.StateStore`) on one SQLite file, `store.db`.

Each table's SQL lives in its own module (`switches`, `pins`, `canaries`, `audit`); this class owns the file: the
connection, the lock, and the transactions that write a change together with its audit entry. Several gateway
processes may share the file: each one polls SQLite's `PRAGMA data_version` (a counter that moves when another
connection commits) and reloads when it moves. `readonly=True` opens an existing file for reports, which work
while no gateway runs; a table an older file lacks reads as empty there.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from gateway.canary.machine import CanaryState, Transition
from gateway.policy import Flip, Switches
from gateway.store import audit, canaries, pins, switches
from gateway.store.api import AuditEntry, AuditQuery, Entry, Pins, Served, StoreError
from gateway.store.sqlite import open_db, open_readonly, transaction

T = TypeVar("T")


class _Lost(Exception):
    """Another process changed the canary row first: roll the transaction back."""


class SqliteStateStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, readonly: bool = False) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._readonly = readonly
        if readonly:
            self._db = open_readonly(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            # FULL: a flip is rare and must survive a power cut.
            self._db = open_db(path, synchronous="FULL", busy_timeout_ms=10_000)
            self._db.executescript(switches.SCHEMA + pins.SCHEMA + canaries.SCHEMA + audit.SCHEMA)
        # A second connection, only for `data_version()`: its counter moves when any *other* connection (this
        # process's writer included) commits, and it never waits for `_lock`, so the event loop may poll it.
        self._watch = (
            open_readonly(path)
            if readonly
            else sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._watch.close()

    def data_version(self) -> int:
        return int(self._watch.execute("PRAGMA data_version").fetchone()[0])

    def _read(self, read: Callable[[sqlite3.Connection], T], empty: T) -> T:
        with self._lock:
            try:
                return read(self._db)
            except sqlite3.OperationalError:
                if self._readonly:  # a file from before the table existed
                    return empty
                raise

    @contextmanager
    def _write(self) -> Iterator[tuple[sqlite3.Connection, float]]:
        try:
            with self._lock, transaction(self._db) as db:
                yield db, self._clock()
        except sqlite3.Error as err:
            raise StoreError(str(err)) from err

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

    # -- audit log -----------------------------------------------------------------------------------------

    def record(self, entry: Entry, served: Mapping[tuple[str, str], str] | None = None) -> None:
        with self._write() as (db, at):
            if served is not None:
                pins.note_served(db, served, actor=entry.actor, action=entry.action, at=at)
            audit.insert(db, entry, at=at)

    def audit(self, query: AuditQuery | None = None) -> list[AuditEntry]:
        wanted = query or AuditQuery()
        return self._read(lambda db: audit.select(db, wanted), [])

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
