"""SQLite, the embedded backend: opening a file with the gateway's pragmas, the one write transaction, and
`SqliteDatabase` (the state store's `Database` on one file).

`transaction` is `BEGIN IMMEDIATE … COMMIT`, rolled back on any exception. IMMEDIATE takes the write lock at
BEGIN, where `busy_timeout` applies; a deferred transaction that upgrades later can fail at once with
SQLITE_BUSY under WAL. Several gateway processes may share a file: it is opened in WAL mode with a busy timeout.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Literal

from gateway.store.api import MissingTable, StoreError

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


class SqliteDatabase:
    """`store.api.Database` on one SQLite file, shared by the processes of one host through its directory.

    One connection behind a lock serves reads and writes (operator state is small and rarely written). A second
    connection only answers `data_version()`: SQLite's `PRAGMA data_version` moves when any *other* connection
    (this process's writer included) commits, and it never waits for the lock, so the event loop may poll it.
    `readonly=True` opens an existing file for reports (they work while no gateway runs).
    """

    def __init__(self, path: Path, *, schema: str, readonly: bool = False) -> None:
        self._lock = threading.Lock()
        self._readonly = readonly
        if readonly:
            self._db = open_readonly(path)
            self._watch = open_readonly(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            # FULL: a flip is rare and must survive a power cut.
            self._db = open_db(path, synchronous="FULL", busy_timeout_ms=10_000)
            self._db.executescript(schema)
            self._watch = sqlite3.connect(path, check_same_thread=False, isolation_level=None)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._watch.close()

    def data_version(self) -> int:
        return int(self._watch.execute("PRAGMA data_version").fetchone()[0])

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.OperationalError as err:
                if self._readonly and "no such table" in str(err):
                    raise MissingTable(str(err)) from err
                raise

    @contextmanager
    def writing(self, *, notify: bool = True) -> Iterator[sqlite3.Connection]:
        # `notify` has no switch here: any commit moves the other processes' `data_version`.
        try:
            with self._lock, transaction(self._db) as db:
                yield db
        except sqlite3.Error as err:
            raise StoreError(str(err)) from err
