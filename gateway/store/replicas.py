"""Table `replicas`: one row per running gateway process, refreshed by its heartbeat: where it runs, since when,
the policy version and kill switches it serves now, and the adapter versions its policy references (an engine
unloads none of those: `control.lora`). An operator sees from it whether every replica has
converged on the same state, or which one lags.
"""

from __future__ import annotations

from typing import Final

import orjson

from gateway.store.api import Conn, Replica

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at {real} NOT NULL,
    policy_version TEXT NOT NULL,
    switches TEXT NOT NULL,
    last_seen {real} NOT NULL,
    adapters TEXT NOT NULL DEFAULT '[]'
);
"""
SQLITE: Final = _TABLE.format(real="REAL")
POSTGRES: Final = _TABLE.format(real="DOUBLE PRECISION")
_COLUMNS: Final = "id, host, pid, started_at, policy_version, switches, last_seen, adapters"


def beat(db: Conn, replica: Replica) -> None:
    """Upsert the replica's row; rows silent for an hour (a replica that died without leaving) are dropped."""
    db.execute("DELETE FROM replicas WHERE last_seen < ?", (replica.last_seen - 3600.0,))
    db.execute(
        f"INSERT INTO replicas ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
        " policy_version = excluded.policy_version, switches = excluded.switches, last_seen = excluded.last_seen,"
        " adapters = excluded.adapters",
        (
            replica.id,
            replica.host,
            replica.pid,
            replica.started_at,
            replica.policy_version,
            replica.switches,
            replica.last_seen,
            orjson.dumps(list(replica.adapters)).decode(),
        ),
    )


def remove(db: Conn, replica_id: str) -> None:
    db.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))


def seen_since(db: Conn, since: float) -> list[Replica]:
    """Replicas whose last heartbeat is at or after `since`, in the order they started."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM replicas WHERE last_seen >= ? ORDER BY started_at, id", (since,)
    ).fetchall()
    return [_replica(*row) for row in rows]


def _replica(
    id_: str, host: str, pid: int, started: float, policy: str, switches: str, seen: float, adapters: str
) -> Replica:
    return Replica(id_, host, pid, started, policy, switches, seen, tuple(orjson.loads(adapters)))
