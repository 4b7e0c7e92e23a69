"""Table `shadow_overrides`: the operators' runtime overrides of routes' `[shadow]` (`shadow.overrides`), one row
per route: started (`mode` 'start', the variant and the share asked for, NULL for the default) or stopped. Clearing
an override deletes its row. The store writes each change together with its audit entry.
"""

from __future__ import annotations

from typing import Final

from gateway.shadow.overrides import ShadowOverride
from gateway.store.api import Conn

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS shadow_overrides (
    route TEXT PRIMARY KEY,
    mode TEXT NOT NULL,
    variant TEXT NOT NULL,
    share {real},
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    at {real} NOT NULL
);
"""
SQLITE: Final = _TABLE.format(real="REAL")
POSTGRES: Final = _TABLE.format(real="DOUBLE PRECISION")


def read(db: Conn) -> dict[str, ShadowOverride]:
    rows = db.execute(
        "SELECT route, mode, variant, share, actor, reason, at FROM shadow_overrides ORDER BY route"
    ).fetchall()
    return {
        route: ShadowOverride(
            route, mode, variant, None if share is None else float(share), actor, reason, at
        )
        for route, mode, variant, share, actor, reason, at in rows
    }


def write(db: Conn, route: str, override: ShadowOverride | None, *, at: float) -> None:
    """Set the route's override (its time is `at`, the transaction's), or with None remove it."""
    if override is None:
        db.execute("DELETE FROM shadow_overrides WHERE route = ?", (route,))
        return
    db.execute(
        "INSERT INTO shadow_overrides (route, mode, variant, share, actor, reason, at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (route) DO UPDATE SET mode = excluded.mode, variant = excluded.variant,"
        " share = excluded.share, actor = excluded.actor, reason = excluded.reason, at = excluded.at",
        (route, override.mode, override.variant, override.share, override.actor, override.reason, at),
    )
