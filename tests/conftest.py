"""Shared fixtures: a real simulated engine process, and gateways in two tiers in front of it.

- In process (`make_app_gateway`): the ASGI app object itself, no socket, no server. For request and response
  behaviour: status codes, bodies, headers, streams read to their end, records, admin answers, routing.
- On a real port (`make_gateway`): the app served by uvicorn on a loopback port. For what only a server shows:
  uvicorn itself, clients that hang up mid-stream or mid-upload or give up (client timeouts), keep-alive,
  shutdown and drain, and `gateway` subprocesses (the CLI, a second gateway process) that reach it by URL.

The in-process tier is `httpx.ASGITransport` behind a synchronous `httpx.Client` (`AppTransport`): the tests,
the `openai` SDK (`http_client=`) and the threads that put load on a gateway are synchronous, and use the same
client API in either tier. Each request runs on the event loop of a blocking portal, where the app's lifespan
(record writer, engine sessions, background tasks) runs for as long as the gateway does. Not Starlette's
`TestClient`: it hands the response over through an unbuffered channel, so a client that stops reading (the
`openai` SDK raising on an SSE error event) cancels the app's request, where a server would have taken the
whole response into its socket buffers and let the request end on its own. Here the app always runs to its
end, its record submitted, before the client gets the whole response. The transport ignores client timeouts,
so each request has a deadline (`AppTransport.deadline_s`): a hung request fails its test, not the suite.

Both tiers talk HTTP with real clients (the `openai` SDK, httpx), so what a test sees is what a product
service sees; the simulated engine is a real process on a loopback port in both. Each gateway gets its own
policies directory, keys file and data directory under `tmp_path`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import openai
import pytest
import uvicorn
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings as hypothesis_settings

from gateway.app import GatewayASGI, create_app
from gateway.devtools import sim_engine
from gateway.devtools.postgres import PostgresServer
from gateway.settings import Settings
from gateway.store.request_log import read_records

# No per-example deadline: CI shares two cores with engine processes, and a slow example is not a failure.
hypothesis_settings.register_profile("gateway", deadline=None)
hypothesis_settings.load_profile("gateway")

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token"
CLIENT_TOKEN = "sk-test-crm-service"
FORCER_TOKEN = "sk-test-loadtest"
APP_URL = "http://gateway"  # the in-process tier's gateway: no socket behind it
G = TypeVar("G", bound="Gateway")

CRM_POLICY = """
route = "crm-assistant"
sticky = "header:x-user-id"
tool_calls = "annotate"
fallback = ["baseline"]

[variants.baseline]
model = "crm-base"
engine = "default"
system_prompt = "You update the CRM by calling the update_crm tool."
weight = 90
price = { input_per_mtok = 0.40, output_per_mtok = 1.20, currency = "EUR" }

[variants.formatter]
model = "crm-formatter"
weight = 10
price = { input_per_mtok = 0.30, output_per_mtok = 0.90, currency = "EUR" }
"""

UPDATE_CRM = {
    "type": "function",
    "function": {
        "name": "update_crm",
        "description": "Update an account in the CRM.",
        "parameters": {
            "type": "object",
            "properties": {
                "account": {"type": "string", "minLength": 1},
                "stage": {"type": "string", "enum": ["lead", "qualified", "proposal", "won", "lost"]},
                "amount": {"type": "number", "minimum": 0},
                "close_date": {"type": "string", "format": "date"},
            },
            "required": ["account", "stage", "amount"],
            "additionalProperties": False,
        },
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def engine_models(url: str) -> set[str]:
    """The model names an engine (simulated or vLLM) serves now: its base model and loaded adapters."""
    return {card["id"] for card in httpx.get(url + "/v1/models", timeout=10).json()["data"]}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@contextlib.contextmanager
def running_sim_engine(behaviour: Path) -> Iterator[str]:
    """A real simulated-engine process with `behaviour`, for as long as the block runs; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(sim_engine.command(port, behaviour))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class SimEngineProcess:
    """A simulated engine in a process of a test's own, on a port of its own, so that the test can stop, kill and
    start it again there (a restarted engine has forgotten the adapters it had loaded)."""

    def __init__(self, behaviour: Path = ROOT / "tests" / "data" / "sim_engine.toml") -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = sim_engine.command(port, behaviour)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd)
        _wait_http(self.url + "/health")

    def stop(self) -> None:
        """SIGTERM: the engine finishes what it is answering, then exits."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: the engine is gone at once, connections and all."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stats(self) -> dict[str, Any]:
        """The engine's counters (`GET /sim/stats`): requests per model, adapter loads, injected errors."""
        stats: dict[str, Any] = httpx.get(self.url + "/sim/stats", timeout=10).json()
        return stats


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real Postgres server, shared by the session (started on first use); `postgres.new_database()` gives
    each test a database of its own."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
        server.remove()


@pytest.fixture(scope="session")
def sim_engine_url() -> Iterator[str]:
    """A real simulated-engine process, shared by the session."""
    with running_sim_engine(ROOT / "tests" / "data" / "sim_engine.toml") as url:
        yield url


@dataclass
class Gateway(abc.ABC):
    """A test's handle on one gateway, in either tier: its URL, its settings, the app object (to look
    inside) and `http`, an HTTP client whose relative paths go to the gateway (`gw.http.get("/healthz")`)."""

    url: str
    settings: Settings
    app: GatewayASGI
    http: httpx.Client

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def records(self, **kwargs: Any) -> list[Any]:
        """Every record so far, once the requests and shadow copies in flight have submitted theirs (a reply can
        reach the client a moment before its request's record is queued)."""
        deadline = time.monotonic() + 5
        while (
            self.app.chat.inflight or self.app.components.shadows.inflight
        ) and time.monotonic() < deadline:
            time.sleep(0.002)
        self.app.components.records.flush()
        return read_records(self.app.components.records.where, **kwargs)

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving: the lifespan's shutdown runs (the request log is flushed and closed). Idempotent."""


@dataclass
class RunningGateway(Gateway):
    """Served by uvicorn on a loopback port, in a thread of this process."""

    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.http.close()


@dataclass
class InProcessGateway(Gateway):
    """The app object driven through `AppTransport`; `stack` holds its portal, lifespan and client."""

    stack: contextlib.ExitStack

    def stop(self) -> None:
        self.stack.close()


class AppTransport(httpx.BaseTransport):
    """httpx's ASGI transport for a synchronous client: each request runs on `portal`'s event loop, the one
    the app's lifespan runs on, and its response is returned whole, once the app has finished with it."""

    deadline_s = 30.0

    def __init__(self, app: GatewayASGI, portal: BlockingPortal) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._portal.call(self._handle, request)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        with anyio.fail_after(self.deadline_s):
            response = await self._asgi.handle_async_request(request)
            body = await response.aread()
        # A stream, not `content=`, which would add a Content-Length header the app did not send.
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(body))


def write_keys(path: Path) -> Path:
    def entry(name: str, token: str, routes: str, force: bool) -> str:
        digest = hashlib.sha256(token.encode()).hexdigest()
        return (
            f'[keys.{name}]\nsha256 = "{digest}"\ntenant = "acme"\nroutes = {routes}\n'
            f"can_force_variant = {'true' if force else 'false'}\n"
        )

    path.write_text(
        entry("crm-service", CLIENT_TOKEN, '["crm-assistant"]', False)
        + entry("loadtest", FORCER_TOKEN, '["*"]', True)
    )
    return path


def serve_in_thread(app: Any, what: str, **config: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    """`app` served by uvicorn on a free loopback port in a daemon thread, once it has started; its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def start_gateway(settings: Settings, **app_kwargs: Any) -> RunningGateway:
    app = create_app(settings, **app_kwargs)
    server, thread, url = serve_in_thread(app, "gateway", loop="asyncio", http="httptools", lifespan="on")
    return RunningGateway(url, settings, app, httpx.Client(base_url=url, timeout=10.0), server, thread)


def start_app_gateway(settings: Settings, **app_kwargs: Any) -> InProcessGateway:
    """The gateway app for `settings` (and `create_app`'s other arguments), in process, its lifespan started."""
    app = create_app(settings, **app_kwargs)
    with contextlib.ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal())
        stack.enter_context(
            portal.wrap_async_context_manager(app.starlette.router.lifespan_context(app.starlette))
        )
        http = stack.enter_context(httpx.Client(transport=AppTransport(app, portal), base_url=APP_URL))
        gateway = InProcessGateway(APP_URL, settings, app, http, stack.pop_all())
    return gateway


def sdk_client(gw: Gateway, token: str = CLIENT_TOKEN, **kwargs: Any) -> openai.OpenAI:
    """The `openai` SDK pointed at `gw`, without retries: a test sees each answer as the gateway gave it.
    In process it sends through `gw.http`; to a real port through an HTTP client of its own, as a product
    service's does."""
    http_client = gw.http if isinstance(gw, InProcessGateway) else None
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=token, max_retries=0, http_client=http_client, **kwargs
    )


def sse_events(gw: Gateway, body: dict[str, Any], token: str = CLIENT_TOKEN) -> list[str]:
    """A chat stream's events as the client receives them, in order (comments included, separators not)."""
    with gw.http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as r:
        return [e for e in "".join(r.iter_text()).split("\n\n") if e]


GatewayFactory = Callable[..., RunningGateway]
AppGatewayFactory = Callable[..., InProcessGateway]


def _factory(
    tmp_path: Path, engine_url: str, start: Callable[[Settings], G], started: list[G]
) -> Callable[..., G]:
    """`factory(policies={"crm.toml": text}, **settings)`: writes the policies, keys and settings under
    `tmp_path`, in front of `engine_url`, and starts a gateway with `start`."""

    def factory(policies: dict[str, str] | None = None, **overrides: Any) -> G:
        policy_dir = tmp_path / "policies"
        policy_dir.mkdir(exist_ok=True)
        for name, text in (policies if policies is not None else {"crm-assistant.toml": CRM_POLICY}).items():
            (policy_dir / name).write_text(text)
        values: dict[str, Any] = {
            "policies_dir": policy_dir,
            "engines": {"default": engine_url},
            "data_dir": tmp_path / "var",
            "admin_token": ADMIN_TOKEN,
            "keys_file": write_keys(tmp_path / "keys.toml"),
        }
        # Settings ignores unknown names: a misspelt one here would silently test the default instead.
        unknown = sorted(set(overrides) - set(Settings.model_fields))
        if unknown:
            raise TypeError(f"not settings: {unknown}")
        values.update(overrides)
        gateway = start(Settings(**values))
        started.append(gateway)
        return gateway

    return factory


@pytest.fixture
def make_gateway(tmp_path: Path, sim_engine_url: str) -> Iterator[GatewayFactory]:
    """Start a gateway on a real port in front of the simulated engine:
    `make_gateway(policies={"crm.toml": text}, **settings)`."""
    started: list[RunningGateway] = []
    yield _factory(tmp_path, sim_engine_url, start_gateway, started)
    for gateway in started:
        gateway.stop()


@pytest.fixture
def make_app_gateway(tmp_path: Path, sim_engine_url: str) -> Iterator[AppGatewayFactory]:
    """Start an in-process gateway in front of the simulated engine:
    `make_app_gateway(policies={"crm.toml": text}, **settings)`."""
    started: list[InProcessGateway] = []
    yield _factory(tmp_path, sim_engine_url, start_app_gateway, started)
    for gateway in started:
        gateway.stop()
