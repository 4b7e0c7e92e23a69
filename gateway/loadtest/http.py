"""The load runner's HTTP/1.1 client: keep-alive connections on the event loop, requests written as prepared
bytes, answers parsed by httptools (the C parser uvicorn uses). Nothing else: no redirects, cookies, proxies or
decompression, which a load test of an API does not need.

Why not aiohttp: profiled in the runner against the simulated engine, aiohttp's request machinery (request and
response objects, header multidicts, payload wrappers, the connector) was most of the runner's CPU, about
400 µs per request on this 2-core machine, and kept the runner and the engine together under 1,000 requests/s;
this client spends a fraction of that (`loadtests/bench_loadtest.py` prints both the rate and the runner's CPU per
request). Each answer's body pieces are kept with their arrival times, so a stream's time to first token is
the arrival of the piece that carried it, read after the answer is complete rather than while it streams.

A connection the server closed while it sat idle (a keep-alive timeout) is dropped when that is noticed; when
the close crosses a request on the wire, the request fails before any byte comes back and is sent once more on a
new connection, as common clients do, so a server's housekeeping is not counted as the target's error. Any
other failure is the caller's to count.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools


class ProtocolError(ConnectionError):
    """The server's answer was not HTTP/1.1 that could be parsed."""


@dataclass(slots=True)
class Answer:
    status: int = 0
    headers: dict[str, str] = field(
        default_factory=dict
    )  # names lower-cased; a repeated header keeps the last
    pieces: list[bytes] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # clock reading when each piece arrived

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


class _Connection(asyncio.Protocol):
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer = Answer()
        self.done: asyncio.Future[None] | None = None
        self.reusable = True
        self.used = (
            False  # it answered a request before: a failure with no byte back may be a stale keep-alive
        )
        self.heard = False  # a byte of the current answer arrived

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        self.heard = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.reusable = False
            self._fail(ProtocolError(f"unparsable answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(
            exc if isinstance(exc, OSError) else ConnectionResetError("the server closed the connection")
        )

    # -- httptools callbacks --

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.answer.status = self.parser.get_status_code()
        if not self.parser.should_keep_alive():
            self.reusable = False

    def on_body(self, body: bytes) -> None:
        self.answer.pieces.append(body)
        self.answer.times.append(self.clock())

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    # --

    def _fail(self, exc: BaseException) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    async def exchange(self, request: bytes) -> Answer:
        assert self.transport is not None
        self.answer, self.heard = Answer(), False
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        await self.done
        self.used = True
        return self.answer

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Client:
    """Sends prepared requests to one origin; as many connections as requests in flight, reused."""

    def __init__(self, url: str, *, timeout_s: float, clock: Callable[[], float] = time.perf_counter) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.timeout_s = timeout_s
        self.clock = clock
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Connection(self.clock), self.host, self.port, ssl=self.ssl
        )
        return conn

    async def send(self, request: bytes) -> Answer:
        """Send one whole request (head and body); the answer once it is complete. Raises OSError (including
        `ProtocolError`) or TimeoutError; the connection is then dropped."""
        conn = self._reuse()
        try:
            async with asyncio.timeout(self.timeout_s):
                if conn is None:
                    conn = await self._connect()
                try:
                    answer = await conn.exchange(request)
                except OSError:
                    if not conn.used or conn.heard:
                        raise
                    conn.close()  # a stale keep-alive connection: once more on a new one
                    conn = await self._connect()
                    answer = await conn.exchange(request)
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    def _reuse(self) -> _Connection | None:
        """An idle connection still open (one the server closed while idle was noticed, and is skipped)."""
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
