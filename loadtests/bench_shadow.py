"""Shadow benchmark: what a slow shadow costs the users, client latency with a shadow that takes 2 s per answer side
by side with the same load on a route without one, in one run of one gateway.

What it measures. One `gateway serve` process in front of one simulated engine (`loadtests/bench/shadow-engine.toml`)
serves two routes (`loadtests/bench/shadow-policies/`): `plain`, one variant on the engine's zero-latency `bench`
model, and `shadowed`, the same variant plus a `[shadow]` copying every request (share 100) to a variant on the
engine's `slow` model, which answers after 2 s. The in-flight limit (512) is above what the load keeps in flight,
so every copy is sent: at `--rate` requests a second, rate × 2 copies wait on the engine at any time, on the same
event loop that serves the users.

How. The load is open-loop (a request is sent at its scheduled time whether or not the earlier ones are
answered, from a separate client process on uvloop), so a stall of the gateway shows as latency rather than as a
lower rate; a request's latency runs from its scheduled time to the end of its answer. The two routes alternate
round by round (plain, shadowed, shadowed, plain, ...), each round `--seconds` long at `--rate`, with a pause
after each shadowed round until its copies are answered, so that no copy is in flight during a plain round. Per
mode (unary, then stream), the figures are each route's requests, p50, p90, p99 and maximum latency, and errors;
then, from the request log, the copies answered and dropped. Without a shadow both routes' figures are one
distribution measured twice; the difference with one is what a shadow costs.

    .venv/bin/python loadtests/bench_shadow.py [--rate 40] [--seconds 10] [--rounds 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_overhead import Processes, _ask, _free_port, _stop_client, _wait_listening

from gateway.devtools import sim_engine
from gateway.stats import percentile_nearest_rank
from gateway.store.request_log import read_records

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "loadtests" / "bench"
ROUTES = ("plain", "shadowed")
SHADOW_S = 2.0  # the slow model's answer time (shadow-engine.toml)
BODY: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Log the call with ACME: renewal agreed."}],
    "max_tokens": 16,
}


# ----------------------------------------------------------------------------------------------- the client


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> bool:
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            data = await response.read()
            ok = response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
    return ok and (b"data: [DONE]" in data if stream else b'"choices"' in data)


async def _round(
    session: aiohttp.ClientSession, url: str, route: str, rate: float, seconds: float, stream: bool
) -> dict[str, Any]:
    """Send `rate` × `seconds` requests at their scheduled times; each latency counts from its schedule."""
    payload = {**BODY, "model": route}
    if stream:
        payload |= {"stream": True, "stream_options": {"include_usage": True}}
    body = json.dumps(payload).encode()
    latencies: list[float] = []
    errors = 0

    async def one(at: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        ok = await _one(session, url, body, stream)
        latencies.append(time.perf_counter() - at)
        errors += not ok

    start = time.perf_counter() + 0.05
    await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * seconds))))
    return {"latencies": latencies, "errors": errors}


async def _client(url: str) -> None:
    """Obey the parent one line at a time: `run ROUTE RATE SECONDS STREAM` answers one JSON line."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while (line := sys.stdin.readline().split()) and line[0] == "run":
            route, rate, seconds, stream = line[1], float(line[2]), float(line[3]), line[4] == "stream"
            print(json.dumps(await _round(session, url, route, rate, seconds, stream)), flush=True)


# ------------------------------------------------------------------------------------------ the measurement


@dataclass(frozen=True, slots=True)
class Row:
    mode: str
    route: str
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    round_p50_ms: list[float]  # each round's own p50 and p99: the spread between rounds is the noise
    round_p99_ms: list[float]


def _ms(latencies: list[float], q: float) -> float:
    value = percentile_nearest_rank(latencies, q)
    return float("nan") if value is None else 1000 * value


def _row(mode: str, route: str, rounds: list[list[float]], errors: int) -> Row:
    every = [x for r in rounds for x in r]
    return Row(
        mode,
        route,
        len(every),
        *(_ms(every, q) for q in (50, 90, 99, 100)),
        errors,
        [_ms(r, 50) for r in rounds],
        [_ms(r, 99) for r in rounds],
    )


def _gateway_env(tmp: Path, port: int, engine_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    env.update(
        GATEWAY_PORT=str(port),
        GATEWAY_POLICIES_DIR=str(BENCH / "shadow-policies"),
        GATEWAY_ENGINES=json.dumps({"default": f"http://127.0.0.1:{engine_port}"}),
        GATEWAY_DATA_DIR=str(tmp / "data"),
        GATEWAY_AUTH="off",
    )
    return env


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, dict[str, int]]]:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-shadow-")))
        procs = stack.enter_context(Processes(tmp))
        engine_port, gw_port = _free_port(), _free_port()
        engine = procs.start("engine", sim_engine.command(engine_port, BENCH / "shadow-engine.toml"))
        gateway = procs.start(
            "gateway", [sys.executable, "-m", "gateway.cli", "serve"], _gateway_env(tmp, gw_port, engine_port)
        )
        _wait_listening(procs, "engine", engine, engine_port)
        _wait_listening(procs, "gateway", gateway, gw_port)
        argv = [sys.executable, __file__, "--client", f"http://127.0.0.1:{gw_port}/v1/chat/completions"]
        client = procs.start_piped(argv)
        for mode in ("unary", "stream"):
            _ask(client, f"run plain {args.rate} 2 {mode}")  # warm-up: connections, caches
            _ask(client, f"run shadowed {args.rate} 2 {mode}")
            time.sleep(SHADOW_S + 1.0)
            got: dict[str, list[list[float]]] = {r: [] for r in ROUTES}
            errors: Counter[str] = Counter()
            for i in range(args.rounds):
                order = ROUTES if i % 2 == 0 else ROUTES[::-1]
                for route in order:
                    answer = _ask(client, f"run {route} {args.rate} {args.seconds} {mode}")
                    got[route].append(answer["latencies"])
                    errors[route] += answer["errors"]
                    if route == "shadowed":
                        time.sleep(SHADOW_S + 1.0)  # the round's copies end before the next round
                    print(f"  {mode} {route}: round {i + 1} done", file=sys.stderr, flush=True)
            rows += [_row(mode, r, got[r], errors[r]) for r in ROUTES]
        _stop_client(client)
        time.sleep(SHADOW_S + 1.0)
        copies = _copies(tmp / "data" / "requests.db", gateway)
    return rows, copies


def _copies(log: Path, gateway: subprocess.Popen[bytes]) -> dict[str, dict[str, int]]:
    """Per route: the shadow records by outcome (answered `ok`, failed, `shadow_dropped`), once the gateway has
    stopped and its writer has flushed the log."""
    gateway.terminate()
    gateway.wait(timeout=30)
    out: dict[str, Counter[str]] = {}
    for rec in read_records(log):
        if rec.shadow:
            out.setdefault(rec.route or "", Counter())[rec.outcome or ""] += 1
    return {route: dict(c) for route, c in out.items()}


def render(rows: list[Row], copies: dict[str, dict[str, int]], args: argparse.Namespace) -> str:
    lines = [
        f"open loop, {args.rate:g} requests/s, {args.rounds} rounds of {args.seconds:g} s per route and mode;"
        f" shadow answers take {SHADOW_S:g} s",
        f"{'mode':<8} {'route':<10} {'requests':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        f" {'errors':>7}  p50 / p99 per round (ms)",
    ]
    lines += [
        f"{r.mode:<8} {r.route:<10} {r.requests:>9} {r.p50_ms:>8.1f} {r.p90_ms:>8.1f} {r.p99_ms:>8.1f}"
        f" {r.max_ms:>8.1f} {r.errors:>7}  {_spread(r.round_p50_ms)} / {_spread(r.round_p99_ms)}"
        for r in rows
    ]
    for route, outcomes in sorted(copies.items()):
        lines.append(
            f"shadow copies of {route}: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        )
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--rate", type=float, default=40.0, help="requests per second sent to a route in a round")
    p.add_argument("--seconds", type=float, default=10.0, help="length of one round")
    p.add_argument(
        "--rounds", type=int, default=4, help="measured rounds per route and mode, routes alternating"
    )
    p.add_argument("--json", type=Path, dest="json_out", help="also write the figures as JSON here")
    p.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the load client against this URL
    return p


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.client:
        import uvloop

        uvloop.run(_client(args.client))
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    rows, copies = run(args)
    print(render(rows, copies, args))
    if args.json_out:
        report = {
            "config": vars(args) | {"json_out": None},
            "rows": [asdict(r) for r in rows],
            "copies": copies,
        }
        args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
