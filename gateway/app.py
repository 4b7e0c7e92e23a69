"""Composes the gateway: `create_app(settings)` builds every component, checks the configuration, and returns the
ASGI application whose lifespan starts and stops them.

Configuration is checked before anything listens: a bad policy, a missing keys file (with authentication on) or an
unknown engine raises `ConfigError` from `create_app`, so `gateway serve` refuses to start with a clear message.
Resources that need the event loop (engine sessions, the switch watcher) start in the lifespan and close there; the
request log is flushed on shutdown.

`POST /v1/chat/completions` is dispatched by a thin ASGI front (`GatewayASGI`) straight to the chat endpoint; every
other path goes through Starlette's router, middleware and exception handlers, where per-request cost matters less.

Graceful shutdown (`Drain`, driven by `DrainingServer` under `gateway serve`): uvicorn runs the lifespan's shutdown
only after connections have drained, so the drain starts from uvicorn's own shutdown step instead. From then on
every response carries `Connection: close`, `/readyz` answers 503, keep-alive connections get a moment to bring a
last request, and at the deadline (`GATEWAY_DRAIN_S`) the requests still running are ended by the gateway itself,
and so are the shadow copies still running (`shadow.copies`; the lifespan's shutdown waits for their records).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.admin.canary import canary_routes
from gateway.admin.http import AdminContext, check_bearer, error_response, json_response
from gateway.admin.routes import admin_routes
from gateway.admin.shadow import shadow_routes
from gateway.canary.controller import CanaryController
from gateway.console.routes import console_routes
from gateway.control.adapters import scan
from gateway.control.live import LiveView
from gateway.control.lora import LoraManager
from gateway.control.operations import Operations
from gateway.control.policies import load_configured
from gateway.drain import Drain
from gateway.engine import EnginePool
from gateway.errors import ConfigError, GatewayError, NotFound, PermissionDenied, RouterRefused
from gateway.health import StoreHealth
from gateway.keys import KeyRing
from gateway.policy import PolicySnapshot, served_adapters, switches_digest
from gateway.pool import pool_ready
from gateway.proxy import ChatEndpoint, Deps
from gateway.settings import Settings
from gateway.shadow.copies import ShadowCopies
from gateway.store.api import Replica, StateStore, StoreError
from gateway.store.request_log import RecordWriter, Where
from gateway.store.state import open_postgres, open_sqlite
from gateway.telemetry import PROMETHEUS_CONTENT_TYPE, Telemetry
from gateway.toolcalls import SchemaCache

log = logging.getLogger("gateway")
CHAT_PATH = "/v1/chat/completions"


class GatewayASGI:
    """The chat endpoint on a direct path; everything else (lifespan included) through Starlette."""

    def __init__(self, chat: ChatEndpoint, starlette: Starlette, components: Components) -> None:
        self.chat = chat
        self.starlette = starlette
        self.components = components
        self._drain = components.drain

    def begin_drain(self) -> None:
        """Shutdown has begun: see `Drain`. At the deadline, the chat requests and shadow copies still running are
        ended."""
        self._drain.begin(self._cut_off)

    def _cut_off(self) -> None:
        try:
            self.chat.cut_off()
        finally:
            self.components.shadows.cut_off()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            await self.chat(scope, receive, send)
        elif scope["type"] == "http":
            await self.starlette(scope, receive, _closing(send, self._drain))
        else:
            await self.starlette(scope, receive, send)


def _closing(send: Callable[[Any], Awaitable[None]], drain: Drain) -> Callable[[Any], Awaitable[None]]:
    """`send` with `Connection: close` on a response that starts while draining: the client will not reuse a
    connection about to close. (The chat endpoint adds it itself, off this extra layer.)"""

    async def closing(message: Any) -> None:
        if message["type"] == "http.response.start" and drain.draining:
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await send(message)

    return closing


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the gateway's drain in front of its shutdown. uvicorn closes idle keep-alive
    connections at once, under any request a client is sending on one just then (a reset, and no record);
    here the listener closes first, the drain begins, and idle connections get `keep_alive_grace_s` to bring a
    last request, answered with `Connection: close`. Set `timeout_graceful_shutdown` above `Drain.seconds`: the
    gateway ends its requests at its own deadline, uvicorn's only cancels what is left after that."""

    def __init__(self, config: uvicorn.Config, app: GatewayASGI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: Any = None) -> None:
        for server in self.servers:
            server.close()  # no new connections from now on (uvicorn closes them again: idempotent)
        self._app.begin_drain()
        # uvicorn offers no event for "no connection left": poll its set, as its own shutdown does.
        for _ in range(math.ceil(self._app.components.drain.keep_alive_grace_s / 0.05)):
            if not self.server_state.connections or self.force_exit:
                break
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)


class Components:
    """Everything the app owns, built synchronously (so configuration errors surface before serving)."""

    def __init__(
        self, settings: Settings, *, engines: EnginePool | None, telemetry: Telemetry | None
    ) -> None:
        self.settings = settings
        self.keys = _load_keys(settings)
        policy = self.load_policy()
        self.state = _open_state(settings)
        self.live = LiveView(
            policy,
            self.state.switches(),
            self.state.pins(),
            self.state.canary_states(),
            self.state.shadow_overrides(),
            self.state.ended_sessions(),
        )
        self.canary = CanaryController(self.state, self.live, _records_where(settings))
        self.state.note_served(served_adapters(self.live.view.policy), actor="gateway", action="start")
        self.engines = engines or EnginePool(
            settings.engine_pools, connections=settings.engine_connections, health=settings.engine_health
        )
        self.telemetry = telemetry or Telemetry(otlp_endpoint=settings.otlp_endpoint)
        self.records = RecordWriter(
            _records_where(settings),
            spill_dir=settings.data_dir / "spill",
            memory_max=settings.records_memory_max,
            retention_days=settings.records_retention_days,
        )
        self.store_health = StoreHealth()
        self.drain = Drain(settings.drain_s)
        self.schemas = SchemaCache(
            max_bytes=settings.schema_cache_bytes, max_schema_bytes=settings.max_schema_bytes
        )
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.started_at = time.time()
        self.counters: Counter[tuple[str, str, str, str]] = Counter()
        self.engine_inflight: Counter[str] = Counter()  # requests in flight per engine model (adapter ref)
        self.shadows = ShadowCopies(
            engines=self.engines,
            schemas=self.schemas,
            records=self.records,
            telemetry=self.telemetry,
            engine_inflight=self.engine_inflight,
        )
        self.lora = LoraManager(
            self.engines.pools,
            catalog=lambda: self.catalog,
            state=self.state,
            inflight=self.engine_inflight,
            max_lora_rank=settings.max_lora_rank,
            # Unreferenced by every replica for three reconcile rounds before it is unloaded: long enough for a
            # change another replica loaded for to be published and heard.
            unload_grace_s=3 * settings.reconcile_s,
        )
        self.ops = Operations(
            self.live,
            self.state,
            self.canary,
            reload=self.load_policy,
            prepare=self.lora.ensure,
            catalog=lambda: self.catalog,
        )

    def load_policy(self) -> PolicySnapshot:
        """Rescan the adapter catalog, then load policies against it (blocking: run it in a thread)."""
        self.catalog = scan(self.settings.adapters_dir)
        return load_configured(self.settings, self.catalog)

    async def start(self) -> None:
        self.records.start()
        await self.engines.start()

    async def close(self) -> None:
        self.drain.close()
        await self.lora.close()
        await self.engines.close()
        self.canary.close()
        self.records.close()
        self.telemetry.shutdown()
        self.state.close()


def _open_state(settings: Settings) -> StateStore:
    if settings.database_url is None:
        return open_sqlite(settings.state_db)
    try:
        return open_postgres(settings.database_url.get_secret_value(), poll_s=settings.state_poll_s)
    except (StoreError, OSError, ImportError) as err:
        raise ConfigError(f"GATEWAY_DATABASE_URL: cannot open the state database: {err}") from None


def _records_where(settings: Settings) -> Where:
    """The request log: in the shared database when there is one, else in the data directory's `requests.db`."""
    return settings.database_url.get_secret_value() if settings.database_url else settings.records_db


def _load_keys(settings: Settings) -> KeyRing | None:
    if settings.auth == "off":
        log.warning("client authentication is OFF (GATEWAY_AUTH=off): every caller may use every route")
        return None
    if settings.keys_file is None:
        raise ConfigError(
            "No client keys: set GATEWAY_KEYS_FILE to a keys file, or GATEWAY_AUTH=off to run without authentication."
        )
    return KeyRing.load(settings.keys_file)


def create_app(
    settings: Settings,
    *,
    engines: EnginePool | None = None,
    telemetry: Telemetry | None = None,
    draw: Callable[[], float] | None = None,
) -> GatewayASGI:
    c = Components(settings, engines=engines, telemetry=telemetry)
    deps = Deps(
        live=c.live,
        keys=c.keys,
        engines=c.engines,
        schemas=c.schemas,
        records=c.records,
        telemetry=c.telemetry,
        max_body_bytes=settings.max_body_bytes,
        unsupported_fields=frozenset(settings.unsupported_fields),
        log_engine_errors=settings.log_engine_errors,
        drain=c.drain,
        counters=c.counters,
        engine_inflight=c.engine_inflight,
        shadows=c.shadows,
        **({"draw": draw} if draw is not None else {}),
    )
    admin = AdminContext(
        token=settings.admin_token.get_secret_value() if settings.admin_token else None,
        ops=c.ops,
        counters=c.counters,
        catalog=lambda: c.catalog,
        records=_records_where(settings),
        replica_id=c.replica_id,
        replica_window_s=3 * settings.heartbeat_s,
        engines=c.engines.status,
        shadow_in_flight=c.shadows.running,
        viewer_token=settings.viewer_token.get_secret_value() if settings.viewer_token else None,
    )
    chat = ChatEndpoint(deps)
    starlette = Starlette(
        # The chat route is listed here too so that other methods on its path get a 405 from the router.
        routes=[
            Route(CHAT_PATH, chat, methods=["POST"]),
            *_routes(c),
            *admin_routes(admin),
            *canary_routes(admin),
            *shadow_routes(admin),
            *console_routes(settings, admin),
        ],
        exception_handlers={
            GatewayError: _on_gateway_error,
            HTTPException: _on_http_error,
            Exception: _on_bug,
        },
        lifespan=_lifespan(c),
    )
    return GatewayASGI(chat, starlette, c)


def _lifespan(c: Components) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await c.start()
        tasks = [
            asyncio.create_task(_watch_switches(c)),
            asyncio.create_task(_reconcile_adapters(c)),
            asyncio.create_task(_run_canaries(c)),
            asyncio.create_task(_heartbeat(c)),
            asyncio.create_task(_probe_engines(c)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Before the request log closes: the copies still running get what is left of the drain deadline.
            await c.shadows.close(c.drain.remaining())
            await c.close()

    return lifespan


async def _watch_switches(c: Components) -> None:
    """Pick up flips made by another gateway process sharing the state database. The poll runs on the loop:
    through a thread it cost ~18 ms of CPU a second at a 50 ms period (overhead benchmark)."""
    seen = c.state.data_version()
    while True:
        await asyncio.sleep(c.settings.switch_poll_s)
        try:
            version = c.state.data_version()
            if version != seen:
                seen = version
                await c.ops.sync()
        except Exception:  # a locked or unreadable file must not stop the watcher
            log.exception("reading kill switches failed; retrying")


async def _run_canaries(c: Components) -> None:
    """Look at every canary each `canary_interval_s`; a decision is published to this process's live view at
    once (a kill applies to the next request), and reaches other processes through `_watch_switches`."""
    while True:
        await asyncio.sleep(c.settings.canary_interval_s)
        try:
            await c.ops.canary_tick()
        except Exception:  # a locked or unreadable file must not stop the canaries
            log.exception("canary look failed; retrying")


async def _heartbeat(c: Components) -> None:
    """Record every `heartbeat_s` that this replica is alive and what it serves; its row goes when it stops."""
    try:
        while True:
            view = c.live.view
            replica = Replica(
                c.replica_id,
                socket.gethostname(),
                os.getpid(),
                c.started_at,
                view.policy.version,
                switches_digest(view.switches),
                time.time(),
                tuple(sorted(set(served_adapters(view.policy).values()))),
            )
            try:
                await asyncio.to_thread(c.state.heartbeat, replica)
            except Exception as err:  # a store that is away must not stop the heartbeat
                if c.store_health.up:
                    log.warning(
                        "the store did not answer the heartbeat: degraded until it does", exc_info=True
                    )
                c.store_health.failed(str(err).strip() or type(err).__name__, time.time())
            else:
                c.store_health.answered(time.time())
            await asyncio.sleep(c.settings.heartbeat_s)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(c.state.leave, c.replica_id)


async def _referenced_elsewhere(c: Components) -> set[str] | None:
    """The adapter versions the other live replicas reference; None when the store cannot say (then nothing is
    unloaded: another replica may be serving what this one no longer needs)."""
    try:
        live = await asyncio.to_thread(c.state.replicas, time.time() - 3 * c.settings.heartbeat_s)
    except Exception:
        return None
    return {ref for r in live if r.id != c.replica_id for ref in r.adapters}


async def _reconcile_adapters(c: Components) -> None:
    """Load what the live policy references (at start-up too: the engine may come up after the gateway, and
    until then requests for an adapter fall back), reload what an engine lost, unload what nothing uses."""
    while True:
        try:
            elsewhere = await _referenced_elsewhere(c)
            async with c.ops.lock:
                await c.lora.reconcile(c.live.view.policy, elsewhere)
        except Exception:
            log.exception("adapter reconcile failed; retrying")
        await asyncio.sleep(c.settings.reconcile_s)


async def _probe_engines(c: Components) -> None:
    """Probe the pool members' `/health` when due: an ejected member's once its backoff ends (it is readmitted or
    ejected for longer), every member's each `GATEWAY_ENGINE_PROBE_S`."""
    while True:
        await c.engines.until_probe_due()
        try:
            await c.engines.probe()
        except Exception:
            log.exception("engine health probe failed; retrying")


def _routes(c: Components) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        return await _readiness(c)

    async def models(request: Request) -> Response:
        return _models(c, request)

    async def metrics(request: Request) -> Response:
        _authorize_metrics(c.settings, request)
        return Response(c.telemetry.prometheus_text() + _state_gauges(c), media_type=PROMETHEUS_CONTENT_TYPE)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def _authorize_metrics(settings: Settings, request: Request) -> None:
    """GATEWAY_METRICS_AUTH=on: the metrics token or the admin token, as a bearer token."""
    if settings.metrics_auth == "off":
        return
    tokens = [t.get_secret_value() for t in (settings.metrics_token, settings.admin_token) if t is not None]
    if not tokens:
        raise PermissionDenied(
            "/metrics needs a token: set GATEWAY_METRICS_TOKEN (or GATEWAY_ADMIN_TOKEN), "
            "or GATEWAY_METRICS_AUTH=off to serve it without one."
        )
    check_bearer(request, tokens, where="/metrics", token="metrics or admin token")


def _state_gauges(c: Components) -> bytes:
    """The process's own state, beside the per-request metrics: the store's health and the records waiting."""
    gauges = (
        (
            "gateway_store_up",
            "Whether the store answered the last heartbeat (1) or not (0).",
            int(c.store_health.up),
        ),
        ("gateway_records_pending", "Records waiting in memory for the request log.", c.records.pending),
        (
            "gateway_records_spilled",
            "Records in spill files, waiting for the request log.",
            c.records.spilled,
        ),
    )
    lines = [f"# HELP {name} {text}\n# TYPE {name} gauge\n{name} {value}\n" for name, text, value in gauges]
    return "".join(lines).encode()


async def _readiness(c: Components) -> Response:
    view = c.live.view
    status = c.engines.status()
    checks = [
        c.engines.member_ready(name, i) for name, members in status.items() for i in range(len(members))
    ]
    answers = iter(await asyncio.gather(*checks))
    for members in status.values():
        for member in members:
            member["ready"] = next(answers)
    engines = {name: pool_ready([m["ready"] for m in members]) for name, members in status.items()}
    draining = c.drain.draining  # a load balancer should stop sending new requests here
    ready = bool(view.policy.routes) and all(v == "ok" for v in engines.values()) and not draining
    health = c.store_health
    body = {
        "ready": ready,
        "draining": draining,
        # Degraded, still ready: requests are served on the last known state while the store is away.
        "degraded": not health.up,
        "store": "ok" if health.up else f"unreachable since {health.since:.0f}: {health.error}",
        "policy_version": view.policy.version,
        "routes": len(view.policy.routes),
        "engines": engines,
        "members": status,
    }
    return json_response(body, 200 if ready else 503)


def _models(c: Components, request: Request) -> Response:
    if c.keys is not None:
        key = c.keys.authenticate(request.headers.get("authorization"))
        allowed = [r for r in c.live.view.policy.routes if key.may_use(r)]
    else:
        allowed = list(c.live.view.policy.routes)
    created = int(time.time())
    data = [{"id": r, "object": "model", "created": created, "owned_by": "gateway"} for r in sorted(allowed)]
    return json_response({"object": "list", "data": data})


async def _on_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"No such endpoint: {request.method} {request.url.path}"))
    return error_response(RouterRefused(exc.status_code, str(exc.detail)))


async def _on_bug(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(GatewayError("The gateway failed to handle this request."))
