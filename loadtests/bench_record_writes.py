"""Record writes to Postgres: psycopg 3 (COPY, multi-row INSERT) against asyncpg (copy_records_to_table), the CPU a
batch costs the writing process per record (the gateway's writer thread shares the GIL with the event loop).

    .venv/bin/pip install asyncpg && .venv/bin/python loadtests/bench_record_writes.py

It starts its own Postgres server (`gateway.devtools.postgres`); asyncpg is measured only where it is installed (it
is not a dependency of the gateway).
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg

try:
    import asyncpg
except ImportError:  # only for the comparison
    asyncpg = None

from gateway.devtools.postgres import PostgresServer
from gateway.records import FIELDS, Record

BATCH = 512
BATCHES = 40
TYPES = {"float": "DOUBLE PRECISION", "int": "BIGINT", "bool": "BOOLEAN", "str": "TEXT"}


def ddl() -> str:
    cols = []
    for f in dataclasses.fields(Record):
        t = str(f.type).split("|")[0].strip()
        cols.append(f"{f.name} {TYPES.get(t, 'TEXT')}")
    return f"CREATE TABLE records ({', '.join(cols)})"


def rows(n: int) -> list[tuple]:
    out = []
    for i in range(n):
        r = Record(
            ts=time.time(),
            request_id=f"req-{i}",
            key_name="crm",
            route="crm-assistant",
            variant="baseline",
            engine_model="crm-base",
            stream=bool(i % 2),
            status=200,
            e2e_s=0.1,
            ttft_s=0.02,
            input_tokens=100,
            output_tokens=30,
            cost=0.0001,
            currency="EUR",
            tool_verdict="valid",
            tool_calls=1,
            share=0.9,
            policy_version="abc",
            bucket=0.5,
        )
        out.append(tuple(getattr(r, f) for f in FIELDS))
    return out


def cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def psycopg_copy(url: str, data: list[tuple]) -> None:
    with psycopg.connect(url) as conn:
        for _ in range(BATCHES):
            with (
                conn.transaction(),
                conn.cursor().copy(f"COPY records ({', '.join(FIELDS)}) FROM STDIN") as cp,
            ):
                for row in data:
                    cp.write_row(row)


def psycopg_insert(url: str, data: list[tuple]) -> None:
    one = "(" + ", ".join(["%s"] * len(FIELDS)) + ")"
    with psycopg.connect(url) as conn:
        for _ in range(BATCHES):
            with conn.transaction():
                for i in range(0, len(data), 200):
                    part = data[i : i + 200]
                    conn.execute(
                        f"INSERT INTO records ({', '.join(FIELDS)}) VALUES " + ", ".join([one] * len(part)),
                        [v for r in part for v in r],
                    )


def asyncpg_copy(url: str, data: list[tuple]) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            for _ in range(BATCHES):
                async with conn.transaction():
                    await conn.copy_records_to_table("records", records=data, columns=list(FIELDS))
        finally:
            await conn.close()

    asyncio.run(go())


def main() -> None:
    server = PostgresServer().start()
    try:
        data = rows(BATCH)
        contenders = [("psycopg COPY", psycopg_copy), ("psycopg INSERT", psycopg_insert)]
        if asyncpg is not None:
            contenders.append(("asyncpg COPY", asyncpg_copy))
        else:
            print("(asyncpg is not installed: pip install asyncpg to compare it)")
        for name, fn in contenders:
            best = None
            for _ in range(3):
                url = server.new_database()
                with psycopg.connect(url, autocommit=True) as c:
                    c.execute(ddl())
                c0, w0 = cpu(), time.perf_counter()
                fn(url, data)
                c1, w1 = cpu(), time.perf_counter()
                per = (c1 - c0) / (BATCH * BATCHES) * 1e6
                best = per if best is None else min(best, per)
                wall = (w1 - w0) / (BATCH * BATCHES) * 1e6
            print(f"{name:16s} {best:6.1f} µs CPU per record (client process), {wall:6.1f} µs wall")
    finally:
        server.stop()
        server.remove()


if __name__ == "__main__":
    main()
