"""The request log: schema, and the batched writer against real SQLite files."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.records import FIELDS, Record
from gateway.store.request_log import SCHEMA_VERSION, RecordWriter, Tail, connect, read_records


def make(i: int, **fields: object) -> Record:
    base: dict[str, object] = {"ts": 1_000.0 + i, "request_id": f"req-{i}", "route": "crm", "variant": "base"}
    return Record(**{**base, **fields})  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "requests.db"


@pytest.fixture
def writer(db: Path) -> Iterator[RecordWriter]:
    w = RecordWriter(db)
    w.start()
    yield w
    w.close()


# --- schema -------------------------------------------------------------------------------------------------


def test_schema_has_one_column_per_field_indexes_wal_and_version(db: Path) -> None:
    with connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(records)")]
        indexes = {row[1]: row for row in conn.execute("PRAGMA index_list(records)")}
        route_ts = [row[2] for row in conn.execute("PRAGMA index_info(records_route_ts)")]
        assert columns == list(FIELDS)
        assert {"records_route_ts", "records_ts"} <= set(indexes)
        assert route_ts == ["route", "ts"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_schema_creation_is_idempotent(db: Path) -> None:
    for _ in range(3):
        connect(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# --- writer -------------------------------------------------------------------------------------------------


def test_every_field_round_trips(writer: RecordWriter, db: Path) -> None:
    full = Record(
        ts=1.5, request_id="r1", key_name="svc", tenant="acme", route="crm", variant="ft", engine_model="crm-ft",
        adapter="crm@3", stream=True, status=200, outcome="stream_error", error_code="engine_error",
        fallback_from="base", engine_first_byte_s=0.01, e2e_s=1.25, ttft_s=0.05, tpot_s=0.02, input_tokens=10,
        output_tokens=20, cost=0.0003, currency="USD", tool_verdict="invalid", tool_reason="schema",
        tool_path="/arguments/id", tool_detail="not an integer", tool_calls=2, tool_choice="auto", share=0.05,
        policy_version="v7", retrieval_s=0.003, forced=True, bucket=0.25, engine_url="http://10.0.0.5:8001",
        shadow=True, primary_id="r0",
    )  # fmt: skip
    minimal = Record(ts=2.0, request_id="r2")
    writer.submit(full)
    writer.submit(minimal)
    assert writer.flush(timeout=10)
    assert read_records(db) == [full, minimal]


def test_flush_waits_for_everything_submitted(writer: RecordWriter, db: Path) -> None:
    for i in range(1_000):
        writer.submit(make(i))
    assert writer.flush(timeout=10)
    assert writer.written == 1_000
    assert writer.pending == 0
    assert len(read_records(db)) == 1_000


def test_a_full_batch_is_committed_without_waiting_for_the_interval(db: Path) -> None:
    writer = RecordWriter(db, batch=10, interval_s=3600)
    writer.start()
    for i in range(25):
        writer.submit(make(i))
    assert wait_until(lambda: writer.written == 20)
    time.sleep(0.05)
    assert writer.written == 20  # the last 5 wait for the interval (an hour) or a flush
    assert writer.pending == 5
    assert writer.flush(timeout=10)
    assert writer.written == 25
    writer.close()


def test_a_partial_batch_is_committed_after_the_interval(db: Path) -> None:
    writer = RecordWriter(db, batch=1_000, interval_s=0.05)
    writer.start()
    for i in range(3):
        writer.submit(make(i))
    assert wait_until(lambda: writer.written == 3)
    assert len(read_records(db)) == 3
    writer.close()


def test_close_loses_nothing_across_10000_submits_from_several_threads(db: Path) -> None:
    writer = RecordWriter(db, batch=256, interval_s=0.01)
    writer.start()
    threads, per_thread = 8, 1_250

    def produce(t: int) -> None:
        for i in range(per_thread):
            writer.submit(make(t * per_thread + i))

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    writer.close()
    ids = [r.request_id for r in read_records(db)]
    assert len(ids) == threads * per_thread
    assert set(ids) == {f"req-{i}" for i in range(threads * per_thread)}
    assert writer.written == threads * per_thread


def test_submits_racing_with_close_are_all_written(db: Path) -> None:
    writer = RecordWriter(db, batch=64, interval_s=0.01)
    writer.start()
    started = threading.Barrier(5)

    def produce(t: int) -> None:
        started.wait()
        for i in range(100):
            writer.submit(make(t * 100 + i))

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    started.wait()
    writer.close()  # some submits land before the stop marker, the rest after close
    for w in workers:
        w.join()
    assert len(read_records(db)) == 400


def test_close_is_idempotent_and_writes_what_was_queued_without_start(db: Path) -> None:
    writer = RecordWriter(db)
    writer.submit(make(1))
    writer.close()
    writer.close()
    assert [r.request_id for r in read_records(db)] == ["req-1"]
    assert writer.flush() is True


def test_submit_after_close_is_written_synchronously(writer: RecordWriter, db: Path) -> None:
    writer.close()
    writer.submit(make(7))
    assert [r.request_id for r in read_records(db)] == ["req-7"]


def test_flush_before_start_is_an_error(db: Path) -> None:
    with pytest.raises(RuntimeError):
        RecordWriter(db).flush()


def test_start_on_an_unwritable_path_raises_at_start(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileExistsError):  # its directory cannot be made: a file stands there
        RecordWriter(tmp_path / "a-file" / "requests.db").start()
    writer = RecordWriter(tmp_path / "missing-dir" / "requests.db")  # a directory that can be made is made
    writer.start()
    writer.close()
    assert (tmp_path / "missing-dir" / "requests.db").is_file()


def test_a_reopened_file_keeps_its_rows(db: Path) -> None:
    for run in range(2):
        writer = RecordWriter(db)
        writer.start()
        for i in range(50):
            writer.submit(make(run * 50 + i))
        writer.close()
    assert [r.request_id for r in read_records(db)] == [f"req-{i}" for i in range(100)]


def test_two_writers_share_one_file(db: Path) -> None:
    writers = [RecordWriter(db, batch=50, interval_s=0.001) for _ in range(2)]
    for w in writers:
        w.start()
    for i in range(2_000):
        writers[i % 2].submit(make(i))
    for w in writers:
        w.close()
    assert len(read_records(db)) == 2_000


def test_a_locked_database_is_retried_and_keeps_the_rows(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = RecordWriter(db, busy_timeout_ms=10)
    writer.start()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    with caplog.at_level(logging.ERROR, logger="gateway.store.request_log"):
        for i in range(5):
            writer.submit(make(i))
        assert writer.flush(timeout=0.5) is False
        assert writer.written == 0
        assert writer.pending == 5
    assert any("retrying" in r.getMessage() for r in caplog.records)
    blocker.execute("COMMIT")
    blocker.close()
    assert writer.flush(timeout=10)
    writer.close()
    assert len(read_records(db)) == 5


def test_a_row_sqlite_rejects_is_logged_and_the_others_written(
    writer: RecordWriter, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.store.request_log"):
        writer.submit(make(1))
        writer.submit(make(2, tenant=object()))  # not a value SQLite can bind
        writer.submit(make(3))
        assert writer.flush(timeout=10)
    assert [r.request_id for r in read_records(db)] == ["req-1", "req-3"]
    assert writer.failed == 1
    assert any("rejected" in r.getMessage() and "req-2" in r.getMessage() for r in caplog.records)


# --- reader -------------------------------------------------------------------------------------------------


def test_read_records_filters_by_route_and_time(writer: RecordWriter, db: Path) -> None:
    for i in range(10):
        writer.submit(make(i, route="crm" if i % 2 else "search"))
    writer.flush(timeout=10)
    assert [r.request_id for r in read_records(db, route="crm")] == [f"req-{i}" for i in (1, 3, 5, 7, 9)]
    assert [r.ts for r in read_records(db, since=1_003.0, until=1_006.0)] == [1_003.0, 1_004.0, 1_005.0]
    assert [r.request_id for r in read_records(db, route="search", since=1_005.0)] == ["req-6", "req-8"]


def test_read_records_does_not_create_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        read_records(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()


def test_read_records_fills_columns_an_older_file_lacks(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE records (ts REAL, request_id TEXT, route TEXT, stream INTEGER)")
        conn.execute("INSERT INTO records VALUES (1.0, 'old', 'crm', 1)")
    conn.close()
    assert read_records(db) == [Record(ts=1.0, request_id="old", route="crm", stream=True)]


def test_a_version_2_file_gains_the_engine_url_column_and_keeps_its_rows(db: Path) -> None:
    columns = [f for f in FIELDS if f not in ("engine_url", "shadow", "primary_id")]
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE records ({', '.join(columns)})")
        conn.execute("INSERT INTO records (ts, request_id, route) VALUES (1.0, 'before', 'crm')")
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    writer = RecordWriter(db)
    writer.start()
    writer.submit(Record(ts=2.0, request_id="after", route="crm", engine_url="http://10.0.0.6:8001"))
    writer.close()
    assert [(r.request_id, r.engine_url) for r in read_records(db)] == [
        ("before", None),
        ("after", "http://10.0.0.6:8001"),
    ]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    conn.close()


def test_a_version_3_file_gains_the_shadow_columns_and_keeps_its_rows(db: Path) -> None:
    columns = [f for f in FIELDS if f not in ("shadow", "primary_id")]
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE records ({', '.join(columns)})")
        conn.execute("INSERT INTO records (ts, request_id, route) VALUES (1.0, 'before', 'crm')")
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    writer = RecordWriter(db)
    writer.start()
    writer.submit(Record(ts=2.0, request_id="after-shadow", route="crm", shadow=True, primary_id="after"))
    writer.close()
    assert [(r.request_id, r.shadow, r.primary_id) for r in read_records(db)] == [
        ("before", False, None),
        ("after-shadow", True, "after"),
    ]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    conn.close()


def test_tail_reads_a_file_an_older_gateway_wrote(db: Path) -> None:
    """`gateway report` looks at a running canary through `Tail`, maybe on a log no newer gateway has migrated."""
    columns = [f for f in FIELDS if f not in ("shadow", "primary_id")]  # a version-3 file
    with sqlite3.connect(db) as conn:
        conn.execute(f"CREATE TABLE records ({', '.join(columns)})")
        conn.execute("INSERT INTO records (ts, request_id, route, variant) VALUES (1.0, 'old', 'crm', 'ft')")
        conn.execute("PRAGMA user_version = 3")
    conn.close()
    tail = Tail(db, ["ts", "variant", "shadow"])
    try:
        ((cursor, record),) = tail.after("crm", 0.0, 0)
        assert (cursor, record.variant, record.shadow) == (1, "ft", False)
        connect(db).close()  # a newer gateway migrates it meanwhile and writes a copy's record
        with sqlite3.connect(db) as conn:
            conn.execute("INSERT INTO records (ts, request_id, route, shadow) VALUES (2.0, 'new', 'crm', 1)")
        conn.close()
        assert [(c, r.request_id, r.shadow) for c, r in tail.after("crm", 0.0, cursor)] == [(2, "", True)]
    finally:
        tail.close()


def test_a_file_from_a_newer_gateway_is_written_without_downgrading(db: Path) -> None:
    connect(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE records ADD COLUMN future_field TEXT")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    writer = RecordWriter(db)
    writer.start()
    writer.submit(make(1))
    writer.close()
    assert [r.request_id for r in read_records(db)] == ["req-1"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.close()
