"""Postgres, the shared backend for gateway replicas on several hosts (`GATEWAY_DATABASE_URL=postgresql://…`).

`PostgresDatabase` is the state store's `Database` on a connection pool (psycopg 3). The table modules' statements
use `?` placeholders, which `_Conn` turns into psycopg's `%s`. `migrate` applies the versioned schema at start-up
under an advisory lock, so of several replicas starting together exactly one applies each step.

Change notification: every write transaction also sends `NOTIFY gateway_state` (delivered at commit, to every
replica). A listener thread holds a `LISTEN` connection and moves `data_version()` on each notification; it also
moves it every `poll_s` whatever happens, the safety net for a notification lost with a cut connection, so a
replica is never on stale state for longer than that. A cut `LISTEN` connection is reopened with backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Final

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from gateway.store.api import Cursor, MissingTable, StoreError

log = logging.getLogger(__name__)
CHANNEL: Final = "gateway_state"
_MIGRATION_LOCK: Final = 0x6761_7465_7761_7900  # pg_advisory_xact_lock key: "gateway" in ASCII
_MAX_BACKOFF_S: Final = 5.0
# How long a read or write waits for a connection: past it the database is away, and the caller is told so
# (an operator's change gets 503 at once rather than after the pool's default 30 s).
_WAIT_S: Final = 3.0


@lru_cache(maxsize=256)
def _dialect(sql: str) -> str:
    """`?` placeholders to psycopg's `%s` (the statements hold no literal `?` or `%`)."""
    return sql.replace("?", "%s")


class _Conn:
    """A psycopg connection seen as `store.api.Conn`."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        return self._conn.execute(_dialect(sql), params)


def migrate(url: str, component: str, steps: Sequence[Sequence[str]]) -> int:
    """Bring `component`'s tables to the newest version (blocking); the version it had before. `StoreError` when
    the database cannot be reached or refuses a step."""
    try:
        return _migrate(url, component, steps)
    except psycopg.Error as err:
        raise StoreError(str(err).strip()) from err


def _migrate(url: str, component: str, steps: Sequence[Sequence[str]]) -> int:
    with psycopg.connect(url, connect_timeout=10) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        row = conn.execute(
            "SELECT version FROM schema_versions WHERE component = %s", (component,)
        ).fetchone()
        before = int(row[0]) if row else 0
        for step in steps[before:]:
            for statement in step:
                conn.execute(statement.encode())  # no parameters: several statements run at once
        conn.execute(
            "INSERT INTO schema_versions (component, version) VALUES (%s, %s)"
            " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
            (component, max(before, len(steps))),
        )
    return before


class PostgresDatabase:
    def __init__(
        self, url: str, *, poll_s: float = 1.0, max_connections: int = 4, listen: bool = True
    ) -> None:
        self._url = url
        self._poll_s = poll_s
        self._pool = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, name="gateway-state"
        )
        try:
            self._pool.open(wait=True, timeout=10.0)
        except PoolTimeout as err:
            raise StoreError(f"cannot connect to the state database: {err}") from err
        self._version = 0
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="state-listener", daemon=True)
        if listen:
            self._listener.start()

    def close(self) -> None:
        self._stop.set()
        if self._listener.is_alive():
            self._listener.join(timeout=self._poll_s + 5.0)
        self._pool.close()

    def data_version(self) -> int:
        return self._version

    @contextmanager
    def reading(self) -> Iterator[_Conn]:
        try:
            with self._pool.connection(timeout=_WAIT_S) as conn:
                yield _Conn(conn)
        except psycopg.errors.UndefinedTable as err:
            raise MissingTable(str(err)) from err
        except psycopg.Error as err:
            raise StoreError(str(err)) from err

    @contextmanager
    def writing(self, *, notify: bool = True) -> Iterator[_Conn]:
        try:
            with self._pool.connection(timeout=_WAIT_S) as conn, conn.transaction():
                yield _Conn(conn)
                if notify:
                    conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        except psycopg.Error as err:
            raise StoreError(str(err)) from err

    # -- the listener thread -----------------------------------------------------------------------------------

    def _listen(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._version += 1  # notifications may have been missed while it was not listening
                    attempt = 0
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=self._poll_s, stop_after=1):
                            pass
                        self._version += 1  # a notification, or the poll: either way the replica re-reads
            except psycopg.Error:
                log.warning("state listener: the LISTEN connection failed; reconnecting", exc_info=True)
                self._version += 1
                attempt += 1
                self._stop.wait(min(_MAX_BACKOFF_S, 0.05 * 2**attempt))
