"""The request log: table `records`, one row per request (`records.Record`), in its own SQLite file (one host) or
in the Postgres database every replica shares (`GATEWAY_DATABASE_URL`). `Where` names it: a path or a URL.

Owns the table's schema on both backends (versioned: SQLite's `PRAGMA user_version`; `schema_versions` in
Postgres), `RecordWriter` (which keeps the database off the request path: `submit()` only appends to a queue, and
a dedicated thread with its own connection writes batches, multi-row INSERTs in SQLite and COPY in Postgres) and
every read of the table: `read_records()` for reports and the lineage answer, `Tail` for the canary controller's
incremental reads. Several gateway processes may share one SQLite file: it is opened in WAL mode with a busy
timeout, and each write transaction takes the write lock up front.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import operator
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg

from gateway.records import FIELDS, Record
from gateway.store.api import StoreError
from gateway.store.postgres import migrate
from gateway.store.sqlite import open_db, open_readonly, reading, transaction

_log = logging.getLogger(__name__)
Where = Path | str  # a SQLite file, or a postgresql:// URL


# --- schema -------------------------------------------------------------------------------------------------

_as_row = operator.attrgetter(*FIELDS)  # one C call per record, much cheaper than dataclasses.astuple


# Column types by the field's Python type, per backend (anything else is TEXT).
_SQLITE_TYPES: Final = (("bool", "INTEGER"), ("int", "INTEGER"), ("float", "REAL"))
_POSTGRES_TYPES: Final = (("bool", "BOOLEAN"), ("int", "BIGINT"), ("float", "DOUBLE PRECISION"))


def _columns(types: tuple[tuple[str, str], ...], added_later: frozenset[str]) -> str:
    """The first schema version's columns: every field but those a later step adds."""

    def sql_type(annotation: object) -> str:
        return next((sql for python, sql in types if str(annotation).startswith(python)), "TEXT")

    return ",\n  ".join(
        f"{f.name} {sql_type(f.type)}" for f in dataclasses.fields(Record) if f.name not in added_later
    )


# Fields added after the first schema version: each is added by its own step below, so the first step must not
# create them (a new file runs every step).
_ADDED_LATER: Final = frozenset({"forced", "bucket", "engine_url", "shadow", "primary_id"})
_COLUMNS: Final = _columns(_SQLITE_TYPES, _ADDED_LATER)

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
    (
        "ALTER TABLE records ADD COLUMN shadow INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE records ADD COLUMN primary_id TEXT",
    ),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


# Postgres: fields added after its first version get a step of their own here, as in SQLite. `xid` is the writing
# transaction's id: `Tail` reads in its order, which (unlike a sequence) says which rows can no longer appear.
_PG_ADDED_LATER: Final[frozenset[str]] = frozenset({"shadow", "primary_id"})
_PG_COLUMNS: Final = _columns(_POSTGRES_TYPES, _PG_ADDED_LATER)
# Partitioned by day on `ts` (retention drops a whole day at once); `records_default` takes rows of a day whose
# partition does not exist (yet): the writer creates each day's ahead (`_PostgresSink.maintain`).
PG_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        f"CREATE TABLE IF NOT EXISTS records (\n  {_PG_COLUMNS},\n  xid xid8 NOT NULL DEFAULT pg_current_xact_id()\n)"
        " PARTITION BY RANGE (ts)",
        "CREATE TABLE IF NOT EXISTS records_default PARTITION OF records DEFAULT",
        "CREATE INDEX IF NOT EXISTS records_route_ts ON records (route, ts)",
        "CREATE INDEX IF NOT EXISTS records_ts ON records (ts)",
        "CREATE INDEX IF NOT EXISTS records_route_xid ON records (route, xid)",
    ),
    (  # shadow traffic; on the partitioned table, so every partition gets the columns
        "ALTER TABLE records ADD COLUMN IF NOT EXISTS shadow BOOLEAN NOT NULL DEFAULT false",
        "ALTER TABLE records ADD COLUMN IF NOT EXISTS primary_id TEXT",
    ),
)
_COPY: Final = f"COPY records ({', '.join(FIELDS)}) FROM STDIN"
_DAY_S: Final = 86_400
_RETENTION_LOCK: Final = 0x7265_636F_7264_7300  # pg_try_advisory_xact_lock key: "records" in ASCII
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


# --- sinks: one write transaction of rows, per backend ---------------------------------------------------------


class _SqliteSink:
    ERRORS: Final = sqlite3.Error
    # Errors that come from the rows themselves: retrying the same rows cannot help, so they are isolated.
    DATA_ERRORS: Final = (
        sqlite3.IntegrityError,
        sqlite3.ProgrammingError,
        sqlite3.DataError,
        sqlite3.InterfaceError,
        OverflowError,  # an int beyond 64 bits fails in Python's binding, before SQLite sees it
    )

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(path, busy_timeout_ms=busy_timeout_ms)

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        # One statement per up to 200 rows, not `executemany`: sqlite3 releases and retakes the GIL around
        # every statement step, and with the event loop busy each retake waits out the interpreter's switch
        # interval. Per row, that made the writer thread cost the request path ~160 µs (overhead benchmark);
        # per 200 rows it is noise.
        with transaction(self._conn):
            for i in range(0, len(rows), _ROWS_PER_STATEMENT):
                part = rows[i : i + _ROWS_PER_STATEMENT]
                self._conn.execute(_insert_many(len(part)), [value for row in part for value in row])

    def maintain(self, now: float, retention_days: float | None) -> int:
        """Delete records older than the retention (in slices, so the write lock is never held long); how many."""
        if retention_days is None:
            return 0
        cutoff, deleted = now - retention_days * _DAY_S, 0
        while True:
            with transaction(self._conn):
                gone = self._conn.execute(
                    "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records WHERE ts < ? LIMIT 10000)",
                    (cutoff,),
                ).rowcount
            deleted += gone
            if gone < 10_000:
                return deleted

    def close(self) -> None:
        self._conn.close()


class _PostgresSink:
    ERRORS: Final = psycopg.Error
    DATA_ERRORS: Final = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError)

    def __init__(self, url: str) -> None:
        self._url = url
        migrate(url, "requests", PG_MIGRATIONS)  # StoreError when the database cannot be reached
        self._conn: psycopg.Connection[Any] | None = None

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """One COPY in one transaction (about 3 µs of CPU a row; `loadtests/bench_record_writes.py`)."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, connect_timeout=5)
        try:
            with self._conn.transaction(), self._conn.cursor().copy(_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.OperationalError:
            self.close()  # a broken connection: the retry opens a new one
            raise

    def maintain(self, now: float, retention_days: float | None) -> int:
        """Create the partitions of today and the next two days; past the retention, drop whole days and delete
        from the default partition. One replica at a time (an advisory lock); how many days were dropped."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, connect_timeout=5)
        with self._conn.transaction():
            (mine,) = self._conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s)", (_RETENTION_LOCK,)
            ).fetchone() or (False,)
            if not mine:
                return 0
            today = int(now // _DAY_S)
            for day in range(today, today + 3):
                try:
                    with self._conn.transaction():  # a savepoint: one day that cannot be made spoils no other
                        self._conn.execute(
                            f"CREATE TABLE IF NOT EXISTS {_partition(day)} PARTITION OF records"
                            f" FOR VALUES FROM ({day * _DAY_S}) TO ({(day + 1) * _DAY_S})"
                        )
                except psycopg.errors.CheckViolation:  # the default partition already holds rows of that day
                    _log.warning(
                        "request log: %s cannot be made; that day's rows stay in records_default", day
                    )
            if retention_days is None:
                return 0
            cutoff = now - retention_days * _DAY_S
            names = self._conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'records'::regclass AND c.relname <> 'records_default'"
            ).fetchall()
            old = [name for (name,) in names if (_day_of(name) + 1) * _DAY_S <= cutoff]
            for name in old:
                self._conn.execute(f"DROP TABLE {name}")
            self._conn.execute("DELETE FROM records_default WHERE ts < %s", (cutoff,))
            return len(old)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _partition(day: int) -> str:
    """A day's partition: `records_20261203` (UTC) for the day `day` days after the epoch."""
    return "records_" + datetime.datetime.fromtimestamp(day * _DAY_S, datetime.UTC).strftime("%Y%m%d")


def _day_of(partition: str) -> int:
    moment = datetime.datetime.strptime(partition.removeprefix("records_"), "%Y%m%d").replace(
        tzinfo=datetime.UTC
    )
    return int(moment.timestamp() // _DAY_S)


_Sink = _SqliteSink | _PostgresSink


def _open_sink(where: Where, busy_timeout_ms: int) -> _Sink:
    return _PostgresSink(where) if isinstance(where, str) else _SqliteSink(where, busy_timeout_ms)


# --- writer -------------------------------------------------------------------------------------------------

_STOP: Final = object()
_MAINTAIN_EVERY_S: Final = 3600.0
_MAX_BACKOFF_S: Final = 5.0


class RecordWriter:
    """Writes records to the request log (`where`: a SQLite file or a Postgres URL) from a dedicated thread, in
    batches.

    `submit()` is the only call on the request path: it appends to a `queue.SimpleQueue` (about a
    microsecond) and wakes nobody. The writer thread drains the queue every `interval_s`, `batch` rows at most
    per transaction.
    A failed write (database locked or unreachable, disk full) is logged and retried with backoff, keeping the
    rows; a row the database rejects by itself (a value it cannot bind) is logged with its content and counted
    in `failed`.

    With a `spill_dir`, rows the database cannot take are not held in memory without bound: once more than
    `memory_max` are waiting (or the writer is closing), a batch that fails goes to a file there instead (one
    file a batch, fsynced), counted in `spilled`. Files are replayed, each in one transaction, as soon as the
    database takes writes again (and at start), then deleted: nothing is lost while the disk holds.
    """

    def __init__(
        self,
        where: Where,
        *,
        batch: int = 512,
        interval_s: float = 0.2,
        busy_timeout_ms: int = 5000,
        spill_dir: Path | None = None,
        memory_max: int = 100_000,
        retention_days: float | None = None,
    ) -> None:
        self.where: Where = where if isinstance(where, str) else Path(where)
        self._spill_dir = spill_dir
        self._memory_max = memory_max
        self._spill_waiting = spill_dir is not None  # files may be left from an earlier run: look at start
        self._retention_days = retention_days
        self._maintained_at = -math.inf  # monotonic time of the last maintenance (partitions, retention)
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
        self.spilled = 0  # rows put in a spill file, not yet replayed

    @property
    def pending(self) -> int:
        """Rows submitted but not yet on disk (exact once `flush()` returns; approximate while writing)."""
        return self._queue.qsize() + self._inflight

    def start(self) -> None:
        """Open the log (creating or migrating the schema) and start the writer thread; a bad path or an
        unreachable database raises here."""
        if self._closed:
            raise RuntimeError("RecordWriter.start() after close()")
        if self._thread is None:
            self._start_thread()

    def _start_thread(self) -> None:
        sink = _open_sink(self.where, self._busy_timeout_ms)
        self._maintain(sink)  # before the first row: Postgres's partitions for today exist
        # daemon: a writer stuck retrying a broken disk must not hang interpreter exit after close() gave up.
        self._thread = threading.Thread(target=self._run, args=(sink,), name="record-writer", daemon=True)
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
                "record writer: close timed out with %d records not written to %s",
                self.pending,
                shown(self.where),
            )

    # --- writer thread ------------------------------------------------------------------------------------

    def _run(self, sink: _Sink) -> None:
        try:
            while True:
                rows, marker = self._collect()
                self._write(sink, rows)
                if self._spill_waiting and not rows:
                    self._replay(sink)
                if time.monotonic() - self._maintained_at >= _MAINTAIN_EVERY_S:
                    self._maintain(sink)
                if isinstance(marker, threading.Event):
                    marker.set()
                elif marker is _STOP:
                    return
        finally:
            sink.close()

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

    def _write(self, sink: _Sink, rows: list[tuple[Any, ...]]) -> None:
        attempt = 0
        while rows:
            try:
                sink.insert(rows)
                self.written += len(rows)
                self._inflight -= len(rows)
                if self._spill_waiting:
                    self._replay(sink)
                return
            except sink.DATA_ERRORS:
                self._isolate(sink, rows)
                return
            except sink.ERRORS:
                if self._spilling() and self._spill(rows):
                    return
                delay = min(_MAX_BACKOFF_S, 0.05 * 2**attempt)
                _log.exception(
                    "record writer: writing %d rows to %s failed; retrying in %.2fs",
                    len(rows),
                    shown(self.where),
                    delay,
                )
                attempt += 1
                time.sleep(delay)

    def _maintain(self, sink: _Sink) -> None:
        """The day's partitions and the retention purge; a failure is logged and tried again a minute later."""
        try:
            purged = sink.maintain(time.time(), self._retention_days)
        except sink.ERRORS:
            _log.warning("request log: maintenance failed; trying again in a minute", exc_info=True)
            self._maintained_at = time.monotonic() - _MAINTAIN_EVERY_S + 60.0
            return
        self._maintained_at = time.monotonic()
        if purged:
            _log.info("request log: the retention purge removed %d (records; on Postgres, days)", purged)

    def _spilling(self) -> bool:
        """Whether a batch the database refused goes to a spill file rather than waiting in memory."""
        return self._spill_dir is not None and (self._closed or self.pending > self._memory_max)

    def _spill(self, rows: list[tuple[Any, ...]]) -> bool:
        """Put `rows` in a spill file of their own; False (they stay in memory) if that fails too."""
        assert self._spill_dir is not None
        path = self._spill_dir / f"records-{time.time_ns()}-{os.getpid()}.jsonl"
        try:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as f:
                f.write(b"".join(orjson.dumps(row) + b"\n" for row in rows))
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            _log.exception(
                "record writer: spilling %d rows to %s failed; keeping them in memory", len(rows), path
            )
            path.unlink(missing_ok=True)
            return False
        _log.warning("record writer: the database is away; %d rows spilled to %s", len(rows), path)
        self.spilled += len(rows)
        self._inflight -= len(rows)
        self._spill_waiting = True
        return True

    def _replay(self, sink: _Sink) -> None:
        """Write the spill files back, oldest first, each in one transaction; stop at the first that fails."""
        assert self._spill_dir is not None
        for path in sorted(self._spill_dir.glob("records-*.jsonl")):
            rows = [tuple(orjson.loads(line)) for line in path.read_bytes().splitlines() if line]
            try:
                sink.insert(rows)
            except sink.DATA_ERRORS:
                _log.exception("record writer: %s holds rows the database rejects; it is left in place", path)
                continue
            except sink.ERRORS:
                return  # still away: the files wait for the next successful write
            path.unlink()
            self.written += len(rows)
            self.spilled = max(0, self.spilled - len(rows))
            _log.warning("record writer: %d spilled rows written back from %s", len(rows), path)
        self._spill_waiting = False

    def _isolate(self, sink: _Sink, rows: list[tuple[Any, ...]]) -> None:
        # The database rejected some row's values: write the rows one by one so the others are still stored.
        if len(rows) > 1:
            for row in rows:
                self._write(sink, [row])
            return
        _log.error(
            "record writer: the database rejected a record; it is not stored: %r", rows[0], exc_info=True
        )
        self.failed += 1
        self._inflight -= 1

    def _write_late(self, record: Record) -> None:
        # A request that finished after close(): written on the caller's thread, once, without the retry
        # loop, so a broken disk during shutdown cannot hang the caller. It only happens while shutting down.
        _log.warning("record writer: %s submitted after close; writing it synchronously", record.request_id)
        row = _as_row(record)
        try:
            sink = _open_sink(self.where, self._busy_timeout_ms)
            try:
                sink.insert([row])
            finally:
                sink.close()
        except (sqlite3.Error, psycopg.Error, StoreError, OSError):
            _log.error("record writer: a record submitted after close is not stored: %r", row, exc_info=True)
            self.failed += 1
        else:
            self.written += 1


def shown(where: Where) -> str:
    """`where` for a log line: a URL without its password."""
    return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", where) if isinstance(where, str) else str(where)


# --- reader -------------------------------------------------------------------------------------------------


def read_records(
    where: Where, *, route: str | None = None, since: float | None = None, until: float | None = None
) -> list[Record]:
    """Records from a request log, oldest first; `since` is inclusive and `until` exclusive (epoch seconds).

    Opens a file read-only (a mistyped path raises instead of creating an empty log). Columns a newer
    gateway added are ignored; columns an older file lacks take the field's default.
    """
    if isinstance(where, str):
        return _read_postgres(where, route, since, until)
    with reading(where) as conn:
        present = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
        if not present:  # a file no gateway has written yet
            return []
        names = [name for name in FIELDS if name in present]
        where, params = _filters(route, since, until)
        sql = f"SELECT {', '.join(names)} FROM records{where} ORDER BY ts, rowid"
        return [_record(names, row) for row in conn.execute(sql, params)]


def served_counts(where: Where, *, since: float) -> dict[tuple[str, str], int]:
    """Served requests (shadow copies left out) per (route, variant) at or after `since`, counted by the database:
    for views that poll (the console's live shares), where reading every record would cost a poll each time."""
    sql = (
        "SELECT route, variant, COUNT(*) FROM records WHERE ts >= ? AND route IS NOT NULL AND variant IS NOT NULL"
        "{shadow} GROUP BY route, variant"
    )
    if isinstance(where, str):
        with psycopg.connect(where, connect_timeout=10) as conn:
            present = _pg_columns(conn)
            if not present:  # a database no gateway has written to yet
                return {}
            shadow = " AND NOT shadow" if "shadow" in present else ""
            return {
                (r, v): n for r, v, n in conn.execute(sql.format(shadow=shadow).replace("?", "%s"), [since])
            }
    with reading(where) as conn:
        present = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
        if not present:  # a file no gateway has written yet
            return {}
        shadow = " AND shadow = 0" if "shadow" in present else ""
        return {(r, v): n for r, v, n in conn.execute(sql.format(shadow=shadow), [since])}


def _pg_columns(conn: psycopg.Connection[Any]) -> set[str]:
    return {
        name
        for (name,) in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'records'"
        )
    }


def _read_postgres(url: str, route: str | None, since: float | None, until: float | None) -> list[Record]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        present = _pg_columns(conn)
        if not present:  # a database no gateway has written to yet
            return []
        names = [
            name for name in FIELDS if name in present
        ]  # a database an older gateway migrated lacks some
        where, params = _filters(route, since, until)
        sql = f"SELECT {', '.join(names)} FROM records{where} ORDER BY ts, xid"
        return [_record(names, row) for row in conn.execute(sql.replace("?", "%s"), params)]


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
    for flag in ("stream", "forced", "shadow"):
        if flag in values:
            values[flag] = bool(values[flag])
    return Record(**values)


class Tail:
    """A route's records in commit order, from a cursor on: the canary controller's incremental reads. `after`
    returns (cursor, record) pairs; the next call passes the last cursor it got, and misses nothing.

    SQLite assigns rowids in commit order, so `rowid > last` skips nothing whichever process wrote the rows.
    Postgres's sequences do not (a transaction may commit after a later one), so there the cursor is a horizon of
    transaction ids: the rows of every transaction below `pg_snapshot_xmin` (all finished) and at or above the last
    horizon, whichever replica wrote them. Reads only `fields` (the others keep their defaults), and of those only
    the columns the table has (a log an older gateway wrote, read by `gateway report`, lacks the newer ones). A file
    is opened read-only on the first read that finds it (before the first request there is none).
    """

    def __init__(self, where: Where, fields: Sequence[str]) -> None:
        self._where = where
        self._fields = tuple(fields)
        self._present: tuple[str, ...] = ()  # the fields the table has, once a read found all of them
        self._sqlite: sqlite3.Connection | None = None
        self._postgres: psycopg.Connection[Any] | None = None

    def close(self) -> None:
        for conn in (self._sqlite, self._postgres):
            if conn is not None:
                conn.close()
        self._sqlite = self._postgres = None

    def after(self, route: str, since: float, cursor: int) -> list[tuple[int, Record]]:
        """(cursor, record) of `route` from `since` (epoch seconds), after `cursor` (0: from the start)."""
        if isinstance(self._where, str):
            fields, found = self._after_postgres(self._where, route, since, cursor)
        else:
            fields, found = self._after_sqlite(self._where, route, since, cursor)
        names = ("request_id", "route", *fields)
        return [(row[0], _record(names, ("", route, *row[1:]))) for row in found]

    def _fields_of(self, columns: list[str]) -> tuple[str, ...]:
        present = tuple(f for f in self._fields if f in columns)
        if present == self._fields:
            self._present = present  # complete: no need to look again
        return present

    def _after_sqlite(
        self, path: Path, route: str, since: float, cursor: int
    ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        if self._sqlite is None:
            if not path.exists():
                return (), []
            self._sqlite = open_readonly(path)
        fields = self._present or self._fields_of(
            [row[1] for row in self._sqlite.execute("PRAGMA table_info(records)")]
        )
        if not fields:  # no table yet
            return (), []
        sql = (
            f"SELECT rowid, {', '.join(fields)} FROM records"
            " WHERE route = ? AND ts >= ? AND rowid > ? ORDER BY rowid"
        )
        return fields, list(self._sqlite.execute(sql, (route, since, cursor)))

    def _after_postgres(
        self, url: str, route: str, since: float, cursor: int
    ) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
        if self._postgres is None or self._postgres.closed:
            self._postgres = psycopg.connect(url, autocommit=True, connect_timeout=10)
        conn = self._postgres
        fields = self._present or self._fields_of(
            [
                name
                for (name,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = current_schema() AND table_name = 'records'"
                )
            ]
        )
        if not fields:  # no table yet
            return (), []
        (horizon,) = conn.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
        ).fetchone() or (0,)
        sql = (
            f"SELECT %s::bigint, {', '.join(fields)} FROM records WHERE route = %s AND ts >= %s"
            " AND xid >= %s::text::xid8 AND xid < %s::text::xid8 ORDER BY xid"
        )
        return fields, list(conn.execute(sql, (horizon, route, since, str(cursor), str(horizon))))
