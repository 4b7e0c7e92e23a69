"""Tool-schema benchmark: memory held by compiled schemas, and how long compiling one stalls the event loop.

What it measures.
  memory: the RSS a process gains while `--schemas` distinct large tool schemas go through a `SchemaCache` the
      way requests would bring them (`expectation_from_request(body, cache)`), each part in a fresh process:
      (a) `count-only`: the cache as it was, bounded by count (1,024) with no size cap, fed 1 MB schemas;
      (b) `capped-1MB`: the default cache (64 MiB estimate, 256 KiB per-schema cap) fed the same 1 MB schemas:
          every one is a 400 before anything compiles;
      (c) `capped-256KB`: the default cache fed schemas just under the cap: compiled, cached up to the bound.
      It also prints the estimate's basis: RSS per byte of compact schema JSON over a set of kept validators.
  stall: the longest gap an asyncio loop sees between 1 ms ticks while one schema is handled: a 1 MB schema
      compiled on the loop (the old path: compiled at check time), the same compiled in `asyncio.to_thread`
      (jsonschema-rs holds the GIL while it compiles, so a worker thread does not free the loop), the request
      path now for a 1 MB schema (serialise, compare with the cap, 400), and a schema at the 256 KiB cap.
  per request: the CPU of reading the benchmark request's `update_crm` schema from a warm cache.

The schemas are objects whose properties are a mix of string patterns, bounded integers and enums, with a
description each: what a large CRM tool declares, and the kind of schema that costs the most memory per byte.

    .venv/bin/python loadtests/bench_schemas.py [--schemas 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.errors import BadRequest  # noqa: E402
from gateway.toolcalls import SchemaCache, expectation_from_request  # noqa: E402

MB = 1024 * 1024
KB = 1024
PARTS = ("count-only", "capped-1MB", "capped-256KB")


def schema(size: int, salt: int) -> dict[str, Any]:
    """A tool schema of a little under `size` bytes of compact JSON, distinct per `salt`."""
    props: dict[str, Any] = {}
    i = 0
    while i % 10 or len(orjson.dumps(props)) < size - 2048:
        kind = i % 3
        if kind == 0:
            prop: dict[str, Any] = {"type": "string", "pattern": f"^[A-Z]{{3}}-[0-9]{{{i % 9 + 1}}}$"}
        elif kind == 1:
            prop = {"type": "integer", "minimum": 0, "maximum": i}
        else:
            prop = {"type": "string", "enum": [f"v{salt}-{i}-{k}" for k in range(6)]}
        props[f"f{salt}_{i}"] = {**prop, "description": f"CRM field {i}."}
        i += 1
    return {"type": "object", "properties": props, "additionalProperties": False}


def body(parameters: dict[str, Any]) -> dict[str, Any]:
    tool = {"type": "function", "function": {"name": "update_crm", "parameters": parameters}}
    return {"model": "crm-assistant", "messages": [{"role": "user", "content": "hi"}], "tools": [tool]}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# ----------------------------------------------------------------------------------------------------- memory


def memory_part(part: str, count: int) -> dict[str, Any]:
    """One part, in this (fresh) process: the RSS gained while `count` distinct schemas arrive."""
    if part == "count-only":
        cache = SchemaCache(max_bytes=1 << 62, max_schema_bytes=1 << 62)  # as before: 1,024 schemas, any size
    else:
        cache = SchemaCache()
    size = 256 * KB if part == "capped-256KB" else MB
    bodies = [body(schema(size, salt)) for salt in range(count)]
    gc.collect()
    before = rss()
    refused = 0
    for b in bodies:
        try:
            expectation_from_request(b, cache)
        except BadRequest:
            refused += 1
    gc.collect()
    return {
        "part": part,
        "schemas": count,
        "schema_bytes": len(orjson.dumps(bodies[0]["tools"][0]["function"]["parameters"])),
        "refused": refused,
        "cached": cache.size,
        "estimate_mb": cache.bytes / MB,
        "rss_gain_mb": (rss() - before) / MB,
    }


def bytes_per_schema_byte(count: int = 24, size: int = 64 * KB) -> float:
    """RSS per byte of compact schema JSON, over `count` kept validators (the cache's estimate factor)."""
    schemas = [schema(size, 1000 + salt) for salt in range(count)]
    gc.collect()
    before = rss()
    kept = [jsonschema_rs.Draft202012Validator(s, validate_formats=True, offline=True) for s in schemas]
    gc.collect()
    gained = rss() - before
    del kept
    return gained / sum(len(orjson.dumps(s)) for s in schemas)


def run_part(part: str, count: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--part", part, "--schemas", str(count)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# ------------------------------------------------------------------------------------------------------ stall


async def max_lag(work: Callable[[], Any]) -> float:
    """The longest extra delay a 1 ms ticker sees while `work` (sync, or returning an awaitable) runs."""
    done = False
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    result = work()
    if asyncio.iscoroutine(result):
        await result
    await asyncio.sleep(0.005)
    done = True
    await task
    return worst


def refused(cache: SchemaCache, b: dict[str, Any]) -> None:
    try:
        expectation_from_request(b, cache)
    except BadRequest:
        return
    raise AssertionError("a 1 MB schema was accepted")


async def stalls(rounds: int) -> dict[str, float]:
    """The median over `rounds` of each case's worst loop lag, in ms (each round uses fresh schemas)."""

    def compile_now(s: dict[str, Any]) -> Any:
        return jsonschema_rs.Draft202012Validator(s, validate_formats=True, offline=True)

    cases: dict[str, list[float]] = {}
    for r in range(rounds):
        big, capped = schema(MB, 2000 + r), schema(256 * KB, 3000 + r)
        other = schema(MB, 4000 + r)
        for name, work in (
            ("1 MB compiled on the loop (before)", lambda s=big: compile_now(s)),
            ("1 MB compiled in a worker thread", lambda s=other: asyncio.to_thread(compile_now, s)),
            ("1 MB refused at the cap (after)", lambda s=big: refused(SchemaCache(), body(s))),
            (
                "256 KiB (the cap) compiled (after)",
                lambda s=capped: expectation_from_request(body(s), SchemaCache()),
            ),
        ):
            cases.setdefault(name, []).append(1000 * await max_lag(work))
    return {name: sorted(lags)[len(lags) // 2] for name, lags in cases.items()}


def per_request_us() -> float:
    crm = json.loads((ROOT / "loadtests" / "bench" / "request.json").read_text())
    cache = SchemaCache()
    expectation_from_request(crm, cache)
    n = 20000
    best = min(
        timeit.Timer(lambda: expectation_from_request(crm, cache), timer=time.process_time).repeat(5, n)
    )
    return 1e6 * best / n


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--schemas", type=int, default=16, help="distinct large schemas per memory part")
    parser.add_argument("--rounds", type=int, default=3, help="stall measurements per case (median shown)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(memory_part(args.part, args.schemas)))
        return
    figures: dict[str, Any] = {"rss_per_schema_byte": bytes_per_schema_byte()}
    print(f"compiled validator: {figures['rss_per_schema_byte']:.1f} bytes of RSS per byte of schema JSON")
    figures["memory"] = [run_part(part, args.schemas) for part in PARTS]
    for m in figures["memory"]:
        print(
            f"{m['part']:<13} {m['schemas']} x {m['schema_bytes'] / KB:,.0f} KiB: "
            f"RSS +{m['rss_gain_mb']:,.0f} MB, "
            f"cached {m['cached']} (estimate {m['estimate_mb']:.0f} MB), refused {m['refused']}"
        )
    figures["stall_ms"] = asyncio.run(stalls(args.rounds))
    for name, lag in figures["stall_ms"].items():
        print(f"event-loop stall, {name}: {lag:,.1f} ms")
    figures["cached_request_us"] = per_request_us()
    us = figures["cached_request_us"]
    print(f"reading the bench request's tool schema from a warm cache: {us:.1f} µs CPU")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
