"""Table `switches`: the kill switches in force, one row per switch ever flipped (its latest state).

A flip is written together with its audit entry by the store (`store.state`); this module owns the SQL.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from gateway.policy import Flip, Switches

SCHEMA: Final = """
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
"""


def read(db: sqlite3.Connection) -> Switches:
    rows = db.execute("SELECT scope, route, variant FROM switches WHERE killed = 1").fetchall()
    return Switches(
        global_kill=any(scope == "global" for scope, _, _ in rows),
        routes=frozenset(r for scope, r, _ in rows if scope == "route"),
        variants=frozenset((r, v) for scope, r, v in rows if scope == "variant"),
    )


def write(db: sqlite3.Connection, flip: Flip, *, actor: str, reason: str, at: float) -> None:
    db.execute(
        "INSERT OR REPLACE INTO switches VALUES (?, ?, ?, ?, ?, ?, ?)",
        (flip.scope, flip.route, flip.variant, int(flip.killed), reason, actor, at),
    )
