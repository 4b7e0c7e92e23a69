"""The request log: table `records` in its own SQLite file, one row per request (`records.Record`).

Owns the table's schema (versioned with `PRAGMA user_version`), `RecordWriter` (which keeps SQLite off the request
path: `submit()` only appends to a queue, and a dedicated thread with its own connection writes batches) and every
read of the table: `read_records()` for reports and the lineage answer, `Tail` for the canary controller's
incremental reads. Several gateway processes may share one log file: it is opened in WAL mode with a busy timeout,
and each write transaction takes the write lock up front.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Final

from gateway.records import FIELDS, Record
from gateway.store.sqlite import open_db, open_readonly, reading, transaction

_log = logging.getLogger(__name__)


# --- schema -------------------------------------------------------------------------------------------------

_as_row = operator.attrgetter(*FIELDS)  # one C call per record, much cheaper than dataclasses.astuple


def _sql_type(annotation: object) -> str:
    text = str(annotation)
    if text.startswith(("bool", "int")):
        return "INTEGER"
    return "REAL" if text.startswith("float") else "TEXT"


# Fields added after the first schema version: each is added by its own step below, so the first step must not
# create them (a new file runs every step).
_ADDED_LATER: Final = frozenset({"forced", "bucket", "engine_url"})
_COLUMNS: Final = ",\n  ".join(
    f"{f.name} {_sql_type(f.type)}" for f in dataclasses.fields(Record) if f.name not in _ADDED_LATER
)

# _MIGRATIONS[i] takes a file from user_version i to i + 1. Later versions append statements here (for example
# `ALTER TABLE records ADD COLUMN ...`); never edit an entry once released.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        f"CREATE TABLE IF NOT EXISTS records (\n  {_COLUMNS}\n)",
        "CREATE INDEX IF NOT EXISTS records_route_ts ON records (route, ts)",
        "CREATE INDEX IF NOT EXISTS records_ts ON records (ts)",
    ),
    (
        "ALTER TABLE records ADD COLUMN forced INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE records ADD COLUMN bucket REAL",
    ),
    ("ALTER TABLE records ADD COLUMN engine_url TEXT",),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)
_INSERT: Final = f"INSERT INTO records ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
# Rows per multi-row INSERT: within SQLite's default limit of 32,766 bound variables.
_ROWS_PER_STATEMENT: Final = 200


@functools.lru_cache(maxsize=8)
def _insert_many(n: int) -> str:
    one = f"({', '.join('?' * len(FIELDS))})"
    return f"INSERT INTO records ({', '.join(FIELDS)}) VALUES {', '.join([one] * n)}"


def connect(path: Path, *, busy_timeout_ms: int = 5000) -> sqlite3.Connection:
    """Open the request log for writing, creating or upgrading its schema (idempotent, multi-process safe)."""
    # NORMAL under WAL: a power loss may lose the last commits but never corrupts the file (SQLite docs).
    conn = open_db(path, synchronous="NORMAL", busy_timeout_ms=busy_timeout_ms)
    try:
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    with transaction(conn):
        # Re-read the version inside the write lock: another process may have migrated meanwhile.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for step in _MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# --- writer -------------------------------------------------------------------------------------------------

_STOP: Final = object()
# Errors that come from the rows themselves: retrying the same rows cannot help, so they are isolated.
_DATA_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
)
_MAX_BACKOFF_S: Final = 5.0


class RecordWriter:
    """Writes records to the SQLite request log from a dedicated thread, in batches.

    `submit()` is the only call on the request path: it appends to a `queue.SimpleQueue` (about a
    microsecond) and wakes nobody. The writer thread drains the queue every `interval_s`, `batch` rows at most
    per transaction.
    A failed write (database locked, disk full) is logged and retried with backoff, keeping the rows; a row
    that SQLite rejects by itself (a value it cannot bind) is logged with its content and counted in `failed`.
    """

    def __init__(
        self, path: Path, *, batch: int = 512, interval_s: float = 0.2, busy_timeout_ms: int = 5000
    ) -> None:
        self.path = Path(path)
        self._batch = max(1, batch)
        self._interval_s = interval_s
        self._busy_timeout_ms = busy_timeout_ms
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Orders submit() against close(): every record is either queued before the stop marker or written
        # by the late path, never left behind in a queue nobody drains.
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by flush() and close(): the writer stops sleeping
        self._closed = False
        self._thread: threading.Thread | None = None
        self._inflight = 0  # rows taken off the queue, not yet committed (written by the writer thread only)
        self.written = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        """Rows submitted but not yet on disk (exact once `flush()` returns; approximate while writing)."""
        return self._queue.qsize() + self._inflight

    def start(self) -> None:
        """Open the file (creating the schema) and start the writer thread; a bad path raises here."""
        if self._closed:
            raise RuntimeError("RecordWriter.start() after close()")
        if self._thread is None:
            self._start_thread()

    def _start_thread(self) -> None:
        conn = connect(self.path, busy_timeout_ms=self._busy_timeout_ms)
        # daemon: a writer stuck retrying a broken disk must not hang interpreter exit after close() gave up.
        self._thread = threading.Thread(target=self._run, args=(conn,), name="record-writer", daemon=True)
        self._thread.start()

    def submit(self, record: Record) -> None:
        """Queue one record for writing. Never blocks on I/O unless the writer is already closed."""
        with self._lock:
            if not self._closed:
                self._queue.put(record)
                if self._queue.qsize() >= self._batch:  # a full batch is written without waiting
                    self._wake.set()
                return
        self._write_late(record)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is on disk; False if `timeout` passed first."""
        if self._closed:
            return self.pending == 0
        if self._thread is None:
            raise RuntimeError("RecordWriter.flush() before start()")
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        # Wait in slices so a writer thread that died (a bug, not an I/O error) raises instead of hanging.
        while not done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return False
            if not self._thread.is_alive():
                raise RuntimeError("record writer thread is not running")
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Write everything still queued, then stop the thread. Idempotent.

        `timeout` bounds the wait when the disk keeps failing; the rows left are then reported in the log.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
            self._wake.set()
        if self._thread is None:  # closed without start: start only to write what was queued
            self._start_thread()
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            _log.error(
                "record writer: close timed out with %d records not written to %s", self.pending, self.path
            )

    # --- writer thread ------------------------------------------------------------------------------------

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                rows, marker = self._collect()
                self._write(conn, rows)
                if isinstance(marker, threading.Event):
                    marker.set()
                elif marker is _STOP:
                    return
        finally:
            conn.close()

    def _collect(self) -> tuple[list[tuple[Any, ...]], object]:
        """Take up to a batch of rows, after sleeping up to `interval_s` while less than a batch is queued.

        The thread sleeps rather than blocking on the queue, so a request's `submit()` never wakes it: a
        wake-up per record cost the request path measurably (GIL hand-offs; overhead benchmark). `flush()` and
        `close()` wake it through `_wake`.
        """
        if self._queue.qsize() < self._batch:
            self._wake.wait(self._interval_s)
            self._wake.clear()
        rows: list[tuple[Any, ...]] = []
        while len(rows) < self._batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return rows, None
            if not isinstance(item, Record):
                return rows, item
            rows.append(_as_row(item))
            self._inflight += 1
        return rows, None

    def _write(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        attempt = 0
        while rows:
            try:
                self._insert(conn, rows)
                return
            except _DATA_ERRORS:
                self._isolate(conn, rows)
                return
            except sqlite3.Error:
                delay = min(_MAX_BACKOFF_S, 0.05 * 2**attempt)
                _log.exception(
                    "record writer: writing %d rows to %s failed; retrying in %.2fs",
                    len(rows),
                    self.path,
                    delay,
                )
                attempt += 1
                time.sleep(delay)

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        # One statement per up to 200 rows, not `executemany`: sqlite3 releases and retakes the GIL around
        # every statement step, and with the event loop busy each retake waits out the interpreter's switch
        # interval. Per row, that made the writer thread cost the request path ~160 µs (overhead benchmark);
        # per 200 rows it is noise.
        with transaction(conn):
            for i in range(0, len(rows), _ROWS_PER_STATEMENT):
                part = rows[i : i + _ROWS_PER_STATEMENT]
                conn.execute(_insert_many(len(part)), [value for row in part for value in row])
        self.written += len(rows)
        self._inflight -= len(rows)

    def _isolate(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        # SQLite rejected some row's values: write the rows one by one so the others are still stored.
        if len(rows) > 1:
            for row in rows:
                self._write(conn, [row])
            return
        _log.error("record writer: SQLite rejected a record; it is not stored: %r", rows[0], exc_info=True)
        self.failed += 1
        self._inflight -= 1

    def _write_late(self, record: Record) -> None:
        # A request that finished after close(): written on the caller's thread, once, without the retry
        # loop, so a broken disk during shutdown cannot hang the caller. It only happens while shutting down.
        _log.warning("record writer: %s submitted after close; writing it synchronously", record.request_id)
        row = _as_row(record)
        try:
            with (
                closing(connect(self.path, busy_timeout_ms=self._busy_timeout_ms)) as conn,
                transaction(conn),
            ):
                conn.execute(_INSERT, row)
        except sqlite3.Error:
            _log.error("record writer: a record submitted after close is not stored: %r", row, exc_info=True)
            self.failed += 1
        else:
            self.written += 1


# --- reader -------------------------------------------------------------------------------------------------


def read_records(
    path: Path, *, route: str | None = None, since: float | None = None, until: float | None = None
) -> list[Record]:
    """Records from a request log, oldest first; `since` is inclusive and `until` exclusive (epoch seconds).

    Opens the file read-only (a mistyped path raises instead of creating an empty log). Columns a newer
    gateway added are ignored; columns an older file lacks take the field's default.
    """
    with reading(path) as conn:
        present = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
        if not present:  # a file no gateway has written yet
            return []
        names = [name for name in FIELDS if name in present]
        where, params = _filters(route, since, until)
        sql = f"SELECT {', '.join(names)} FROM records{where} ORDER BY ts, rowid"
        return [_record(names, row) for row in conn.execute(sql, params)]


def _filters(route: str | None, since: float | None, until: float | None) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    for clause, value in (("route = ?", route), ("ts >= ?", since), ("ts < ?", until)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _record(names: Sequence[str], row: Sequence[Any]) -> Record:
    values = dict(zip(names, row, strict=True))
    for flag in ("stream", "forced"):
        if flag in values:
            values[flag] = bool(values[flag])
    return Record(**values)


class Tail:
    """A route's records in commit order, from a rowid on: the canary controller's incremental reads.

    SQLite assigns rowids in commit order, so `rowid > last` skips nothing whichever process wrote the rows.
    Reads only `fields` (the others keep their defaults). The file is opened read-only on the first read that
    finds it (before the first request there is none).
    """

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self._path = path
        self._fields = tuple(fields)
        self._sql = (
            f"SELECT rowid, {', '.join(self._fields)} FROM records"
            " WHERE route = ? AND ts >= ? AND rowid > ? ORDER BY rowid"
        )
        self._db: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def after(self, route: str, since: float, rowid: int) -> list[tuple[int, Record]]:
        """(rowid, record) of `route` from `since` (epoch seconds) with a rowid above `rowid`."""
        if self._db is None:
            if not self._path.exists():
                return []
            self._db = open_readonly(self._path)
        names = ("request_id", "route", *self._fields)
        return [
            (row[0], _record(names, ("", route, *row[1:])))
            for row in self._db.execute(self._sql, (route, since, rowid))
        ]
