"""The shadow copies of one gateway process: which routed requests are copied to their route's shadow variant, the
detached tasks that send the copies, the limits (copies in flight, the hourly cost budget), each copy's record, and
their end when the gateway shuts down.

What a copy never does: delay, fail or change the answer, headers or record of the request it copies. `offer()` is
the chat endpoint's only call: synchronous, it draws, checks the limits and starts a task, and it never raises (a
bug is logged). The copy runs on that task, not the request's, so the client's disconnect or the request's own
cancellation does not reach it; it reads the request's body and copies a few fields of its record at the offer,
and writes only its own record. At shutdown, copies still running get what is left of the drain deadline, then are
ended (`cut_off`, `close`); each one's record is submitted either way (`server_shutdown` when it was cut).

A copy is the shadow variant's own request: its model or adapter, its system prompt and retrieval (`rewrite`), no
retry on a fallback variant and no enforcement (the verdict is recorded, whatever it is). Its record is marked
`shadow` and carries the primary's request id (`primary_id`) and its own id, `<primary id>-shadow`, which is also
the engine's request id. A copy not sent is a record too, outcome `shadow_dropped`, its reason in `error_code`
(`killed`: a kill switch has the shadow variant out; `in_flight_limit`: `max_in_flight` copies of the route were
running in this process, so it is dropped, never queued; `budget`: the copies answered this clock hour cost
`max_cost_per_hour`), so that a report sees drops across replicas; and a `gateway.shadow.dropped` count.

Limits are per process, like the in-flight count they protect: N replicas may run N × `max_in_flight` copies and
spend N × `max_cost_per_hour`. A copy's cost is known when it is answered, so the copies already in flight when the
budget is reached still finish (at most `max_in_flight` answers over it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from gateway import relay
from gateway.engine import EnginePool, EngineResponse, read_json
from gateway.errors import EngineError, EngineRejected, GatewayError
from gateway.openai_types import ChatRequest
from gateway.policy import Route, ShadowPlan, Variant
from gateway.records import SHADOW_DROPPED, Record
from gateway.rewrite import engine_body
from gateway.store.api import RequestLog
from gateway.telemetry import Telemetry
from gateway.toolcalls import Completion, Expectation, SchemaCache, check, completions_from_response

log = logging.getLogger("gateway.shadow")

DROP_REASONS: Final = ("killed", "in_flight_limit", "budget")
_HOUR_S: Final = 3600.0
_CANCEL_WAIT_S: Final = 5.0  # a cancelled copy only closes its connection and submits its record


@dataclass(slots=True)
class HourlyBudget:
    """What a route's copies answered in the current clock hour (UTC) cost: over the limit, copies stop until the
    hour turns."""

    hour: int = -1  # hours since the epoch
    spent: float = 0.0

    def over(self, limit: float | None, now: float) -> bool:
        return limit is not None and self.hour == int(now // _HOUR_S) and self.spent >= limit

    def spend(self, amount: float | None, now: float) -> None:
        if amount is None or not amount >= 0:  # unpriced, or NaN
            return
        hour = int(now // _HOUR_S)
        if hour != self.hour:
            self.hour, self.spent = hour, 0.0
        self.spent += amount


class ShadowCopies:
    """The copies of this process: started by `offer`, limited per route, ended by `cut_off` or `close`.

    Everything runs on the event loop's thread (the request path's), so the counts need no lock. `draw` is this
    object's own: the shadow decision never consumes the routing draw (`proxy.Deps.draw`)."""

    def __init__(
        self,
        *,
        engines: EnginePool,
        schemas: SchemaCache,
        records: RequestLog,
        telemetry: Telemetry,
        engine_inflight: Counter[str],
        draw: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self._engines = engines
        self._schemas = schemas
        self._records = records
        self._telemetry = telemetry
        self._engine_inflight = engine_inflight  # per engine model: adapters in use are not unloaded
        self._draw = draw or random.Random().random
        self._clock = clock
        self._wallclock = wallclock
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: Counter[str] = Counter()  # copies in flight per route
        self._budgets: dict[str, HourlyBudget] = {}
        self._closed = False

    @property
    def inflight(self) -> int:
        """Copies started whose record is not submitted yet."""
        return len(self._tasks)

    def offer(
        self,
        primary: Record,
        req: ChatRequest,
        route: Route,
        shadow: ShadowPlan,
        served: Variant,
        exp: Expectation,
    ) -> None:
        """A request of `route`, routed to `served`: copy it to the shadow variant, drop the copy, or neither.
        Returns at once and never raises."""
        try:
            action = shadow.decide(self._draw(), served.name)
            if action is None or self._closed:
                return
            spec = shadow.spec
            stream = req.stream and spec.stream == "as_sent"
            rec = _shadow_record(primary, route, shadow, stream, self._wallclock())
            if action == "killed":
                self._drop(rec, "killed")
            elif self._running[route.name] >= spec.max_in_flight:
                self._drop(rec, "in_flight_limit")
            elif self._budget(route.name).over(spec.max_cost_per_hour, self._wallclock()):
                self._drop(rec, "budget")
            else:
                self._start(rec, _copy_body(req, stream), route, shadow.variant, exp)
        except Exception:
            log.exception("shadow: the copy of request %s was not started", primary.request_id)

    def cut_off(self) -> None:
        """The drain deadline: every copy still running ends now, its record saying `server_shutdown`."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()

    async def close(self, grace_s: float) -> None:
        """Shutdown: no new copies; those running get `grace_s` seconds to finish, then are ended. Returns once
        every copy has submitted its record."""
        self._closed = True
        running = list(self._tasks)
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=max(0.0, grace_s))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_CANCEL_WAIT_S)

    def running(self, route: str) -> int:
        """Copies of `route` in flight in this process."""
        return self._running[route]

    # -- the copy ---------------------------------------------------------------------------------------------

    def _start(
        self, rec: Record, body: dict[str, Any], route: Route, variant: Variant, exp: Expectation
    ) -> None:
        self._running[route.name] += 1
        self._engine_inflight[variant.model] += 1
        t0 = self._clock()
        task = asyncio.get_running_loop().create_task(self._copy(rec, body, route, variant, exp, t0))
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if task.cancelled():  # cancelled before its first step: `_copy` never ran, so it finishes here
                _failed(rec, "server_shutdown", "server_shutting_down", 503)
                self._finish(rec, route, variant, t0)

        task.add_done_callback(done)

    async def _copy(
        self, rec: Record, body: dict[str, Any], route: Route, variant: Variant, exp: Expectation, t0: float
    ) -> None:
        try:
            await self._answer(rec, body, route, variant, exp, t0)
        except GatewayError as err:
            _failed(rec, err.outcome, err.code, err.status)
            log.debug("shadow copy %s: %s (%s)", rec.request_id, err.code, type(err).__name__)
        except (
            asyncio.CancelledError
        ):  # the drain deadline: recorded, not re-raised (nobody awaits the result)
            _failed(rec, "server_shutdown", "server_shutting_down", 503)
        except Exception:
            log.exception("shadow copy %s failed", rec.request_id)
            _failed(rec, "gateway_error", "internal_error", 500)
        finally:
            self._finish(rec, route, variant, t0)

    def _finish(self, rec: Record, route: Route, variant: Variant, t0: float) -> None:
        """The copy's end, however it came: its counts released, its cost spent, its record submitted."""
        self._running[route.name] -= 1
        self._engine_inflight[variant.model] -= 1
        rec.e2e_s = self._clock() - t0
        self._budget(route.name).spend(rec.cost, self._wallclock())
        try:
            self._telemetry.observe(rec)
        finally:
            self._records.submit(rec)

    async def _answer(
        self, rec: Record, body: dict[str, Any], route: Route, variant: Variant, exp: Expectation, t0: float
    ) -> None:
        context = None
        if variant.retrieval is not None:
            started = self._clock()
            context = variant.retrieval.context_for(body["messages"])
            rec.retrieval_s = self._clock() - started
        payload = engine_body(body, variant, stream=rec.stream, context=context)
        try:
            response = await self._engines.chat(
                variant.engine, payload, route.timeouts, rec.request_id, variant.adapter
            )
        except (EngineError, EngineRejected) as err:
            rec.engine_url = err.member
            raise
        rec.engine_url = response.url
        rec.engine_first_byte_s = self._clock() - t0
        try:
            if rec.stream:
                answer = await self._read_stream(rec, response, t0)
            else:
                _, data = await read_json(response)
                answer = completions_from_response(data), data.get("usage")
        except BaseException:
            response.close()
            raise
        if answer is None:  # a stream that broke mid-way: its record says so
            return
        completions, usage = answer
        if exp.active:
            rec.note_verdict(check(completions, exp, self._schemas), exp.tool_choice)
        rec.note_usage(variant.price, usage)

    async def _read_stream(
        self, rec: Record, response: EngineResponse, t0: float
    ) -> tuple[list[Completion], Any] | None:
        """Read a streamed answer to its end (nothing is forwarded); None when it broke mid-way."""
        stream = relay.StreamRelay(client_wants_usage=True, hold_tool_calls=False)
        async for data in response.chunks():
            stream.feed(data, self._clock())
            if stream.fault is not None:
                raise stream.fault
        response.release()
        rec.ttft_s, rec.tpot_s = stream.timing(t0)
        acc = stream.acc
        if acc.error is not None or not stream.done:
            code = "engine_stream_truncated" if acc.error is None else "engine_stream_error"
            _failed(rec, "stream_error", code, 200)
            return None
        return acc.completions(), acc.usage

    # -- limits -----------------------------------------------------------------------------------------------

    def _drop(self, rec: Record, reason: str) -> None:
        rec.outcome, rec.error_code = SHADOW_DROPPED, reason
        self._telemetry.shadow_dropped(rec.route or "", rec.variant or "", reason)
        self._records.submit(rec)

    def _budget(self, route: str) -> HourlyBudget:
        budget = self._budgets.get(route)
        if budget is None:
            budget = self._budgets[route] = HourlyBudget()
        return budget


def _shadow_record(primary: Record, route: Route, shadow: ShadowPlan, stream: bool, now: float) -> Record:
    """The copy's record, with what it takes from the primary's at the offer (nothing is read from it later)."""
    variant = shadow.variant
    return Record(
        ts=now,
        request_id=f"{primary.request_id}-shadow",
        key_name=primary.key_name,
        tenant=primary.tenant,
        route=route.name,
        variant=variant.name,
        engine_model=variant.model,
        adapter=variant.adapter,
        stream=stream,
        share=shadow.spec.share / 100.0,  # the share of the route's requests copied
        policy_version=primary.policy_version,
        bucket=primary.bucket,
        shadow=True,
        primary_id=primary.request_id,
    )


def _copy_body(req: ChatRequest, stream: bool) -> dict[str, Any]:
    """The client's body as the copy sends it (the variant's rewrite comes later): a stream sent as a non-stream
    request loses its stream fields."""
    if stream or not req.stream:
        return req.body
    return {k: v for k, v in req.body.items() if k not in ("stream", "stream_options")}


def _failed(rec: Record, outcome: str, code: str | None, status: int) -> None:
    rec.outcome, rec.error_code = outcome, code
    if not rec.status:
        rec.status = status
