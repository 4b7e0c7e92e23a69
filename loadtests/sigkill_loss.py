"""How many records a replica loses when it is SIGKILLed under load (no drain): the ones still in memory, waiting
for the writer's next flush (`interval_s`, 0.2 s). Starts Postgres, a simulated engine and `gateway serve`, sends
requests from a few threads, kills the gateway with SIGKILL mid-load, and compares the answers the clients got
with the records in Postgres.

    .venv/bin/python loadtests/sigkill_loss.py [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.devtools import sim_engine
from gateway.devtools.postgres import PostgresServer, free_port
from gateway.store.request_log import read_records

ROOT = Path(__file__).resolve().parents[1]
POLICY = 'route = "r"\n[variants.only]\nmodel = "crm-base"\nweight = 1\n'


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def one_round(server: PostgresServer, engine_url: str, seconds: float, tmp: Path) -> tuple[int, int, float]:
    """(answers the clients got, records stored, requests per second)."""
    database, port = server.new_database(), free_port()
    (tmp / "policies").mkdir(exist_ok=True)
    (tmp / "policies" / "r.toml").write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATABASE_URL=database,
        GATEWAY_POLICIES_DIR=str(tmp / "policies"),
        GATEWAY_ENGINES=json.dumps({"default": engine_url}),
        GATEWAY_DATA_DIR=str(tmp / f"var-{port}"),
        GATEWAY_AUTH="off",
        GATEWAY_PORT=str(port),
    )
    gateway = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _up(url):
        if time.monotonic() > deadline:
            raise SystemExit("the gateway did not start")
        time.sleep(0.1)
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        body = {"model": "r", "messages": [{"role": "user", "content": "Initech: won."}]}
        with httpx.Client(base_url=url, timeout=5) as client:
            while not stop.is_set():
                try:
                    if client.post("/v1/chat/completions", json=body).status_code == 200:
                        answered[0] += 1
                except httpx.HTTPError:
                    return  # the gateway is gone

    threads = [threading.Thread(target=load) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    gateway.send_signal(signal.SIGKILL)
    elapsed = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    gateway.wait()
    return answered[0], len(read_records(database)), answered[0] / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    server = PostgresServer().start()
    engine_port = free_port()
    engine = subprocess.Popen(sim_engine.command(engine_port, ROOT / "tests" / "data" / "sim_engine.toml"))
    try:
        with tempfile.TemporaryDirectory(prefix="sigkill-") as tmp:
            time.sleep(1.0)
            for i in range(args.rounds):
                answered, stored, rps = one_round(
                    server, f"http://127.0.0.1:{engine_port}", args.seconds, Path(tmp)
                )
                lost = answered - stored
                print(
                    f"round {i + 1}: {answered} answered, {stored} recorded: {lost} lost"
                    f" ({lost / rps * 1000:.0f} ms of traffic at {rps:.0f} req/s)"
                )
    finally:
        engine.terminate()
        engine.wait()
        server.stop()
        server.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
