"""The hot-path HTTP client to the engines (vLLM's OpenAI-compatible server), and its error translation.

aiohttp, not httpx, on this path: on this 2-core machine a bare passthrough cost about 277 µs of CPU per request
with aiohttp's client against about 2,000 µs with httpx 0.28 (README, "Dependency choices"). One `ClientSession`
per pool member, created in the app's lifespan and closed there.

An engine name is a pool of members (`gateway.pool`: the choice of a member and its health, pure). `chat` sends to
the member the pool chooses, and a failure before the first byte is tried once more on another member that may
take it, before the caller's fallback variant; each outcome updates the member's health. `probe` runs the
`/health` probes that are due (the app's background task). A pool of one costs what a single URL did: no choice,
no retry.

Every aiohttp/asyncio failure is translated here into the gateway's error tree: before the response headers
arrive, a failure may fall back to another variant (`fallback_ok`); once the body is being read it may not. Closing
an `EngineResponse` early closes its connection, which is how vLLM learns that a request was abandoned (it aborts
the generation when the socket goes away). Messages a client may see name the engine, never a member's URL; the
member is on the error (`member`) for the record and in the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import orjson
import yarl

from gateway.errors import EngineError, EngineRejected, EngineTimeout, EngineUnavailable, GatewayError
from gateway.policy import Timeouts
from gateway.pool import HealthPolicy, Member, Pool, parse_engines

log = logging.getLogger("gateway.engine")
PROBE_TIMEOUT_S = 2.0


class EngineResponse:
    """A 200 from a pool member, its body still to read. The member counts it as outstanding until the body is
    read, the response released or closed."""

    def __init__(self, response: aiohttp.ClientResponse, engine: str, member: Member) -> None:
        self._response = response
        self.engine = engine
        self.member = member
        self.status = response.status
        self._open = True

    @property
    def url(self) -> str:
        """The member that answered."""
        return self.member.url

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except BaseException as exc:
            self.close()
            raise _mid_body(exc, self.engine) from exc
        finally:
            self._finished()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Errors after the headers are never eligible for fallback."""
        content = self._response.content
        try:
            while True:
                data = await content.readany()
                if not data:
                    self._finished()
                    return
                yield data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mid_body(exc, self.engine) from exc

    def close(self) -> None:
        """Drop the connection (not back to the pool): the engine sees the client go and stops generating."""
        self._response.close()
        self._finished()

    def release(self) -> None:
        self._response.release()
        self._finished()

    def _finished(self) -> None:
        if self._open:
            self._open = False
            self.member.outstanding -= 1


async def read_json(response: EngineResponse) -> tuple[bytes, dict[str, Any]]:
    """A non-stream answer's body, raw and parsed; EngineError when it is not a JSON object."""
    raw = await response.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise EngineError(f"Engine {response.engine!r} answered with a body that is not a JSON object.")
    return raw, data


def _mid_body(exc: BaseException, engine: str) -> BaseException:
    if isinstance(exc, GatewayError | asyncio.CancelledError):
        return exc
    err: EngineError
    if isinstance(exc, TimeoutError):
        err = EngineTimeout(f"Engine {engine!r} stalled or did not finish within the route's timeouts.")
    else:
        err = EngineError(f"Engine {engine!r} broke off the response: {type(exc).__name__}.")
    err.fallback_ok = False
    return err


class _Client:
    """One member's connections: its session and its chat URL, parsed once."""

    __slots__ = ("base", "chat_url", "session")

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.chat_url = yarl.URL(base + "/v1/chat/completions")
        self.session = session


class EnginePool:
    """Every engine's pool and its members' connections."""

    def __init__(
        self,
        engines: Mapping[str, str | Sequence[str]],
        *,
        connections: int = 256,
        health: HealthPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = health or HealthPolicy()
        pools = parse_engines(engines)  # a URL or a list of them, as in GATEWAY_ENGINES
        self._pools = {name: Pool(name, urls, self._policy) for name, urls in pools.items()}
        self._connections = connections
        self._clock = clock
        self._ejected = asyncio.Event()  # wakes the probe loop: an ejected member's probe is due sooner
        self._clients: dict[str, tuple[_Client, ...]] = {}
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    @property
    def names(self) -> list[str]:
        return list(self._pools)

    @property
    def pools(self) -> Mapping[str, Pool]:
        return self._pools

    async def start(self) -> None:
        for name, pool in self._pools.items():
            self._clients[name] = tuple(_Client(m.url, self._session()) for m in pool.members)

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._connections, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        # auto_decompress off and no cookie jar: bytes are relayed as they are, nothing per-request is kept.
        # (No skip_auto_headers: it sends aiohttp down a slow path that copies the headers per request.)
        return aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        for clients in self._clients.values():
            for client in clients:
                await client.session.close()
        self._clients.clear()

    def _client_timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        cached = self._timeouts.get(timeouts)
        if cached is None:
            # sock_read bounds the wait for the first byte and every silence after it (a stalled stream), with a
            # timer aiohttp resets per read: cheaper than an asyncio.timeout() per request (overhead benchmark).
            cached = aiohttp.ClientTimeout(
                total=timeouts.total, sock_connect=timeouts.connect, sock_read=timeouts.first_byte
            )
            self._timeouts[timeouts] = cached
        return cached

    async def chat(
        self, engine: str, body: bytes, timeouts: Timeouts, request_id: str, adapter: str | None = None
    ) -> EngineResponse:
        """POST a chat completion to a member of `engine`'s pool (one that holds `adapter`, when one does);
        returns once a member's response headers arrived with a 200. A failure before them is tried once on
        another member that may take the request.

        Raises EngineUnavailable/EngineTimeout (fallback allowed), EngineError for the engine's 5xx or an
        unknown model (fallback allowed), EngineRejected for its other 4xx (the client's fault: relayed)."""
        pool = self._pools[engine]
        if pool.single:
            return await self._send(pool, 0, body, timeouts, request_id, adapter)
        first = pool.choose(adapter, self._clock())
        try:
            return await self._send(pool, first, body, timeouts, request_id, adapter)
        except EngineError as err:
            retry = pool.another(adapter, self._clock(), exclude=first)
            if retry is None:
                raise
            log.warning(
                "request %s: %s failed before its first byte (%s); retrying on %s",
                request_id,
                pool.describe(first),
                err.code,
                pool.members[retry].url,
            )
        return await self._send(pool, retry, body, timeouts, request_id, adapter)

    async def _send(
        self, pool: Pool, index: int, body: bytes, timeouts: Timeouts, request_id: str, adapter: str | None
    ) -> EngineResponse:
        member = pool.members[index]
        client = self._clients[pool.name][index]
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        member.outstanding += 1
        try:
            response = await client.session.post(
                client.chat_url, data=body, headers=headers, timeout=self._client_timeout(timeouts)
            )
        except BaseException as exc:
            member.outstanding -= 1
            raise self._unanswered(exc, pool, index, timeouts) from None
        if response.status != 200:
            member.outstanding -= 1
            raise await self._refused(response, pool, index, adapter)
        if member.failures or member.ejected_until:
            self._answered(pool, index)
        return EngineResponse(response, pool.name, member)

    def _unanswered(self, exc: BaseException, pool: Pool, index: int, timeouts: Timeouts) -> BaseException:
        """No answer from the member: its health, and the error to raise."""
        member = pool.members[index]
        err: EngineError
        if isinstance(exc, aiohttp.ConnectionTimeoutError):  # no connection made: the member counts it
            self._down(pool, index, "connect timeout")
        if isinstance(exc, TimeoutError):
            member.settled()
            err = EngineTimeout(
                f"Engine {pool.name!r} sent no response within {timeouts.first_byte:g} s (first-byte timeout)."
            )
        elif isinstance(exc, aiohttp.ClientError):
            self._down(pool, index, type(exc).__name__)
            err = EngineUnavailable(f"Engine {pool.name!r} is unreachable: {type(exc).__name__}.")
        else:  # cancelled (the client went, the drain deadline) or a bug: not the member's doing
            member.settled()
            return exc
        err.member = member.url
        return err

    async def _refused(
        self, response: aiohttp.ClientResponse, pool: Pool, index: int, adapter: str | None
    ) -> EngineError | EngineRejected:
        member = pool.members[index]
        if response.status >= 500:
            self._down(pool, index, f"HTTP {response.status}")
        else:
            self._answered(pool, index)
            if response.status == 404 and adapter in member.adapters:  # it lost the adapter (a restart)
                member.adapters = member.adapters - {adapter}
        err = await _refusal(response, pool.name)
        err.member = member.url
        return err

    def _answered(self, pool: Pool, index: int) -> None:
        if pool.members[index].succeeded(self._clock()):
            log.info("%s is readmitted", pool.describe(index))

    def _down(self, pool: Pool, index: int, why: str) -> None:
        backoff = pool.members[index].failed(self._clock(), pool.policy)
        if backoff is not None:
            log.warning("%s is ejected for %g s (%s)", pool.describe(index), backoff, why)
            self._ejected.set()

    # -- control plane -----------------------------------------------------------------------------------------

    async def until_probe_due(self) -> None:
        """Sleep until a `/health` probe is due: the earliest member's, or sooner when a member is ejected."""
        now = self._clock()
        due = min((pool.next_probe_at() for pool in self._pools.values()), default=math.inf)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ejected.wait(), min(max(due - now, 0.01), self._policy.probe_s))
        self._ejected.clear()

    async def probe(self) -> None:
        """Probe `/health` on every member that is due: a half-open one's answer readmits or ejects it again."""
        now = self._clock()
        due = [(pool, i) for pool in self._pools.values() for i in pool.probes_due(now)]
        for pool, i in due:
            member = pool.members[i]
            member.last_probe = now
            member.trial = bool(member.ejected_until)
        await asyncio.gather(*(self._probe(pool, i) for pool, i in due))

    async def _probe(self, pool: Pool, index: int) -> None:
        try:
            await self._get(pool, index, "/health", PROBE_TIMEOUT_S)
        except EngineUnavailable:
            self._down(pool, index, "health probe")
        else:
            self._answered(pool, index)

    def status(self) -> dict[str, list[dict[str, Any]]]:
        """Every pool's members as the admin and readiness views show them."""
        now = self._clock()
        return {name: [m.status(now) for m in pool.members] for name, pool in self._pools.items()}

    async def member_ready(self, engine: str, index: int, limit_s: float = 2.0) -> str:
        """ "ok" when the member lists its models (`GET /v1/models`), else what failed."""
        try:
            await self._get(self._pools[engine], index, "/v1/models", limit_s)
        except EngineUnavailable as err:
            return err.message
        return "ok"

    async def _get(self, pool: Pool, index: int, path: str, limit_s: float) -> Any:
        """A small control-plane GET to one member."""
        client = self._clients[pool.name][index]
        try:
            timeout = aiohttp.ClientTimeout(total=limit_s)
            async with client.session.get(client.base + path, timeout=timeout) as response:
                response.raise_for_status()
                return orjson.loads(await response.read()) if path != "/health" else None
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise EngineUnavailable(
                f"{pool.describe(index)}: GET {path.lstrip('/')} failed: {type(exc).__name__}."
            ) from None


async def _refusal(response: aiohttp.ClientResponse, engine: str) -> EngineError | EngineRejected:
    """Translate a non-200 engine answer, keeping the engine's message (vLLM uses OpenAI's envelope)."""
    try:
        raw = await response.read()
    except aiohttp.ClientError:
        raw = b""
    finally:
        response.release()
    message, param = _engine_message(raw)
    status = response.status
    if status == 404 or status >= 500:
        # An unknown model means this gateway's policy and the engine disagree: not the client's fault.
        return EngineError(f"Engine {engine!r} answered {status}: {message}")
    if status in (401, 403):
        return EngineError(f"Engine {engine!r} refused the gateway's credentials ({status}).")
    return EngineRejected(status if 400 <= status < 500 else 502, message, param=param)


def _engine_message(raw: bytes) -> tuple[str, str | None]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return (raw[:300].decode(errors="replace") or "no body"), None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        param = error.get("param")
        return str(error.get("message", "")), param if isinstance(param, str) else None
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail or body)[:300], None
