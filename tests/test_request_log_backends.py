"""The request log on both backends: what the writer stores is what the readers return, a row the database
rejects costs only that row, an outage costs nothing, and `Tail` misses no row whatever order transactions commit
in (on Postgres, where sequences do not follow commit order)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from gateway.devtools.postgres import PostgresServer
from gateway.records import FIELDS
from gateway.store.postgres import migrate
from gateway.store.request_log import PG_MIGRATIONS, RecordWriter, Tail, Where, read_records
from tests.test_records import make


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "sqlite":
        return tmp_path / "requests.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


def _write(where: Where, *records: object, batch: int = 512) -> RecordWriter:
    writer = RecordWriter(where, batch=batch, interval_s=0.01)
    writer.start()
    for record in records:
        writer.submit(record)  # type: ignore[arg-type]
    assert writer.flush(timeout=20)
    writer.close()
    return writer


def test_what_is_written_is_read_back_field_for_field(where: Where) -> None:
    written = [
        make(
            i,
            stream=bool(i % 2),
            forced=i == 3,
            bucket=None if i % 3 else i / 10,
            cost=i * 1e-6,
            ttft_s=None,
            shadow=i == 5,
            primary_id="req-4" if i == 5 else None,
        )
        for i in range(40)
    ]
    writer = _write(where, *written, batch=16)
    assert (writer.written, writer.failed) == (40, 0)
    read = read_records(where)
    assert [tuple(getattr(r, f) for f in FIELDS) for r in read] == [
        tuple(getattr(r, f) for f in FIELDS) for r in written
    ]
    assert [r.request_id for r in read_records(where, since=1_010.0, until=1_012.0)] == ["req-10", "req-11"]
    assert read_records(where, route="other") == []


def test_a_postgres_log_of_the_first_version_gains_the_shadow_columns(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    assert migrate(url, "requests", PG_MIGRATIONS[:1]) == 0
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO records (ts, request_id, route) VALUES (1000.0, 'before', 'crm')")
    assert [(r.request_id, r.shadow) for r in read_records(url)] == [
        ("before", False)
    ]  # read before migrating
    _write(url, make(1, shadow=True, primary_id="req-0"))
    assert [(r.request_id, r.shadow, r.primary_id) for r in read_records(url)] == [
        ("before", False, None),
        ("req-1", True, "req-0"),
    ]
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT version FROM schema_versions WHERE component = 'requests'").fetchone()
    assert row == (len(PG_MIGRATIONS),) == (2,)


def test_a_row_the_database_rejects_costs_only_that_row(where: Where) -> None:
    huge = make(2, input_tokens=2**70)  # fits neither SQLite's nor Postgres's 64-bit integers
    writer = _write(where, make(0), make(1), huge, make(3))
    assert (writer.written, writer.failed) == (3, 1)
    assert [r.request_id for r in read_records(where)] == ["req-0", "req-1", "req-3"]


def test_records_written_while_postgres_is_down_are_stored_when_it_is_back(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    writer = RecordWriter(url, interval_s=0.01)
    writer.start()
    writer.submit(make(0))
    assert writer.flush(timeout=20)
    with postgres.down():
        for i in range(1, 50):
            writer.submit(make(i))
        assert not writer.flush(timeout=1.0)  # nothing can be written now; the rows wait in memory
    assert writer.flush(timeout=30)
    writer.close()
    assert [r.request_id for r in read_records(url)] == [f"req-{i}" for i in range(50)]


def test_tail_misses_no_row_of_a_transaction_that_commits_late(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    _write(url, make(0))  # the table exists
    tail = Tail(url, ["ts", "variant"])
    seen: list[float] = []
    cursor = 0

    def read() -> None:
        nonlocal cursor
        for at, record in tail.after("crm", 0.0, cursor):
            seen.append(record.ts)
            cursor = at

    read()
    assert seen == [1_000.0]
    with psycopg.connect(url) as slow:  # a writer whose transaction began first and commits last
        slow.execute(
            "INSERT INTO records (ts, request_id, route, stream, forced) VALUES (1500, 'slow', 'crm', false, false)"
        )
        late = threading.Thread(target=_write, args=(url, make(1), make(2)))
        late.start()
        late.join()
        read()
        assert seen == [1_000.0], "rows past a transaction still open must wait for it"
        slow.commit()
    read()
    assert sorted(seen) == [1_000.0, 1_001.0, 1_002.0, 1_500.0]
    read()
    assert len(seen) == 4  # and nothing twice
    tail.close()


def test_beyond_its_memory_bound_the_writer_spills_to_files_and_replays_them(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url, spill = postgres.new_database(), tmp_path / "spill"
    writer = RecordWriter(url, batch=10, interval_s=0.01, spill_dir=spill, memory_max=20)
    writer.start()
    writer.submit(make(0))
    assert writer.flush(timeout=20)
    with postgres.down():
        for i in range(1, 101):
            writer.submit(make(i))
        deadline = time.monotonic() + 30
        while writer.pending > 20:  # beyond the bound, batches go to spill files; within it, they wait
            assert time.monotonic() < deadline, f"{writer.pending} rows still in memory"
            time.sleep(0.01)
        assert writer.spilled >= 80 and list(spill.glob("*.jsonl"))
    writer.submit(make(101))  # the next write finds the database back, and the files are written back
    assert writer.flush(timeout=30)
    writer.close()
    assert writer.spilled == 0 and not list(spill.glob("*.jsonl"))
    assert sorted(int(r.request_id[4:]) for r in read_records(url)) == list(range(102))


def test_rows_left_at_close_while_the_database_is_away_are_replayed_by_the_next_writer(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url, spill = postgres.new_database(), tmp_path / "spill"
    first = RecordWriter(url, interval_s=0.01, spill_dir=spill)
    first.start()
    with postgres.down():
        for i in range(30):
            first.submit(make(i))
        first.close(timeout=30)  # a shutdown while the database is away: the rows go to the spill file
        assert first.spilled == 30 and list(spill.glob("*.jsonl"))
    second = RecordWriter(url, interval_s=0.01, spill_dir=spill)
    second.start()
    deadline = time.monotonic() + 20
    while list(spill.glob("*.jsonl")):
        assert time.monotonic() < deadline, "the spill file was not replayed"
        time.sleep(0.05)
    second.close()
    assert sorted(int(r.request_id[4:]) for r in read_records(url)) == list(range(30))


def test_records_past_the_retention_are_purged(where: Where) -> None:
    now = time.time()
    day = 86_400.0
    ages = {"old": 10 * day, "edge": 2.5 * day, "recent": 0.5 * day, "now": 0.0}
    _write(where, *(make(i, ts=now - age, request_id=name) for i, (name, age) in enumerate(ages.items())))
    writer = RecordWriter(where, retention_days=3.0)
    writer.start()  # the purge runs at start, then hourly
    writer.close()
    assert {r.request_id for r in read_records(where)} == {"edge", "recent", "now"}


def _partitions(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'records'::regclass ORDER BY 1"
        ).fetchall()
    return [name for (name,) in rows]


def test_postgres_keeps_a_partition_a_day_and_drops_whole_days(postgres: PostgresServer) -> None:
    url, day = postgres.new_database(), 86_400
    today = int(time.time() // day)
    _write(url, make(0, ts=time.time(), request_id="today"))
    made = _partitions(url)
    assert len(made) == 4 and "records_default" in made  # today's and the next two days', made ahead
    old_day = today - 5  # a day kept by a partition of its own, as a replica five days ago made it
    old_name = "records_" + time.strftime("%Y%m%d", time.gmtime(old_day * day))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {old_name} PARTITION OF records FOR VALUES FROM ({old_day * day}) TO ({(old_day + 1) * day})"
        )
    _write(
        url,
        make(1, ts=old_day * day + 10, request_id="five days ago"),
        make(2, ts=(today - 10) * day, request_id="ten"),
    )
    with psycopg.connect(url) as conn:
        assert conn.execute(f"SELECT count(*) FROM {old_name}").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM records_default").fetchone() == (
            1,
        )  # no partition that day
    writer = RecordWriter(url, retention_days=3.0)
    writer.start()  # the purge runs at start, then hourly
    writer.close()
    assert old_name not in _partitions(url)  # the whole day is dropped
    assert {r.request_id for r in read_records(url)} == {"today"}
