"""Load-runner reach: how many requests per second `gateway loadtest` sustains, and what each costs it in CPU.

What it measures. The runner (`gateway.loadtest.client`, the code `gateway loadtest` runs, in this process) is
pointed straight at one simulated engine (`gateway.devtools.sim_engine`, model `bench`: zero latency, one valid tool call
per answer), started here on a free loopback port; with `--gateway`, also through a real `gateway serve` process
(the `bench` route, authentication off) in front of that engine. Per case it reports the measured requests, the
achieved rate, the open loop's late starts, errors, end-to-end p50/p99 as the client saw them, and CPU per request
for the runner (this process: `time.process_time()` over the measured phase, as the result's
`runner_cpu_us_per_request`) and for the engine and gateway processes (utime + stime from /proc/<pid>/stat).

Cases: closed loop (N concurrent clients, as fast as answers come) non-stream and stream, which give the most the
runner and its target reach together on this machine; then open loops (Poisson, then a fixed rate) at `--rate`,
which show whether that rate is met without late starts. The request is `loadtests/scenarios/bench-requests.jsonl`.
Every process shares the same cores, so the rates are the system's, and the runner's CPU per request says how
much of it is the runner's: 1e6 / (runner µs per request) is what the runner alone could send on one core.

    .venv/bin/python loadtests/bench_loadtest.py [--requests 20000] [--rate 1000] [--seconds 10] [--gateway]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from gateway.devtools import sim_engine
from gateway.loadtest.client import run
from gateway.loadtest.results import summarize
from gateway.loadtest.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextlib.contextmanager
def process(
    cmd: list[str], health: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{cmd[2]} did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scenario_file(folder: Path, url: str, load: str, stream: bool) -> Path:
    path = folder / "reach.toml"
    golden = ROOT / "loadtests" / "scenarios" / "bench-requests.jsonl"
    path.write_text(
        f'name = "reach"\n[target]\nurl = "{url}"\nroute = "bench"\napi_key_env = ""\n'
        f'[requests]\ngolden = "{golden}"\nstream = {str(stream).lower()}\n[load]\nwarmup = 500\n{load}\n'
    )
    return path


def cases(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    closed = f'arrival = "concurrent"\nconcurrency = {args.concurrency}\nrequests = {args.requests}'
    opened = f"rate = {args.rate}\nduration_s = {args.seconds}"
    return [
        (f"closed loop x{args.concurrency}, non-stream", closed, False),
        (f"closed loop x{args.concurrency}, stream", closed, True),
        (f"poisson {args.rate:g}/s, non-stream", f'arrival = "poisson"\n{opened}', False),
        (f"poisson {args.rate:g}/s, stream", f'arrival = "poisson"\n{opened}', True),
        (f"fixed {args.rate:g}/s, non-stream", f'arrival = "fixed"\n{opened}', False),
    ]


def one_case(path: Path, watched: dict[str, int]) -> dict[str, Any]:
    loaded = load_scenario(path)
    before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    data = run(loaded, None, progress=None)
    after = {name: cpu_seconds(pid) for name, pid in watched.items()}
    doc = summarize(data, loaded)
    n = doc["load"]["requests"]
    e2e = [v["e2e_ms"] for v in doc["variants"]]
    return {
        "requests": n,
        "rate": doc["load"]["achieved_rate"],
        "late": doc["load"]["late"],
        "errors": sum(v["errors"]["count"] for v in doc["variants"]),
        "p50": max(x["p50"] for x in e2e),
        "p99": max(x["p99"] for x in e2e),
        "runner_us": doc["load"]["runner_cpu_us_per_request"],
        **{f"{name}_us": 1e6 * (after[name] - before[name]) / n for name in watched},
    }


def report(target: str, url: str, folder: Path, watched: dict[str, int], args: argparse.Namespace) -> None:
    print(f"\n== runner -> {target}")
    head = f"{'case':<30} {'requests':>8} {'req/s':>7} {'late':>5} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} {'runner µs/req':>13}"
    print(head + "".join(f" {name + ' µs/req':>14}" for name in watched), flush=True)
    for label, load, stream in cases(args):
        r = one_case(scenario_file(folder, url, load, stream), watched)
        print(
            f"{label:<30} {r['requests']:>8} {r['rate']:>7,.0f} {r['late']:>5} {r['errors']:>6} {r['p50']:>7.1f} "
            f"{r['p99']:>7.1f} {r['runner_us']:>13.0f}"
            + "".join(f" {r[name + '_us']:>14.0f}" for name in watched),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="closed-loop cases")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop cases, requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="open-loop cases")
    parser.add_argument("--gateway", action="store_true", help="also through a gateway process")
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other processes share them)"
    )
    engine_port = free_port()
    engine_url = f"http://127.0.0.1:{engine_port}"
    behaviour = ROOT / "loadtests" / "sim" / "engine.toml"
    sim = sim_engine.command(engine_port, behaviour)
    with tempfile.TemporaryDirectory() as tmp, process(sim, engine_url + "/health") as engine:
        report("simulated engine", engine_url, Path(tmp), {"engine": engine.pid}, args)
        if args.gateway:
            port = free_port()
            env = {
                "GATEWAY_ENGINES": f'{{"default": "{engine_url}"}}',
                "GATEWAY_POLICIES_DIR": str(ROOT / "loadtests" / "bench" / "policies"),
                "GATEWAY_AUTH": "off",
                "GATEWAY_DATA_DIR": tmp,
                "GATEWAY_PORT": str(port),
            }
            gateway_cmd = [sys.executable, "-m", "gateway.cli.main", "serve"]
            with process(gateway_cmd, f"http://127.0.0.1:{port}/healthz", env) as gw:
                url = f"http://127.0.0.1:{port}"
                report(
                    "gateway -> simulated engine",
                    url,
                    Path(tmp),
                    {"gateway": gw.pid, "engine": engine.pid},
                    args,
                )


if __name__ == "__main__":
    main()
