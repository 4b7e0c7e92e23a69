"""The bare passthrough that `loadtests/bench_overhead.py` compares the gateway against.

One Starlette endpoint, `POST /v1/chat/completions`, that forwards the request body to the engine with one
aiohttp `ClientSession` (created in the lifespan) and relays the answer: a non-stream body in one piece, a stream
chunk by chunk as it arrives (`StreamingResponse`). Nothing else: no authentication, parsing, policy, validation,
logging or metrics. It runs under uvicorn with uvloop + httptools, as the gateway does, and its session is set up
like the gateway's engine sessions (no decompression, no cookie jar), so the difference the benchmark measures is
the gateway's own work, not a differently tuned client.

    .venv/bin/python loadtests/bench/passthrough.py --port 8090 --engine http://127.0.0.1:8100
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

_JSON_HEADERS = {"Content-Type": "application/json"}


async def _relay(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    finally:
        upstream.release()


def create_app(engine_url: str) -> Starlette:
    """The passthrough app in front of the engine at `engine_url` (scheme, host and port)."""
    url = engine_url.rstrip("/") + "/v1/chat/completions"
    sessions: list[aiohttp.ClientSession] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=256)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        ) as session:
            sessions.append(session)
            yield

    async def chat(request: Request) -> Response:
        body = await request.body()
        upstream = await sessions[0].post(url, data=body, headers=_JSON_HEADERS)
        media_type = upstream.headers.get("Content-Type", "application/json")
        if media_type.startswith("text/event-stream"):
            return StreamingResponse(_relay(upstream), status_code=upstream.status, media_type=media_type)
        try:
            data = await upstream.read()
        finally:
            upstream.release()
        return Response(data, status_code=upstream.status, media_type=media_type)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description="Bare Starlette + aiohttp passthrough to an engine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", required=True, help="engine base URL, e.g. http://127.0.0.1:8100")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.engine),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        lifespan="on",
        log_level="warning",
        proxy_headers=False,  # as the gateway: neither reads client addresses
    )


if __name__ == "__main__":
    main()
