"""Tables `adapter_pins` and `adapter_history`: operators' overrides of the adapter version a variant serves
(swap, rollback; on top of the policy files), and every version each variant has served, newest last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gateway.store.api import Conn, Pins, Served

_TABLES: Final = """
CREATE TABLE IF NOT EXISTS adapter_pins (
    route TEXT NOT NULL,
    variant TEXT NOT NULL,
    ref TEXT NOT NULL,
    PRIMARY KEY (route, variant)
);
CREATE TABLE IF NOT EXISTS adapter_history (
    id {id},
    at {real} NOT NULL,
    route TEXT NOT NULL,
    variant TEXT NOT NULL,
    ref TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL
);
"""
SQLITE: Final = _TABLES.format(id="INTEGER PRIMARY KEY AUTOINCREMENT", real="REAL")
POSTGRES: Final = _TABLES.format(id="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION")


def read(db: Conn) -> Pins:
    rows = db.execute("SELECT route, variant, ref FROM adapter_pins").fetchall()
    return {(r, v): ref for r, v, ref in rows}


def write(db: Conn, route: str, variant: str, ref: str | None) -> None:
    """Pin a version, or with `ref` None remove the pin (the policy file's version applies again)."""
    if ref is None:
        db.execute("DELETE FROM adapter_pins WHERE route = ? AND variant = ?", (route, variant))
    else:
        db.execute(
            "INSERT INTO adapter_pins (route, variant, ref) VALUES (?, ?, ?)"
            " ON CONFLICT (route, variant) DO UPDATE SET ref = excluded.ref",
            (route, variant, ref),
        )


def note_served(
    db: Conn, served: Mapping[tuple[str, str], str], *, actor: str, action: str, at: float
) -> None:
    """Append to each variant's history the version it serves now, when that changed."""
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


def history(db: Conn, route: str, variant: str) -> list[Served]:
    """Newest first."""
    rows = db.execute(
        "SELECT at, ref, actor, action FROM adapter_history WHERE route = ? AND variant = ? ORDER BY id DESC",
        (route, variant),
    ).fetchall()
    return [(float(at), str(ref), str(actor), str(action)) for at, ref, actor, action in rows]
