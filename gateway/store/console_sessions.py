"""Table `console_signouts`: the console sessions ended by signing out, one row per session id, kept until the
session's own expiry (past it the cookie is refused anyway). Every replica reads the ids still in force, so a copy
of a signed-out cookie is refused everywhere; each sign-out deletes the rows past their expiry.
"""

from __future__ import annotations

from typing import Final

from gateway.store.api import Conn

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS console_signouts (
    sid TEXT PRIMARY KEY,
    expires {real} NOT NULL
);
"""
SQLITE: Final = _TABLE.format(real="REAL")
POSTGRES: Final = _TABLE.format(real="DOUBLE PRECISION")


def ended(db: Conn, *, now: float) -> frozenset[str]:
    """The ids of the sessions signed out that have not expired at `now`."""
    return frozenset(
        sid for (sid,) in db.execute("SELECT sid FROM console_signouts WHERE expires > ?", (now,))
    )


def end(db: Conn, sid: str, expires: float, *, now: float) -> None:
    """Record that session `sid` (valid until `expires`) was signed out; forget those expired at `now`."""
    db.execute("DELETE FROM console_signouts WHERE expires <= ?", (now,))
    db.execute(
        "INSERT INTO console_signouts (sid, expires) VALUES (?, ?) ON CONFLICT (sid) DO NOTHING",
        (sid, expires),
    )
