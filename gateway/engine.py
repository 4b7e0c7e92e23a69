"""The hot-path HTTP client to the engines (vLLM's OpenAI-compatible server), and its error translation.

aiohttp, not httpx, on this path: on this 2-core machine a bare passthrough cost about 277 µs of CPU per request
with aiohttp's client against about 2,000 µs with httpx 0.28 (README, "Dependency choices"). One `ClientSession`
per engine, created in the app's lifespan and closed there.

Every aiohttp/asyncio failure is translated here into the gateway's error tree: before the response headers
arrive, a failure may fall back to another variant (`fallback_ok`); once the body is being read it may not. Closing
an `EngineResponse` early closes its connection, which is how vLLM learns that a request was abandoned (it aborts
the generation when the socket goes away).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import yarl

from gateway.errors import EngineError, EngineRejected, EngineTimeout, EngineUnavailable, GatewayError
from gateway.policy import Timeouts


class EngineResponse:
    def __init__(self, response: aiohttp.ClientResponse, engine: str) -> None:
        self._response = response
        self.engine = engine
        self.status = response.status

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except BaseException as exc:
            self.close()
            raise _mid_body(exc, self.engine) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Errors after the headers are never eligible for fallback."""
        content = self._response.content
        try:
            while True:
                data = await content.readany()
                if not data:
                    return
                yield data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _mid_body(exc, self.engine) from exc

    def close(self) -> None:
        """Drop the connection (not back to the pool): the engine sees the client go and stops generating."""
        self._response.close()

    def release(self) -> None:
        self._response.release()


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


class EnginePool:
    def __init__(self, engines: Mapping[str, str], *, connections: int = 256) -> None:
        self._urls = dict(engines)
        self._connections = connections
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._chat_urls: dict[str, yarl.URL] = {}
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    @property
    def names(self) -> list[str]:
        return list(self._urls)

    async def start(self) -> None:
        for name, url in self._urls.items():
            connector = aiohttp.TCPConnector(
                limit=self._connections, ttl_dns_cache=300, enable_cleanup_closed=True
            )
            # auto_decompress off and no cookie jar: bytes are relayed as they are, nothing per-request is kept.
            # (No skip_auto_headers: it sends aiohttp down a slow path that copies the headers per request.)
            self._chat_urls[name] = yarl.URL(url + "/v1/chat/completions")  # parsed once, not per request
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

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

    async def chat(self, engine: str, body: bytes, timeouts: Timeouts, request_id: str) -> EngineResponse:
        """POST a chat completion; returns once the engine's response headers arrived with a 200.

        Raises EngineUnavailable/EngineTimeout (fallback allowed), EngineError for the engine's 5xx or an
        unknown model (fallback allowed), EngineRejected for its other 4xx (the client's fault: relayed)."""
        session = self._sessions[engine]
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        try:
            response = await session.post(
                self._chat_urls[engine], data=body, headers=headers, timeout=self._client_timeout(timeouts)
            )
        except TimeoutError:
            raise EngineTimeout(
                f"Engine {engine!r} sent no response within {timeouts.first_byte:g} s (first-byte timeout)."
            ) from None
        except aiohttp.ClientError as exc:
            raise EngineUnavailable(f"Engine {engine!r} is unreachable: {type(exc).__name__}.") from None
        if response.status != 200:
            raise await _refusal(response, engine)
        return EngineResponse(response, engine)

    async def get_json(self, engine: str, path: str, limit_s: float = 2.0) -> Any:
        """A small control-plane GET (readiness, model lists)."""
        session = self._sessions[engine]
        try:
            url = f"{self._urls[engine]}/{path.lstrip('/')}"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=limit_s)) as response:
                response.raise_for_status()
                return orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise EngineUnavailable(f"Engine {engine!r}: GET {path} failed: {type(exc).__name__}.") from None


async def _refusal(response: aiohttp.ClientResponse, engine: str) -> GatewayError:
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
