"""Table `audit`: the append-only log of every operator and automatic action (flips, reloads, swaps, canary
decisions, drills), each with who, why, the policy version in force and the numbers behind it (`detail`, JSON).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from gateway.store.api import AuditEntry, AuditQuery, Conn, Entry

_TABLE: Final = """
    id {id},
    at {real} NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    route TEXT,
    variant TEXT,
    reason TEXT,
    policy_version TEXT,
    detail TEXT
"""
_INDEXES: Final = """
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
CREATE INDEX IF NOT EXISTS audit_route ON audit (route, at);
"""
SQLITE: Final = (
    f"CREATE TABLE IF NOT EXISTS audit ({_TABLE.format(id='INTEGER PRIMARY KEY AUTOINCREMENT', real='REAL')});"
    + _INDEXES
)
POSTGRES: Final = (
    f"CREATE TABLE IF NOT EXISTS audit ({_TABLE.format(id='BIGSERIAL PRIMARY KEY', real='DOUBLE PRECISION')});"
    + _INDEXES
)
_COLUMNS: Final = "id, at, actor, action, route, variant, reason, policy_version, detail"


def insert(db: Conn, entry: Entry, *, at: float) -> None:
    db.execute(
        "INSERT INTO audit (at, actor, action, route, variant, reason, policy_version, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            at,
            entry.actor,
            entry.action,
            entry.route or None,
            entry.variant or None,
            entry.reason,
            entry.policy_version,
            orjson.dumps(entry.detail).decode() if entry.detail is not None else None,
        ),
    )


def select(db: Conn, query: AuditQuery) -> list[AuditEntry]:
    sql = f"SELECT {_COLUMNS} FROM audit WHERE 1=1"
    args: list[Any] = []
    if query.route is not None:
        sql += " AND route = ?"
        args.append(query.route)
    if query.since is not None:
        sql += " AND at >= ?"
        args.append(query.since)
    if query.actions:
        sql += " AND (" + " OR ".join("action LIKE ?" for _ in query.actions) + ")"
        args.extend(query.actions)
    sql += " ORDER BY id" if query.oldest_first else " ORDER BY id DESC"
    if query.limit is not None:
        sql += " LIMIT ?"
        args.append(query.limit)
    return [_entry(row) for row in db.execute(sql, args).fetchall()]


def _entry(row: tuple[Any, ...]) -> AuditEntry:
    id_, at, actor, action, route, variant, reason, policy_version, detail = row
    return AuditEntry(
        id_,
        at,
        actor,
        action,
        route,
        variant,
        reason,
        policy_version,
        orjson.loads(detail) if detail else None,
    )
