"""Gateway overhead benchmark: CPU per request of the full gateway against a bare passthrough, same load, one run.

What it measures. The same closed-loop load (`--concurrency` connections, a fixed number of requests after a
warm-up) is sent, one target at a time, through
  (a) the gateway with everything on, as a real `gateway serve` process: API-key authentication, the policy
      decision (`loadtests/bench/policies/bench.toml`, sticky on `x-user-id`, a 90/10 split), tool-call validation
      in `annotate` mode, the SQLite request log and the OTel metrics;
  (b) the bare passthrough (`loadtests/bench/passthrough.py`: Starlette + one aiohttp session, uvicorn with uvloop
      and httptools), which only forwards the body and relays the answer;
both in front of one simulated engine (`gateway.devtools.sim_engine`, model `bench`: zero latency, a valid tool call).

How. Every process is started here, on free loopback ports, and stopped at the end (terminate, then kill after a
timeout), also on Ctrl-C or an error. The load comes from separate processes (this script with `--client`, one
per target), aiohttp clients on uvloop, so their CPU is charged to no server. The request is
`loadtests/bench/request.json` (a small chat with one `update_crm` tool), with a bearer key and an `x-user-id`
drawn from 1,000 users; streams ask for usage (the gateway always asks the engine for it, so both targets get the
same bytes from the engine) and are read to the end. An error is a non-200 answer, a unary body without
`choices`, or a stream without `data: [DONE]`. Per mode, both targets are warmed up, then measured in `--rounds`
rounds, alternating AB, BA, ... so that a burst from a neighbour on this shared machine lands on both. CPU per
request is the server process's utime + stime (all its threads, /proc/<pid>/stat) read just before and after
each round, summed, divided by the requests; the engine's is shown for context. The figure that matters is the
ratio gateway / passthrough (target ≤ 1.5×), with its per-round range as a noise gauge; requests/s and latency
depend on the three processes sharing the machine's cores.

    .venv/bin/python loadtests/bench_overhead.py [--requests 4000] [--concurrency 32] [--rounds 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.devtools import sim_engine
from gateway.devtools.postgres import PostgresServer
from gateway.stats import percentile_nearest_rank

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "loadtests" / "bench"
ENGINE_BEHAVIOUR = ROOT / "loadtests" / "sim" / "engine.toml"
BIN = Path(sys.executable).parent
TOKEN = "bench-overhead-key-0123456789"
USERS = 1000
MODES = ("unary", "stream")
TARGETS = ("passthrough", "gateway")
TARGET_RATIO = 1.5
# Idle time before each CPU reading, so that work deferred past the last answer (log batches) is counted.
SETTLE_S = 0.25
STOP_TIMEOUT_S = 10.0
CLIENT_TIMEOUT_S = 150.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class ClientSpec:
    url: str
    stream: bool
    concurrency: int
    seed: int = 1


@dataclass(slots=True)
class Tally:
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "seconds": self.seconds,
            "p50_ms": _ms(percentile_nearest_rank(self.latencies, 50)),
            "p99_ms": _ms(percentile_nearest_rank(self.latencies, 99)),
            "errors": self.errors,
            "verdicts": dict(self.verdicts),
        }


def _bodies() -> dict[bool, bytes]:
    body = json.loads((BENCH / "request.json").read_text())
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    return {False: json.dumps(body).encode(), True: json.dumps(stream).encode()}


def _headers() -> list[dict[str, str]]:
    base = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    return [{**base, "x-user-id": f"user-{n:04d}"} for n in range(USERS)]


def _stream_verdict(data: bytes) -> str:
    marker = b": x-gateway-tool-calls="
    at = data.rfind(marker)
    if at < 0:
        return "-"
    return data[at + len(marker) :].split(b"\n", 1)[0].split(b" ", 1)[0].decode()


async def _one(session: aiohttp.ClientSession, spec: ClientSpec, body: bytes, headers: dict[str, str]) -> str:
    """Send one request and read its whole answer; returns the tool-call verdict seen, or "error"."""
    try:
        async with session.post(spec.url, data=body, headers=headers) as response:
            data = await response.read()
            status, verdict = response.status, response.headers.get("x-gateway-tool-calls", "-")
    except (aiohttp.ClientError, TimeoutError):
        return "error"
    if status != 200:
        return "error"
    if spec.stream:
        return _stream_verdict(data) if b"data: [DONE]" in data else "error"
    return verdict if b'"choices"' in data else "error"


class LoadClient:
    """A closed loop: `concurrency` workers, each sending its next request when its last one is answered."""

    def __init__(self, session: aiohttp.ClientSession, spec: ClientSpec) -> None:
        self.session, self.spec = session, spec
        self.body, self.users = _bodies()[spec.stream], _headers()
        self.rng = random.Random(spec.seed)

    async def phase(self, count: int, tally: Tally) -> None:
        left = [count]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                t0 = time.perf_counter()
                verdict = await _one(self.session, self.spec, self.body, self.rng.choice(self.users))
                tally.latencies.append(time.perf_counter() - t0)
                tally.errors += verdict == "error"
                tally.verdicts[verdict] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.spec.concurrency)))
        tally.seconds += time.perf_counter() - t0


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else 1000 * seconds


async def _client(spec: ClientSpec) -> None:
    """Obey the parent, one line at a time: `warmup N` and `run N` send N requests and answer one JSON line
    (`run` with the figures of every measured request so far); anything else ends the client. Between lines
    the parent reads the servers' CPU counters, so they cover exactly the measured requests."""
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout would close them under a request.
    connector = aiohttp.TCPConnector(limit=spec.concurrency, keepalive_timeout=3)
    timeout = aiohttp.ClientTimeout(total=30)
    measured = Tally()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = LoadClient(session, spec)
        while (line := sys.stdin.readline().split()) and line[0] in ("warmup", "run"):
            if line[0] == "warmup":
                await client.phase(int(line[1]), Tally())
                print("{}", flush=True)
            else:
                await client.phase(int(line[1]), measured)
                print(json.dumps(measured.summary()), flush=True)


def client_main(raw_spec: str) -> int:
    import uvloop

    uvloop.run(_client(ClientSpec(**json.loads(raw_spec))))
    return 0


# -------------------------------------------------------------------------------------------- the processes


def _die_with_parent() -> None:
    """Runs in each child before exec: SIGTERM it if this script dies, even by SIGKILL (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    """Every child process of the run; all are stopped on exit, whatever the exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.children):
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        self.children.append((name, proc))
        return proc

    def start_client(self, spec: ClientSpec) -> subprocess.Popen[bytes]:
        return self.start_piped([sys.executable, __file__, "--client", json.dumps(asdict(spec))])

    def start_piped(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """A load client: commands on its stdin, answers on its stdout (`_ask`)."""
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        self.children.append(("client", proc))
        return proc

    def log_tail(self, name: str) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-20:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(procs: Processes, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on port {port} within 30 s:\n{procs.log_tail(name)}")


def _gateway_env(tmp: Path, port: int, engine_port: int, database_url: str | None) -> dict[str, str]:
    keys = tmp / "keys.toml"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    keys.write_text(
        f'[keys.bench]\nsha256 = "{digest}"\ntenant = "bench"\nroutes = ["*"]\ncan_force_variant = true\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    env.update(
        GATEWAY_PORT=str(port),
        GATEWAY_POLICIES_DIR=str(BENCH / "policies"),
        GATEWAY_ENGINES=json.dumps({"default": f"http://127.0.0.1:{engine_port}"}),
        GATEWAY_DATA_DIR=str(tmp / "data"),
        GATEWAY_KEYS_FILE=str(keys),
        GATEWAY_AUTH="on",
    )
    if database_url is not None:  # --store postgres: the state and the request log in Postgres
        env["GATEWAY_DATABASE_URL"] = database_url
    return env


@dataclass(frozen=True, slots=True)
class Servers:
    engine: subprocess.Popen[bytes]
    urls: dict[str, str]  # target -> chat completions URL
    pids: dict[str, int]  # target -> server pid


def start_servers(procs: Processes, tmp: Path, database_url: str | None = None) -> Servers:
    engine_port, pass_port, gw_port = _free_port(), _free_port(), _free_port()
    engine = procs.start("engine", sim_engine.command(engine_port, ENGINE_BEHAVIOUR))
    engine_url = f"http://127.0.0.1:{engine_port}"
    passthrough = procs.start(
        "passthrough",
        [sys.executable, str(BENCH / "passthrough.py"), "--port", str(pass_port), "--engine", engine_url],
    )
    gateway = procs.start(
        "gateway", [str(BIN / "gateway"), "serve"], _gateway_env(tmp, gw_port, engine_port, database_url)
    )
    for name, proc, port in (
        ("engine", engine, engine_port),
        ("passthrough", passthrough, pass_port),
        ("gateway", gateway, gw_port),
    ):
        _wait_listening(procs, name, proc, port)
    _check_no_workers(gateway.pid)
    urls = {
        t: f"http://127.0.0.1:{p}/v1/chat/completions"
        for t, p in (("passthrough", pass_port), ("gateway", gw_port))
    }
    return Servers(engine, urls, {"passthrough": passthrough.pid, "gateway": gateway.pid})


def _check_no_workers(pid: int) -> None:
    """Per-process CPU is only the whole gateway if uvicorn serves in that process (no worker processes)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists() and children.read_text().strip():
        raise RuntimeError(f"the gateway process {pid} has child processes: its CPU would be undercounted")


# ------------------------------------------------------------------------------------------ the measurement


@dataclass(frozen=True, slots=True)
class Row:
    mode: str
    target: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_req: float
    engine_cpu_us_per_req: float
    errors: int
    verdicts: dict[str, int]
    cpu_us_per_req_rounds: list[float]


@dataclass(slots=True)
class Target:
    """One server under load, its load client, and the CPU it spent over the measured rounds."""

    name: str
    pid: int
    client: subprocess.Popen[bytes]
    cpu_s: float = 0.0
    engine_cpu_s: float = 0.0
    rounds: list[float] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def row(self, mode: str) -> Row:
        r = self.result
        requests = r["requests"]
        return Row(
            mode=mode,
            target=self.name,
            requests=requests,
            seconds=r["seconds"],
            rps=requests / r["seconds"],
            p50_ms=r["p50_ms"],
            p99_ms=r["p99_ms"],
            cpu_us_per_req=1e6 * self.cpu_s / requests,
            engine_cpu_us_per_req=1e6 * self.engine_cpu_s / requests,
            errors=r["errors"],
            verdicts=r["verdicts"],
            cpu_us_per_req_rounds=self.rounds,
        )


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` (fields 14 and 15 of /proc/<pid>/stat, after the `(comm)`)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _ask(client: subprocess.Popen[bytes], command: str) -> dict[str, Any]:
    """Send the load client one command line and wait (bounded) for its JSON answer."""
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(command.encode() + b"\n")
    client.stdin.flush()
    ready, _, _ = select.select([client.stdout], [], [], CLIENT_TIMEOUT_S)
    line = client.stdout.readline() if ready else b""
    if not line:
        raise RuntimeError(f"the load client gave no answer to {command!r} (exit status {client.poll()})")
    answer: dict[str, Any] = json.loads(line)
    return answer


def _measure_round(target: Target, engine_pid: int, count: int) -> None:
    time.sleep(SETTLE_S)
    server0, engine0 = cpu_seconds(target.pid), cpu_seconds(engine_pid)
    target.result = _ask(target.client, f"run {count}")
    time.sleep(SETTLE_S)
    server, engine = cpu_seconds(target.pid) - server0, cpu_seconds(engine_pid) - engine0
    target.cpu_s += server
    target.engine_cpu_s += engine
    target.rounds.append(1e6 * server / count)


def _chunks(total: int, parts: int) -> list[int]:
    size, extra = divmod(total, parts)
    return [size + (i < extra) for i in range(parts)]


def _stop_client(client: subprocess.Popen[bytes]) -> None:
    assert client.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        client.stdin.write(b"stop\n")
        client.stdin.close()
    client.wait(timeout=STOP_TIMEOUT_S)


def measure_mode(
    procs: Processes, servers: Servers, stream: bool, count: int, args: argparse.Namespace
) -> list[Row]:
    """Warm both targets up, then alternate them round by round (AB, BA, ...), so that a neighbour's burst of
    CPU on this shared machine lands on both rather than on one."""
    targets = [
        Target(
            name,
            servers.pids[name],
            procs.start_client(ClientSpec(servers.urls[name], stream, args.concurrency)),
        )
        for name in TARGETS
    ]
    for target in targets:
        _ask(target.client, f"warmup {args.warmup}")
    for i, chunk in enumerate(_chunks(count, args.rounds)):
        for target in targets if i % 2 == 0 else targets[::-1]:
            _measure_round(target, servers.engine.pid, chunk)
            print(
                f"  {'stream' if stream else 'unary'} {target.name}: {target.rounds[-1]:.0f} µs CPU/req",
                file=sys.stderr,
                flush=True,
            )
    for target in targets:
        _stop_client(target.client)
    return [target.row("stream" if stream else "unary") for target in targets]


def ratios(rows: list[Row]) -> dict[str, float]:
    cpu = {(r.mode, r.target): r.cpu_us_per_req for r in rows}
    return {m: cpu[(m, "gateway")] / cpu[(m, "passthrough")] for m in MODES if (m, "passthrough") in cpu}


def round_ratios(rows: list[Row]) -> dict[str, list[float]]:
    """The ratio in each round: both targets' figures of a round were measured next to each other in time."""
    by = {(r.mode, r.target): r.cpu_us_per_req_rounds for r in rows}
    return {
        m: [g / p for g, p in zip(by[(m, "gateway")], by[(m, "passthrough")], strict=True)]
        for m in MODES
        if (m, "passthrough") in by
    }


# ---------------------------------------------------------------------------------------------- the report


def render(rows: list[Row]) -> str:
    lines = [
        f"{'mode':<8} {'target':<12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11} "
        f"{'engine µs/req':>14} {'errors':>7}  tool calls"
    ]
    for r in rows:
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(r.verdicts.items()))
        lines.append(
            f"{r.mode:<8} {r.target:<12} {r.rps:>8.0f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} "
            f"{r.cpu_us_per_req:>11.0f} {r.engine_cpu_us_per_req:>14.0f} {r.errors:>7}  {verdicts}"
        )
    found, spread = ratios(rows), round_ratios(rows)
    parts = ", ".join(f"{m} {v:.2f}×" for m, v in found.items())
    verdict = "ok" if all(v <= TARGET_RATIO for v in found.values()) else "ABOVE TARGET"
    lines.append(f"gateway / passthrough CPU: {parts}   (target ≤ {TARGET_RATIO}×: {verdict})")
    ranges = ", ".join(f"{m} {min(v):.2f}–{max(v):.2f}×" for m, v in spread.items())
    lines.append(f"  per round ({len(rows[0].cpu_us_per_req_rounds)} rounds, targets alternated): {ranges}")
    return "\n".join(lines)


def report_json(rows: list[Row], args: argparse.Namespace) -> dict[str, Any]:
    return {
        "config": {
            "requests": args.requests,
            "stream_requests": args.stream_requests,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "store": args.store,
            "cpu_count": os.cpu_count(),
        },
        "rows": [asdict(r) for r in rows],
        "cpu_ratio": ratios(rows),
        "cpu_ratio_rounds": round_ratios(rows),
        "target_ratio": TARGET_RATIO,
    }


# ------------------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=4000, help="measured non-stream requests per target")
    p.add_argument("--stream-requests", type=int, help="measured stream requests per target (default: half)")
    p.add_argument("--warmup", type=int, default=300, help="requests sent to each target before measuring")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per mode, targets alternating")
    p.add_argument("--concurrency", type=int, default=32, help="connections of the closed-loop client")
    p.add_argument("--json", type=Path, dest="json_out", help="also write the figures as JSON here")
    p.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the gateway's store: SQLite files (default) or a Postgres server this script starts",
    )
    p.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the load client with this spec
    return p


def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        database_url = None
        if args.store == "postgres":
            server = PostgresServer().start()
            stack.callback(server.remove)
            stack.callback(server.stop)
            database_url = server.new_database()
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-overhead-"))
        procs = stack.enter_context(Processes(Path(tmp)))
        servers = start_servers(procs, Path(tmp), database_url)
        for stream, count in ((False, args.requests), (True, args.stream_requests)):
            rows += measure_mode(procs, servers, stream, count, args)
    return rows


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `Processes.__exit__`, which stops every child


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.client:
        return client_main(args.client)
    if args.stream_requests is None:
        args.stream_requests = args.requests // 2
    if min(args.requests, args.stream_requests) < args.rounds or args.rounds < 1:
        raise SystemExit("bench_overhead: need at least one round and one request per round")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rows = run(args)
    except KeyboardInterrupt:
        print("bench_overhead: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print(render(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(report_json(rows, args), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
