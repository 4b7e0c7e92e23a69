"""Table `canaries`: one row per route's canary (its key, status, step and when they began), written by
compare-and-set.

The row carries a `revision`: a write names the revision it was decided from and changes nothing when another
gateway process moved the canary first, so several processes sharing the database decide each step once. The
store writes a transition together with its audit entry (and the candidate's kill switch when it is a kill).
"""

from __future__ import annotations

from typing import Any, Final

from gateway.canary.machine import CanaryState
from gateway.store.api import Conn

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS canaries (
    route TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    step_started_at {real} NOT NULL,
    epoch {real} NOT NULL,
    started_at {real} NOT NULL,
    revision INTEGER NOT NULL,
    updated_at {real} NOT NULL
);
"""
SQLITE: Final = _TABLE.format(real="REAL")
POSTGRES: Final = _TABLE.format(real="DOUBLE PRECISION")
_COLUMNS: Final = "route, key, status, step, step_started_at, epoch, started_at, revision"


def read(db: Conn) -> dict[str, CanaryState]:
    return {row[0]: CanaryState(*row) for row in db.execute(f"SELECT {_COLUMNS} FROM canaries")}


def insert(db: Conn, new: CanaryState, *, at: float) -> bool:
    """A route's first canary row; False (nothing written) when another process wrote one first."""
    cursor = db.execute(
        f"INSERT INTO canaries ({_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (route) DO NOTHING",
        (*_values(new), at),
    )
    return cursor.rowcount == 1


def replace(db: Conn, new: CanaryState, previous: CanaryState, *, at: float) -> bool:
    """Write `new` if the row is still `previous`; False (nothing written) when another process moved it."""
    cursor = db.execute(
        "UPDATE canaries SET key = ?, status = ?, step = ?, step_started_at = ?, epoch = ?, started_at = ?,"
        " revision = ?, updated_at = ? WHERE route = ? AND key = ? AND revision = ?",
        (*_values(new)[1:], at, previous.route, previous.key, previous.revision),
    )
    return cursor.rowcount == 1


def _values(s: CanaryState) -> tuple[Any, ...]:
    return (s.route, s.key, s.status, s.step, s.step_started_at, s.epoch, s.started_at, s.revision)
