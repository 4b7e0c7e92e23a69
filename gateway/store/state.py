"""Operator state that must survive a restart: kill switches and the audit log, in one SQLite file.

A switch flip and its audit entry are written in one transaction, so there is never a flip without its entry (nor
an entry for a flip that did not happen). Several gateway processes may share the file: each one polls SQLite's
`PRAGMA data_version` (a counter that moves when another connection commits) and reloads the switches when it
moves. The methods are synchronous and thread-safe; the async callers run them with `asyncio.to_thread`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from gateway.policy import Switches

Scope = Literal["global", "route", "variant"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS switches (
    scope TEXT NOT NULL,
    route TEXT NOT NULL DEFAULT '',
    variant TEXT NOT NULL DEFAULT '',
    killed INTEGER NOT NULL,
    reason TEXT,
    actor TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (scope, route, variant)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    route TEXT,
    variant TEXT,
    reason TEXT,
    policy_version TEXT,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS adapter_pins (
    route TEXT NOT NULL,
    variant TEXT NOT NULL,
    ref TEXT NOT NULL,
    PRIMARY KEY (route, variant)
);
CREATE TABLE IF NOT EXISTS adapter_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    route TEXT NOT NULL,
    variant TEXT NOT NULL,
    ref TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS canaries (
    route TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    step_started_at REAL NOT NULL,
    epoch REAL NOT NULL,
    started_at REAL NOT NULL,
    revision INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_route ON audit (route, at);
"""


@dataclass(frozen=True, slots=True)
class Flip:
    scope: Scope
    killed: bool
    route: str = ""
    variant: str = ""

    @property
    def action(self) -> str:
        verb = "kill" if self.killed else "revive"
        return {"global": f"{verb}_all", "route": f"{verb}_route", "variant": f"{verb}_variant"}[self.scope]


def apply_flip(switches: Switches, flip: Flip) -> Switches:
    """The switches after `flip` (pure; used to check a flip before it is written)."""
    if flip.scope == "global":
        return Switches(flip.killed, switches.routes, switches.variants)
    if flip.scope == "route":
        routes = switches.routes | {flip.route} if flip.killed else switches.routes - {flip.route}
        return Switches(switches.global_kill, routes, switches.variants)
    key = (flip.route, flip.variant)
    variants = switches.variants | {key} if flip.killed else switches.variants - {key}
    return Switches(switches.global_kill, switches.routes, variants)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    route: str | None
    variant: str | None
    reason: str | None
    policy_version: str | None
    detail: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


class StateStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a flip is rare and must survive a power cut
        self._db.executescript(_SCHEMA)
        # A second connection, only for `data_version()`: its counter moves when any *other* connection (this
        # process's writer included) commits, and it never waits for `_lock`, so the event loop may poll it.
        self._watch = sqlite3.connect(path, check_same_thread=False, isolation_level=None)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._watch.close()

    def switches(self) -> Switches:
        with self._lock:
            rows = self._db.execute("SELECT scope, route, variant FROM switches WHERE killed = 1").fetchall()
        return Switches(
            global_kill=any(scope == "global" for scope, _, _ in rows),
            routes=frozenset(r for scope, r, _ in rows if scope == "route"),
            variants=frozenset((r, v) for scope, r, v in rows if scope == "variant"),
        )

    def data_version(self) -> int:
        """Cheap (a few µs, no lock, no disk read when nothing changed): poll it, then reload on a change."""
        return int(self._watch.execute("PRAGMA data_version").fetchone()[0])

    def apply(self, flip: Flip, *, actor: str, reason: str, policy_version: str | None) -> Switches:
        """Write the flip and its audit entry in one transaction; return the switches now in force."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO switches VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (flip.scope, flip.route, flip.variant, int(flip.killed), reason, actor, now),
                )
                self._insert_audit(
                    now, actor, flip.action, flip.route, flip.variant, reason, policy_version, None
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.switches()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One write transaction for another module's rows (the canary's), switch flips and audit entries: they
        commit together or not at all. Raise inside the block to roll back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(self, self._db, self._clock())
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # -- adapter versions served per variant (swap / rollback) ------------------------------------------------

    def pins(self) -> dict[tuple[str, str], str]:
        """Operator overrides of a variant's adapter version, on top of the policy files."""
        with self._lock:
            rows = self._db.execute("SELECT route, variant, ref FROM adapter_pins").fetchall()
        return {(r, v): ref for r, v, ref in rows}

    def pin(
        self,
        route: str,
        variant: str,
        ref: str | None,
        *,
        action: str,
        actor: str,
        reason: str,
        policy_version: str,
    ) -> dict[tuple[str, str], str]:
        """Pin (or, with ref None, unpin) a variant's adapter version; with its audit entry, in one transaction."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if ref is None:
                    self._db.execute(
                        "DELETE FROM adapter_pins WHERE route = ? AND variant = ?", (route, variant)
                    )
                else:
                    self._db.execute(
                        "INSERT OR REPLACE INTO adapter_pins VALUES (?, ?, ?)", (route, variant, ref)
                    )
                self._insert_audit(
                    now, actor, action, route, variant, reason, policy_version, {"adapter": ref}
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.pins()

    def note_served(self, served: dict[tuple[str, str], str], *, actor: str, action: str) -> None:
        """Append to each variant's history the adapter version it now serves, when that changed."""
        now = self._clock()
        with self._lock:
            _note_served(self._db, now, served, actor=actor, action=action)

    def history(self, route: str, variant: str) -> list[tuple[float, str, str, str]]:
        """(at, ref, actor, action), newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, ref, actor, action FROM adapter_history WHERE route = ? AND variant = ? ORDER BY id DESC",
                (route, variant),
            ).fetchall()
        return [(float(at), str(ref), str(actor), str(action)) for at, ref, actor, action in rows]

    def record(
        self,
        action: str,
        *,
        actor: str,
        reason: str | None = None,
        route: str | None = None,
        variant: str | None = None,
        policy_version: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an audit entry for an action that is not a switch flip (reload, drill, ...)."""
        with self._lock:
            self._insert_audit(self._clock(), actor, action, route, variant, reason, policy_version, detail)

    def _insert_audit(
        self,
        at: float,
        actor: str,
        action: str,
        route: str | None,
        variant: str | None,
        reason: str | None,
        policy_version: str | None,
        detail: dict[str, Any] | None,
    ) -> None:
        self._db.execute(
            "INSERT INTO audit (at, actor, action, route, variant, reason, policy_version, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                at,
                actor,
                action,
                route or None,
                variant or None,
                reason,
                policy_version,
                orjson.dumps(detail).decode() if detail is not None else None,
            ),
        )

    def audit(
        self, *, limit: int = 100, route: str | None = None, since: float | None = None
    ) -> list[AuditEntry]:
        """Newest first."""
        sql = "SELECT id, at, actor, action, route, variant, reason, policy_version, detail FROM audit WHERE 1=1"
        args: list[Any] = []
        if route is not None:
            sql += " AND route = ?"
            args.append(route)
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            AuditEntry(
                id=row[0],
                at=row[1],
                actor=row[2],
                action=row[3],
                route=row[4],
                variant=row[5],
                reason=row[6],
                policy_version=row[7],
                detail=orjson.loads(row[8]) if row[8] else None,
            )
            for row in rows
        ]


@dataclass(frozen=True, slots=True)
class Transaction:
    """What may be written inside `StateStore.transaction()`; `at` is the transaction's time."""

    store: StateStore
    db: sqlite3.Connection
    at: float

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    def flip(self, flip: Flip, *, actor: str, reason: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO switches VALUES (?, ?, ?, ?, ?, ?, ?)",
            (flip.scope, flip.route, flip.variant, int(flip.killed), reason, actor, self.at),
        )

    def note_served(self, served: dict[tuple[str, str], str], *, actor: str, action: str) -> None:
        _note_served(self.db, self.at, served, actor=actor, action=action)

    def audit(
        self,
        action: str,
        *,
        actor: str,
        route: str | None = None,
        variant: str | None = None,
        reason: str | None = None,
        policy_version: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.store._insert_audit(self.at, actor, action, route, variant, reason, policy_version, detail)


def _note_served(
    db: sqlite3.Connection, at: float, served: dict[tuple[str, str], str], *, actor: str, action: str
) -> None:
    for (route, variant), ref in sorted(served.items()):
        last = db.execute(
            "SELECT ref FROM adapter_history WHERE route = ? AND variant = ? ORDER BY id DESC LIMIT 1",
            (route, variant),
        ).fetchone()
        if last is None or last[0] != ref:
            db.execute(
                "INSERT INTO adapter_history (at, route, variant, ref, actor, action) VALUES (?, ?, ?, ?, ?, ?)",
                (at, route, variant, ref, actor, action),
            )
