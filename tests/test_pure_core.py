"""The pure core imports nothing that does I/O: each module, imported alone in a fresh interpreter, must not
bring in the request log, the engine client, the servers or a database driver."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PURE = [
    "errors",
    "openai_types",
    "policy",
    "rewrite",
    "toolcalls",
    "sse",
    "relay",
    "pricing",
    "records",
    "pool",
    "report",
    "stats",
    "canary.spec",
    "canary.stats",
    "canary.machine",
    "canary.analysis",
    "canary.paired",
    "shadow.pairs",
    "shadow.overrides",
    "store.api",
    "console.session",
    "console.figures",
    "console.trajectory",
    "console.charts",
    "console.html",
    "console.pages",
    "console.canary_page",
    "console.shadow_page",
    "console.history_pages",
]
# Top-level modules that mean I/O: SQLite, threads and queues (the request log's writer), event loops, HTTP
# clients and servers, OTel exporters; and the gateway's own I/O modules.
IO = ("sqlite3", "threading", "queue", "asyncio", "aiohttp", "httpx", "starlette", "uvicorn", "opentelemetry")
IO_GATEWAY = (
    "engine",
    "store.state",
    "store.request_log",
    "store.sqlite",
    "telemetry",
    "proxy",
    "app",
    "control",
    "retrieval",
    "admin",
)

PROBE = """
import importlib, sys
importlib.import_module(sys.argv[1])
print("\\n".join(sorted(sys.modules)))
"""


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_nothing_that_does_io(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, f"gateway.{module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    loaded = set(out)
    forbidden = {m for m in IO if m in loaded} | {
        m for m in loaded for io in IO_GATEWAY if m == f"gateway.{io}" or m.startswith(f"gateway.{io}.")
    }
    assert not forbidden, f"gateway.{module} imports {sorted(forbidden)}"
