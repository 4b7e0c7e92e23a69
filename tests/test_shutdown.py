"""Graceful shutdown as an operator sees it: `gateway serve` in a subprocess, in front of the simulated engine, gets
SIGTERM while a long stream, a short and a too-long request are in flight and a keep-alive client keeps asking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.store.request_log import read_records
from tests.conftest import ROOT, free_port, running_sim_engine, wait_for

DRAIN_S = 2.0
BEHAVIOUR = """
[models.crm-base]
[models.drain-stream]
ttft_ms = 10
tokens_per_s = 20
output_tokens = 400
[models.drain-unary]
latency_ms = 700
[models.drain-too-slow]
latency_ms = 8000
"""
ROUTES = {"fast": "crm-base", "stream": "drain-stream", "unary": "drain-unary", "slow": "drain-too-slow"}


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("engine") / "behaviour.toml"
    path.write_text(BEHAVIOUR)
    with running_sim_engine(path) as url:
        yield url


def serve(tmp_path: Path, engine_url: str, port: int, *args: str) -> subprocess.Popen[bytes]:
    policies = tmp_path / "policies"
    policies.mkdir()
    for route, model in ROUTES.items():
        (policies / f"{route}.toml").write_text(
            f'route = "{route}"\n[variants.only]\nmodel = "{model}"\nweight = 1\n'
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_POLICIES_DIR=str(policies),
        GATEWAY_ENGINES=orjson.dumps({"default": engine_url}).decode(),
        GATEWAY_DATA_DIR=str(tmp_path / "var"),
        GATEWAY_AUTH="off",
        GATEWAY_PORT=str(port),
        GATEWAY_DRAIN_S=str(DRAIN_S),
        GATEWAY_ADMIN_TOKEN="workers-test",
        GATEWAY_HEARTBEAT_S="0.2",
    )
    return subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "serve", *args], env=env, cwd=ROOT)


def up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def body(route: str, **extra: Any) -> dict[str, Any]:
    return {"model": route, "messages": [{"role": "user", "content": "Initech: won."}], **extra}


def read_stream(url: str, started: threading.Event) -> list[str]:
    text = ""
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body("stream", stream=True), timeout=30
    ) as r:
        for piece in r.iter_text():
            text += piece
            started.set()
    return [e for e in text.split("\n\n") if e]


def wait_draining(probe: httpx.Client) -> httpx.Response:
    deadline = time.monotonic() + 5
    while (ready := probe.get("/readyz")).status_code == 200:
        assert time.monotonic() < deadline, "the gateway did not start draining"
        time.sleep(0.02)
    return ready


def test_sigterm_drains_ends_streams_with_an_error_event_and_records_everything(
    tmp_path: Path, engine_url: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(tmp_path, engine_url, port)
    pool = ThreadPoolExecutor(3)
    try:
        wait_for(lambda: up(url), timeout=30)
        keep = httpx.Client(base_url=url, timeout=10)  # one keep-alive connection, reused
        probe = httpx.Client(base_url=url, timeout=10)  # another, to see when draining begins
        assert probe.get("/readyz").status_code == 200
        before = keep.post("/v1/chat/completions", json=body("fast"))
        assert before.status_code == 200 and before.headers.get("connection") != "close"
        started = threading.Event()
        stream = pool.submit(read_stream, url, started)
        unary = pool.submit(httpx.post, url + "/v1/chat/completions", json=body("unary"), timeout=30)
        slow = pool.submit(httpx.post, url + "/v1/chat/completions", json=body("slow"), timeout=30)
        assert started.wait(10)
        time.sleep(0.2)  # the unary requests reach the engine
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        ready = wait_draining(probe)  # the listener is closed now; keep-alive connections are still open
        assert (
            ready.status_code == 503 and ready.json()["draining"] and ready.headers["connection"] == "close"
        )
        during = keep.post("/v1/chat/completions", json=body("fast"))  # on the connection idle since before
        assert during.status_code == 200 and during.headers["connection"] == "close"
        with pytest.raises(httpx.ConnectError):  # a new connection is refused: the request was never sent
            httpx.post(url + "/v1/chat/completions", json=body("fast"), timeout=5)

        finished = unary.result()  # within the drain, on a connection that then closes
        assert finished.status_code == 200 and finished.headers["connection"] == "close"
        cut = slow.result()  # still running at the deadline: a clean 503 instead of a reset
        assert cut.status_code == 503 and cut.json()["error"]["code"] == "server_shutting_down"
        events = stream.result()
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert (error["type"], error["code"]) == ("server_error", "server_shutting_down")
        assert events[-1] == "data: [DONE]"
        proc.wait(timeout=DRAIN_S + 10)
        assert time.monotonic() - sent < DRAIN_S + 3
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = read_records(tmp_path / "var" / "requests.db")
    got = sorted((r.route, r.status, r.outcome, r.error_code) for r in records)
    assert got == [
        ("fast", 200, "ok", None),
        ("fast", 200, "ok", None),
        ("slow", 503, "server_shutdown", "server_shutting_down"),
        ("stream", 200, "server_shutdown", "server_shutting_down"),
        ("unary", 200, "ok", None),
    ]


def _worker_pids(url: str, n: int) -> set[int]:
    """The pids of the `n` live workers, once the status lists exactly that many."""
    auth = {"Authorization": "Bearer workers-test"}
    deadline = time.monotonic() + 30
    while True:
        replicas = httpx.get(url + "/admin/status", headers=auth, timeout=5).json()["replicas"]
        if len(replicas) == n:
            return {r["pid"] for r in replicas}
        assert time.monotonic() < deadline, f"never {n} workers: {replicas}"
        time.sleep(0.1)


def test_workers_share_the_port_a_dead_one_is_replaced_and_sigterm_drains_them_all(
    tmp_path: Path, engine_url: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(tmp_path, engine_url, port, "--workers", "2")
    sent = 0
    try:
        wait_for(lambda: up(url), timeout=60)
        first = _worker_pids(url, 2)
        assert proc.pid not in first
        os.kill(min(first), signal.SIGKILL)  # a worker dies; the other keeps serving meanwhile
        for _ in range(20):
            assert httpx.post(url + "/v1/chat/completions", json=body("fast"), timeout=10).status_code == 200
            sent += 1
        deadline = time.monotonic() + 30
        while min(first) in (replaced := _worker_pids(url, 2)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(replaced - first) == 1  # the dead one was started again; the other never stopped
        with ThreadPoolExecutor(1) as pool:
            unary = pool.submit(httpx.post, url + "/v1/chat/completions", json=body("unary"), timeout=30)
            time.sleep(0.3)  # it reaches the engine
            proc.send_signal(signal.SIGTERM)
            assert unary.result().status_code == 200  # answered during the drain
            sent += 1
        assert proc.wait(timeout=DRAIN_S + 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for pid in first | replaced:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    recorded = read_records(tmp_path / "var" / "requests.db")
    assert len([r for r in recorded if r.route in ("fast", "unary")]) == sent
