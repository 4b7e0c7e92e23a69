"""The load runner's HTTP/1.1 client against small scripted servers on loopback: keep-alive reuse, chunked
answers, a connection the server closed while idle, and the failures it must report rather than hide."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.loadtest.http import Client, ProtocolError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
REQUEST = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Gateway-Variant: a\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


async def serve(handler: Handler, body: Callable[[str], Awaitable[None]]) -> list[int]:
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await body(f"http://127.0.0.1:{port}")
    return connections


def test_answers_come_back_whole_and_connections_are_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(ok(b'{"n": 1}'))
            await writer.drain()

    async def body(url: str) -> None:
        client = Client(url, timeout_s=5)
        for _ in range(3):
            answer = await client.send(REQUEST)
            assert (answer.status, answer.body, answer.headers["x-gateway-variant"]) == (
                200,
                b'{"n": 1}',
                "a",
            )
        client.close()

    assert asyncio.run(serve(handler, body)) == [1]


def test_a_chunked_answer_keeps_its_pieces_with_arrival_times() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for piece in (b"data: 1\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def body(url: str) -> None:
        ticks = iter(range(100))
        answer = await Client(url, timeout_s=5, clock=lambda: float(next(ticks))).send(REQUEST)
        assert (
            answer.body == b"data: 1\n\ndata: [DONE]\n\n"
            and answer.headers["content-type"] == "text/event-stream"
        )
        assert len(answer.pieces) == len(answer.times) >= 2 and answer.times == sorted(answer.times)

    asyncio.run(serve(handler, body))


def test_a_connection_closed_while_idle_is_replaced_without_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"{}"))  # keep-alive by HTTP/1.1 default, then closed anyway: a keep-alive timeout
        await writer.drain()

    async def body(url: str) -> None:
        client = Client(url, timeout_s=5)
        assert (await client.send(REQUEST)).status == 200
        await asyncio.sleep(0.05)  # let the close arrive
        assert (await client.send(REQUEST)).status == 200

    assert asyncio.run(serve(handler, body)) == [1, 1]


def test_a_server_that_talks_nonsense_is_an_error() -> None:
    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()

    async def body(url: str) -> None:
        with pytest.raises(ProtocolError):
            await Client(url, timeout_s=5).send(REQUEST)

    asyncio.run(serve(nonsense, body))


def test_no_answer_within_the_timeout_raises_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async def body(url: str) -> None:
        with pytest.raises(TimeoutError):
            await Client(url, timeout_s=0.2).send(REQUEST)

    asyncio.run(serve(silent, body))


def test_only_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Client("ftp://x", timeout_s=1)


def test_a_reused_connection_that_fails_before_any_answer_byte_is_retried_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"{}"))
        await writer.drain()
        await read_request(reader)  # the next request finds the connection closing (a keep-alive timeout)

    async def body(url: str) -> None:
        client = Client(url, timeout_s=5)
        assert (await client.send(REQUEST)).status == 200
        assert (await client.send(REQUEST)).status == 200  # sent again, on a new connection

    assert asyncio.run(serve(handler, body)) == [1, 1]


def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def body(url: str) -> None:
        with pytest.raises(ConnectionError):
            await Client(url, timeout_s=5).send(REQUEST)

    assert asyncio.run(serve(handler, body)) == [1]
