"""The request path, in one place: read, authenticate, parse, decide, rewrite, send, check, record.

`ChatEndpoint` is a plain ASGI callable (mounted in the Starlette app for `POST /v1/chat/completions`): on this
path Starlette's Request/Response layers are a measurable share of the CPU per request (README, "Dependency
choices"), and a plain callable also lets a stream be relayed event by event as it arrives.

Every request gets exactly one `Record`, written in `finally`, whatever the exit: success, a client error, an engine
failure, a client that hung up, a stream that broke mid-way, or a bug (which answers a clean 500 envelope and logs
the traceback). Errors before the response started are sent as a status and OpenAI's envelope; after a stream
started, as an SSE error event. A failure before the engine's first byte is tried once more on another member of the
engine's pool (`engine`), then falls back once to the route's first live fallback variant.

A route with a `[shadow]` hands each request, once routed, to `shadow.copies`, which decides and sends the copy on
a task of its own: nothing it does reaches this request's answer, headers or record. Without one, the only cost is
the `plan.shadow is not None` test.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway import relay, sse
from gateway.control.live import LiveView
from gateway.drain import Drain
from gateway.engine import EnginePool, EngineResponse, read_json
from gateway.errors import (
    BadRequest,
    ClientDisconnected,
    EngineError,
    EngineRejected,
    GatewayError,
    InvalidToolCall,
    PayloadTooLarge,
    PermissionDenied,
    ServerShuttingDown,
)
from gateway.keys import ANONYMOUS, ApiKey, KeyRing, route_not_found
from gateway.openai_types import ChatRequest, parse_chat_request
from gateway.policy import Decision, Plan, Route, Variant, bucket
from gateway.records import Record
from gateway.rewrite import engine_body
from gateway.shadow.copies import ShadowCopies
from gateway.store.api import RequestLog
from gateway.telemetry import Telemetry
from gateway.toolcalls import (
    NO_VERDICT,
    Completion,
    Expectation,
    SchemaCache,
    Verdict,
    check,
    completions_from_response,
    expectation_from_request,
)

log = logging.getLogger("gateway.proxy")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass(slots=True)
class Exchange:
    """One request's mutable context while it is in flight."""

    rec: Record
    t0: float
    send: Send
    headers: dict[bytes, bytes] = field(default_factory=dict)
    engine_models: list[str] = field(default_factory=list)  # counted in Deps.engine_inflight until the end
    started: bool = False  # response headers sent: errors must now go in-band
    disconnected: bool = False
    shutting_down: bool = False  # the drain deadline came: the gateway cancelled this request itself
    response: EngineResponse | None = None
    task: asyncio.Task[Any] | None = None

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        rec = self.rec
        out = [(b"x-request-id", rec.request_id.encode())]
        if rec.route:
            out.append((b"x-gateway-route", rec.route.encode()))
        if rec.variant:
            out.append((b"x-gateway-variant", rec.variant.encode()))
        if rec.policy_version:
            out.append((b"x-gateway-policy-version", rec.policy_version.encode()))
        return out


@dataclass(frozen=True, slots=True)
class Deps:
    live: LiveView
    keys: KeyRing | None  # None: authentication is off
    engines: EnginePool
    schemas: SchemaCache
    records: RequestLog
    telemetry: Telemetry
    max_body_bytes: int
    # Request fields refused with a 400 before any engine sees them (GATEWAY_UNSUPPORTED_FIELDS).
    unsupported_fields: frozenset[str] = frozenset()
    # Engine error text may echo the prompt: it reaches logs only when the operator asks (GATEWAY_LOG_ENGINE_ERRORS),
    # and the request log never (it keeps the gateway's own classification).
    log_engine_errors: bool = False
    drain: Drain = field(default_factory=lambda: Drain(30.0))  # shutdown: responses carry `Connection: close`
    counters: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)  # live, for /admin/status
    # Requests in flight per engine model: an adapter version is unloaded only once its count is back to zero.
    engine_inflight: Counter[str] = field(default_factory=Counter)
    clock: Callable[[], float] = time.perf_counter
    wallclock: Callable[[], float] = time.time
    draw: Callable[[], float] = random.random
    shadows: ShadowCopies | None = None  # sends the copies of routes with a `[shadow]`


def _refuse_unsupported(body: dict[str, Any], unsupported: frozenset[str]) -> None:
    for name in sorted(unsupported & body.keys()):
        raise BadRequest(
            f"'{name}' is not supported by this deployment's engines; send the request without it.",
            param=name,
            code="unsupported_parameter",
        )


class ChatEndpoint:
    def __init__(self, deps: Deps) -> None:
        self.d = deps
        # Requests between arrival and their record's submission (`inflight`), for the drain deadline (`cut_off`).
        self._running: dict[int, Exchange] = {}
        # Request ids: a random prefix per endpoint and a counter, unique without a syscall per request.
        self._id_prefix = os.urandom(7).hex()
        self._ids = itertools.count()

    @property
    def inflight(self) -> int:
        """Requests between arrival and their record's submission."""
        return len(self._running)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        d = self.d
        headers = dict(scope["headers"])
        request_id = _incoming_id(headers) or f"{self._id_prefix}{next(self._ids):010x}"
        x = Exchange(Record(ts=d.wallclock(), request_id=request_id), d.clock(), send, headers)
        x.task = asyncio.current_task()
        self._running[id(x)] = x
        try:
            await self._handle(x, scope, receive)
        except GatewayError as err:
            await self._fail(x, err)
        except asyncio.CancelledError:
            if not await self._cancelled(x):
                raise
        except Exception:
            log.exception("unhandled error in request %s", x.rec.request_id)
            await self._fail(x, GatewayError("The gateway failed to handle this request."))
        finally:
            try:
                self._finish(x)
            finally:
                del self._running[id(x)]

    async def _cancelled(self, x: Exchange) -> bool:
        """Whether a cancellation was the gateway's own (the disconnect watcher, the drain deadline), now
        handled; False: the server cancelled the request (uvicorn's own shutdown timeout), re-raise it."""
        if not (x.disconnected or x.shutting_down):
            _set_outcome(x.rec, ServerShuttingDown("The server shut down before the request finished."))
            return False
        if x.task is not None:
            x.task.uncancel()
        if x.disconnected:
            _set_outcome(x.rec, ClientDisconnected("client disconnected"))
        else:
            await self._fail(x, ServerShuttingDown("The server is shutting down; send the request again."))
        return True

    def cut_off(self) -> None:
        """The drain deadline: every request still running ends now, a stream with an SSE error event, any
        other with a 503, each with its record (`server_shutdown`)."""
        for x in list(self._running.values()):
            if x.task is not None and not x.shutting_down:
                x.shutting_down = True
                x.task.cancel()

    async def _handle(self, x: Exchange, scope: Scope, receive: Receive) -> None:
        try:
            body = await _read_body(receive, x.headers, self.d.max_body_bytes)
        except ClientDisconnected as gone:  # hung up mid-upload: nobody to answer, and the record says so
            x.disconnected = True
            _set_outcome(x.rec, gone)
            return
        key = self._authenticate(x)
        req = parse_chat_request(body)
        if self.d.unsupported_fields:
            _refuse_unsupported(req.body, self.d.unsupported_fields)
        plan = self._plan_for(x, key, req)
        forced = self._forced(x, key)
        x.rec.forced = forced is not None
        decision = plan.decide(self._draw(x, plan.route, req), forced)
        exp = expectation_from_request(req.body, self.d.schemas)  # a bad or oversized schema: 400 here
        if plan.shadow is not None and forced is None and self.d.shadows is not None:
            # Routed, and about to be sent: the copy goes on its own task (it never raises here).
            self.d.shadows.offer(x.rec, req, plan.route, plan.shadow, decision.variant, exp)
        watch = _DisconnectWatch(receive, x)
        try:
            if req.stream:
                await self._stream(x, req, plan, decision, exp)
            else:
                await self._unary(x, req, plan, decision, exp)
        finally:
            watch.stop()
        if x.disconnected:  # the reply was complete, but the client had already gone
            _set_outcome(x.rec, ClientDisconnected("client disconnected"))

    # -- before the engine ------------------------------------------------------------------------------------

    def _authenticate(self, x: Exchange) -> ApiKey:
        keys = self.d.keys
        key = ANONYMOUS if keys is None else keys.authenticate(_header(x.headers, b"authorization"))
        x.rec.key_name, x.rec.tenant = key.name, key.tenant
        return key

    def _plan_for(self, x: Exchange, key: ApiKey, req: ChatRequest) -> Plan:
        view = self.d.live.view  # read once: this request sees one policy and one set of switches
        x.rec.policy_version = view.policy.version
        x.rec.stream = req.stream
        # Access first, and the same answer as for a route that does not exist: nothing (status, message or
        # x-gateway-route header) tells a key holder which routes they may not use exist.
        key.check_route(req.model)
        plan = view.plans.get(req.model)
        if plan is None:
            raise route_not_found(req.model)
        x.rec.route = req.model
        return plan

    def _forced(self, x: Exchange, key: ApiKey) -> str | None:
        forced = _header(x.headers, b"x-gateway-variant")
        if forced and not key.can_force_variant:
            raise PermissionDenied(
                f"API key {key.name!r} may not force a variant.", param="x-gateway-variant"
            )
        return forced or None

    def _draw(self, x: Exchange, route: Route, req: ChatRequest) -> float:
        sticky = route.sticky
        key: Any = None
        if sticky.source == "header":
            key = _header(x.headers, sticky.name.encode())
        elif sticky.source == "body":
            key = req.body.get(sticky.name)
        if isinstance(key, str) and key:
            x.rec.bucket = bucket(key, route.salt)  # the user, for the canary analysis (unit = "user")
            return x.rec.bucket
        return self.d.draw()  # no key: an independent draw per request

    async def _open(
        self, x: Exchange, req: ChatRequest, plan: Plan, variant: Variant
    ) -> tuple[Variant, EngineResponse]:
        """Send to the variant's engine; on a failure before the first byte, once to the route's fallback."""
        _assign(x.rec, variant, plan)
        try:
            response = await self._send_to(x, req, plan, variant)
        except EngineError as err:
            fallback = plan.fallback_for(variant.name) if err.fallback_ok else None
            if fallback is None:
                raise
            log.warning(
                "request %s: variant %r failed before its first byte (%s); falling back to %r",
                x.rec.request_id,
                variant.name,
                self._engine_detail(err.code, err.message),
                fallback.name,
            )
            x.rec.fallback_from, x.rec.fallback_reason = variant.name, err.code
            variant = fallback
            _assign(x.rec, variant, plan)
            response = await self._send_to(x, req, plan, variant)
        x.rec.engine_first_byte_s = self.d.clock() - x.t0
        x.response = response
        return variant, response

    async def _send_to(self, x: Exchange, req: ChatRequest, plan: Plan, variant: Variant) -> EngineResponse:
        context = None
        if variant.retrieval is not None:
            started = self.d.clock()
            context = variant.retrieval.context_for(req.body["messages"])
            x.rec.retrieval_s = self.d.clock() - started
        body = engine_body(req.body, variant, stream=req.stream, context=context)
        self.d.engine_inflight[variant.model] += 1
        x.engine_models.append(variant.model)
        try:
            response = await self.d.engines.chat(
                variant.engine, body, plan.route.timeouts, x.rec.request_id, variant.adapter
            )
        except (EngineError, EngineRejected) as err:
            x.rec.engine_url = err.member
            raise
        x.rec.engine_url = response.url
        return response

    # -- non-stream -------------------------------------------------------------------------------------------

    async def _unary(
        self, x: Exchange, req: ChatRequest, plan: Plan, decision: Decision, exp: Expectation
    ) -> None:
        variant, response = await self._open(x, req, plan, decision.variant)
        raw, data = await read_json(response)
        x.response = None
        verdict = self._verdict(x, completions_from_response(data), exp)
        if verdict.status == "invalid" and plan.route.tool_calls == "enforce":
            variant, raw, data, verdict = await self._retry_unary(x, req, plan, variant, verdict, exp)
        self._account(x, variant, data.get("usage"))
        headers = [_JSON, *x.response_headers(), *self._verdict_headers(plan, verdict)]
        await self._respond(x, 200, headers, raw)

    async def _retry_unary(
        self, x: Exchange, req: ChatRequest, plan: Plan, variant: Variant, verdict: Verdict, exp: Expectation
    ) -> tuple[Variant, bytes, dict[str, Any], Verdict]:
        """Enforce mode: an invalid answer is retried once on the route's fallback variant."""
        fallback = plan.fallback_for(variant.name)
        if fallback is None:
            raise _invalid(verdict, variant)
        x.rec.fallback_from, x.rec.fallback_reason = variant.name, verdict.reason
        _assign(x.rec, fallback, plan)
        x.response = response = await self._send_to(x, req, plan, fallback)
        raw, data = await read_json(response)
        x.response = None
        retried = self._verdict(x, completions_from_response(data), exp)
        if retried.status == "invalid":
            raise _invalid(retried, fallback)
        return fallback, raw, data, retried

    # -- stream -----------------------------------------------------------------------------------------------

    async def _stream(
        self, x: Exchange, req: ChatRequest, plan: Plan, decision: Decision, exp: Expectation
    ) -> None:
        enforce = plan.route.tool_calls == "enforce" and exp.active
        variant, response = await self._open(x, req, plan, decision.variant)
        stream = relay.StreamRelay(
            client_wants_usage=req.include_usage,
            hold_tool_calls=enforce,
            hold_finish=_shows_verdict(plan, exp),  # the verdict goes on the stream's last chunk
        )
        await self._start(x, 200, [*_SSE_HEADERS, *x.response_headers()])
        clock = self.d.clock
        async for data in response.chunks():
            out = stream.feed(data, clock())
            if out:
                await x.send({"type": "http.response.body", "body": out, "more_body": True})
            if stream.fault is not None:
                raise stream.fault
        response.release()
        x.response = None
        await self._end_stream(x, req, plan, variant, stream, exp)

    async def _end_stream(
        self,
        x: Exchange,
        req: ChatRequest,
        plan: Plan,
        variant: Variant,
        stream: relay.StreamRelay,
        exp: Expectation,
    ) -> None:
        acc = stream.acc
        _timing(x, stream)
        if acc.error is not None or not stream.done:
            _stream_failure(x.rec, acc.error)
            if acc.error is not None:
                log.warning(
                    "request %s: the engine's stream failed (%s)",
                    x.rec.request_id,
                    self._engine_detail("engine_stream_error", acc.error.get("message")),
                )
            body = b"".join(stream.discard())  # never release calls that were not checked
            if acc.error is None:  # the engine's own error event was already relayed
                body += sse.error_event(EngineError("The engine ended the stream before it was complete."))
            await x.send({"type": "http.response.body", "body": body + sse.DONE, "more_body": False})
            return
        verdict = self._verdict(x, acc.completions(), exp)
        if verdict.status == "invalid" and plan.route.tool_calls == "enforce" and exp.active:
            tail, verdict = await self._replace_stream_calls(x, req, plan, variant, stream, verdict, exp)
        else:
            tail = stream.release()
        self._account(x, variant, acc.usage)
        comment = b""
        if _shows_verdict(plan, exp):
            head = {"id": x.rec.request_id, "created": int(self.d.wallclock()), "model": acc.model}
            tail = relay.with_verdict(tail, _verdict_fields(verdict, x.rec.variant), head)
            comment = sse.comment(_verdict_comment(verdict))
        body = b"".join(tail) + comment + sse.DONE
        await x.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _replace_stream_calls(
        self,
        x: Exchange,
        req: ChatRequest,
        plan: Plan,
        variant: Variant,
        stream: relay.StreamRelay,
        verdict: Verdict,
        exp: Expectation,
    ) -> tuple[list[bytes], Verdict]:
        """Enforce mode in a stream: the held calls were invalid; send the fallback's call, or an error event."""
        kept = stream.discard()
        fallback = plan.fallback_for(variant.name)
        if fallback is None:
            raise _invalid(verdict, variant)
        x.rec.fallback_from, x.rec.fallback_reason = variant.name, verdict.reason
        _assign(x.rec, fallback, plan)
        unary = ChatRequest({**req.body, "stream": False}, req.model, False, False, req.user)
        x.response = response = await self._send_to(x, unary, plan, fallback)
        _, data = await read_json(response)
        x.response = None
        completions = completions_from_response(data)
        retried = self._verdict(x, completions, exp)
        if retried.status == "invalid" or not completions:
            raise _invalid(retried, fallback)
        stream.acc.usage = data.get("usage") if isinstance(data.get("usage"), dict) else stream.acc.usage
        events = relay.tool_call_events(
            completions[0].tool_calls,
            chunk_id=str(data.get("id", x.rec.request_id)),
            model=str(data.get("model", fallback.model)),
            created=int(data.get("created", 0)),
            finish_reason=completions[0].finish_reason or "tool_calls",
        )
        return events + kept, retried

    # -- shared -----------------------------------------------------------------------------------------------

    def _verdict(self, x: Exchange, completions: list[Completion], exp: Expectation) -> Verdict:
        """Check the answer and note the verdict in the record (the last one checked is the one served)."""
        if not exp.active:
            return NO_VERDICT
        verdict = check(completions, exp, self.d.schemas)
        x.rec.note_verdict(verdict, exp.tool_choice)
        return verdict

    def _verdict_headers(self, plan: Plan, verdict: Verdict) -> list[tuple[bytes, bytes]]:
        if plan.route.tool_calls == "observe":
            return []
        out = [(b"x-gateway-tool-calls", verdict.header.encode())]
        if verdict.reason:
            out.append((b"x-gateway-tool-calls-reason", verdict.reason.encode()))
        return out

    def _engine_detail(self, code: str | None, message: object) -> str:
        """What a log line says about an engine failure: the gateway's classification, and the engine's own
        text only when the operator opted in (it may echo the prompt)."""
        if self.d.log_engine_errors and message:
            return f"{code}: {message}"
        return str(code)

    def _account(self, x: Exchange, variant: Variant, usage: Any) -> None:
        x.rec.note_usage(variant.price, usage)

    async def _start(self, x: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        x.started = True
        x.rec.status = status
        if self.d.drain.draining:  # the client must not reuse a connection that closes once the drain is over
            headers = [*headers, (b"connection", b"close")]
        await x.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _respond(
        self, x: Exchange, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        await self._start(x, status, headers)
        await x.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _fail(self, x: Exchange, err: GatewayError) -> None:
        _set_outcome(x.rec, err)
        if x.response is not None:
            x.response.close()
            x.response = None
        if x.started:  # a stream is under way: the error goes in-band, then the stream ends
            if not x.shutting_down:
                x.rec.outcome = "stream_error"
            body = sse.error_event(err) + sse.DONE
            await x.send({"type": "http.response.body", "body": body, "more_body": False})
            return
        x.rec.status = err.status
        await self._respond(x, err.status, [_JSON, *x.response_headers()], err.envelope())

    def _finish(self, x: Exchange) -> None:
        if x.response is not None:  # abandoned mid-way (disconnect, cancellation): stop the engine's work
            x.response.close()
        for model in x.engine_models:
            self.d.engine_inflight[model] -= 1
        rec = x.rec
        rec.e2e_s = self.d.clock() - x.t0
        self.d.counters[(rec.route or "", rec.variant or "", rec.outcome, rec.tool_verdict)] += 1
        try:
            self.d.telemetry.observe(rec)
        finally:
            self.d.records.submit(rec)


class _DisconnectWatch:
    """Cancels the request's work when the client goes, so that the engine request is closed, not left running.

    Listening costs a task per request (about 20 µs, overhead benchmark), so it starts only once the request
    has run for `after_s`: the short requests that make up most traffic never pay, and a long generation or
    stream is still cancelled within `after_s` of its client leaving."""

    def __init__(self, receive: Receive, x: Exchange, after_s: float = 0.1) -> None:
        self._receive = receive
        self._x = x
        self._work = x.task
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(after_s, self._start)

    def _start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._x.disconnected = True
                if self._work is not None:
                    self._work.cancel()
                return

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


async def _read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # the client, not a server shutdown (that cancels the task)
            raise ClientDisconnected("The client disconnected while sending its body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _assign(rec: Record, variant: Variant, plan: Plan) -> None:
    rec.variant = variant.name
    rec.engine_model = variant.model
    rec.adapter = variant.adapter
    rec.share = plan.shares.get(variant.name, 0.0)


def _timing(x: Exchange, stream: relay.StreamRelay) -> None:
    ttft, tpot = stream.timing(x.t0)
    if ttft is not None:
        x.rec.ttft_s = ttft
    if tpot is not None:
        x.rec.tpot_s = tpot


def _set_outcome(rec: Record, err: GatewayError) -> None:
    rec.outcome = err.outcome
    rec.error_code = err.code
    if not rec.status:
        rec.status = err.status


def _stream_failure(rec: Record, error: dict[str, Any] | None) -> None:
    rec.status = 200
    rec.outcome = "stream_error"
    # The gateway's own classification: the engine's error fields are its text, which may echo the prompt.
    rec.error_code = "engine_stream_truncated" if error is None else "engine_stream_error"


def _invalid(verdict: Verdict, variant: Variant) -> InvalidToolCall:
    where = f" at {verdict.path}" if verdict.path else ""
    return InvalidToolCall(
        f"Variant {variant.name!r} returned an invalid tool call ({verdict.reason}{where}) and no valid "
        "fallback answer was available.",
        code=verdict.reason,
    )


def _shows_verdict(plan: Plan, exp: Expectation) -> bool:
    return plan.route.tool_calls != "observe" and exp.active


def _verdict_fields(verdict: Verdict, variant: str | None) -> dict[str, Any]:
    """The verdict on a stream's last chunk (`"gateway"`): what the comment line says, where SDKs keep it."""
    fields: dict[str, Any] = {"tool_calls": verdict.header, "variant": variant}
    if verdict.reason:
        fields["reason"] = verdict.reason
    if verdict.path:
        fields["path"] = verdict.path
    return fields


def _verdict_comment(verdict: Verdict) -> str:
    parts = [f"x-gateway-tool-calls={verdict.header}"]
    if verdict.reason:
        parts.append(f"reason={verdict.reason}")
    if verdict.path:
        parts.append(f"path={verdict.path}")
    return " ".join(parts)


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None


def _incoming_id(headers: dict[bytes, bytes]) -> str | None:
    """The caller's request id, when it sent a sane one (it becomes the engine's request id too)."""
    incoming = headers.get(b"x-request-id")
    if incoming and len(incoming) <= 128 and incoming.isascii() and incoming.replace(b"-", b"").isalnum():
        return incoming.decode()
    return None
