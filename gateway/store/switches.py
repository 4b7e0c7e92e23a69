"""Table `switches`: the kill switches in force, one row per switch ever flipped (its latest state).

A flip is written together with its audit entry by the store (`store.state`); this module owns the SQL: the
schema for each backend, and statements both SQLite and Postgres run (`?` placeholders; see `store.api.Conn`).
"""

from __future__ import annotations

from typing import Final

from gateway.policy import Flip, Switches
from gateway.store.api import Conn

_COLUMNS: Final = """
    scope TEXT NOT NULL,
    route TEXT NOT NULL DEFAULT '',
    variant TEXT NOT NULL DEFAULT '',
    killed INTEGER NOT NULL,
    reason TEXT,
    actor TEXT,
    at {real} NOT NULL,
    PRIMARY KEY (scope, route, variant)
"""
SQLITE: Final = f"CREATE TABLE IF NOT EXISTS switches ({_COLUMNS.format(real='REAL')});"
POSTGRES: Final = f"CREATE TABLE IF NOT EXISTS switches ({_COLUMNS.format(real='DOUBLE PRECISION')});"


def read(db: Conn) -> Switches:
    rows = db.execute("SELECT scope, route, variant FROM switches WHERE killed = 1").fetchall()
    return Switches(
        global_kill=any(scope == "global" for scope, _, _ in rows),
        routes=frozenset(r for scope, r, _ in rows if scope == "route"),
        variants=frozenset((r, v) for scope, r, v in rows if scope == "variant"),
    )


def write(db: Conn, flip: Flip, *, actor: str, reason: str, at: float) -> None:
    db.execute(
        "INSERT INTO switches (scope, route, variant, killed, reason, actor, at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (scope, route, variant) DO UPDATE SET killed = excluded.killed, reason = excluded.reason,"
        " actor = excluded.actor, at = excluded.at",
        (flip.scope, flip.route, flip.variant, int(flip.killed), reason, actor, at),
    )
