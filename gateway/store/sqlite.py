"""What every SQLite table module shares: opening a file with the gateway's pragmas, and the one write
transaction.

`transaction` is `BEGIN IMMEDIATE … COMMIT`, rolled back on any exception. IMMEDIATE takes the write lock at
BEGIN, where `busy_timeout` applies; a deferred transaction that upgrades later can fail at once with
SQLITE_BUSY under WAL. Several gateway processes may share a file: it is opened in WAL mode with a busy timeout.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Literal

Sync = Literal["NORMAL", "FULL"]


def open_db(path: Path, *, synchronous: Sync, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread (callers lock)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection: a mistyped path raises instead of creating an empty database."""
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(open_readonly(path)) as conn:
        yield conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: commits when the block ends, rolls back when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (e.g. SQLITE_FULL)
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
