"""The simulated engine: an OpenAI-compatible HTTP server that answers like vLLM where the gateway can tell. This
module is the server: the served names (base models, then adapters loaded at runtime), the handlers, the counters
at `GET /sim/stats`, `create_app`, `running`, `serve` and `python -m gateway.devtools.sim_engine`. The behaviour
file is `sim_behaviour`, what is answered `sim_answers`, and its bytes `sim_wire`.

Every draw for a request comes from one `random.Random` seeded from (seed, model, `X-Request-Id` or a per-model
counter), so a replay with the same ids gives the same answers. It runs next to the gateway and the load generator
on a small machine, so the hot path is one orjson parse, a few draws, preformatted byte frames and no logging;
a stream stops (counted as cancelled) when the client goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.devtools.sim_answers import (
    Answer,
    Compiler,
    Make,
    Reject,
    chat_body,
    chosen_tool,
    limit_tokens,
    text_pieces,
    tool_answer,
)
from gateway.devtools.sim_behaviour import Behaviour, ModelBehaviour, load_behaviour
from gateway.devtools.sim_wire import (
    JSON,
    SSE_HEADERS,
    CoalescedStream,
    Frames,
    completion_body,
    content_deltas,
    due_times,
    envelope,
    send_paced,
    stream_frames,
)

_PLAN_CACHE = 1024  # distinct tool schemas kept compiled; a load test declares a handful


@dataclass(slots=True)
class _Stats:
    requests: dict[str, int] = field(default_factory=dict)
    cancelled_streams: int = 0
    active_streams: int = 0
    adapter_loads: int = 0
    adapter_unloads: int = 0
    injected_errors: int = 0
    midstream_errors: int = 0


@dataclass(frozen=True, slots=True)
class _Served:
    name: str
    behaviour: ModelBehaviour
    text: Answer
    root: str
    parent: str | None


class _Engine:
    """The running simulated engine: served names (base models, then loaded adapters), counters, handlers."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.stats = _Stats()
        self.counters: dict[str, int] = {}
        self.served: dict[str, _Served] = {}
        self.base = next(iter(behaviour.models))
        self.boot = os.urandom(4).hex()
        self.plans: dict[bytes, Make] = {}
        self.total = 0
        for name, model in behaviour.models.items():
            self._serve(name, model, name, None)
        for name, path in behaviour.lora_modules.items():
            self._serve(name, behaviour.for_adapter(name), path, self.base)

    def _serve(self, name: str, model: ModelBehaviour, root: str, parent: str | None) -> None:
        pieces = text_pieces(model.output_tokens)
        text = Answer(pieces, "stop", None, content_deltas(pieces))
        self.served[name] = _Served(name, model, text, root, parent)

    def _rng(self, model: str, request_id: str | None) -> tuple[random.Random, str]:
        count = self.counters.get(model, 0)
        self.counters[model] = count + 1
        self.total += 1
        rid = request_id or f"{self.boot}{self.total:x}"
        return random.Random(f"{self.behaviour.seed}\x00{model}\x00{request_id or count}"), rid

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = chat_body(raw)
            served = self.served.get(body["model"]) if isinstance(body.get("model"), str) else None
            if served is None:
                raise Reject(
                    404, f"The model `{body.get('model')}` does not exist.", "model", "NotFoundError"
                )
            return await self._generate(request, body, served, max(1, len(raw) // 4))
        except Reject as exc:
            return envelope(exc.status, exc.message, exc.kind, exc.param)

    async def _generate(
        self, request: web.Request, body: dict[str, Any], served: _Served, prompt: int
    ) -> web.StreamResponse:
        self.stats.requests[served.name] = self.stats.requests.get(served.name, 0) + 1
        rng, rid = self._rng(served.name, request.headers.get("X-Request-Id"))
        u_error, u_flaw, u_break = rng.random(), rng.random(), rng.random()  # always drawn, in this order
        model = served.behaviour
        if u_error < model.error_rate:
            self.stats.injected_errors += 1
            return envelope(500, "simulated engine failure", "InternalServerError")
        answer = self._answer(body, served, model.invalid.draw(u_flaw), rng)
        head = Frames(f"chatcmpl-{rid}", int(time.time()), served.name)
        if body.get("stream") is True:
            broken = u_break < model.midstream_error_rate
            return await self._stream(request, *self._frames(body, head, answer, prompt, broken, rng), model)
        if model.latency_ms:
            await asyncio.sleep(model.latency_ms / 1000)
        return web.Response(body=completion_body(head, answer, prompt), content_type=JSON)

    def _frames(
        self,
        body: dict[str, Any],
        head: Frames,
        answer: Answer,
        prompt: int,
        broken: bool,
        rng: random.Random,
    ) -> tuple[list[bytes], int]:
        """The stream's frames, and how many of them are paced (the role delta and the body deltas)."""
        options = body.get("stream_options")
        usage = prompt if isinstance(options, dict) and options.get("include_usage") is True else None
        break_at = rng.randint(1, max(1, answer.tokens - 1)) if broken else None
        self.stats.midstream_errors += broken
        return stream_frames(head, answer, usage, break_at), 1 + (break_at or answer.tokens)

    def _answer(self, body: dict[str, Any], served: _Served, flaw: str | None, rng: random.Random) -> Answer:
        chosen = chosen_tool(body)
        if chosen is None:
            return limit_tokens(served.text, body)
        return limit_tokens(
            tool_answer(*chosen, flaw, rng, self._plan(chosen[0].get("parameters", {}))), body
        )

    def _plan(self, params: Any) -> Make:
        key = orjson.dumps(params)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _PLAN_CACHE:
                self.plans.clear()
            plan = self.plans[key] = Compiler(params if isinstance(params, dict) else {}).compile(params)
        return plan

    async def _stream(
        self, request: web.Request, frames: list[bytes], paced: int, model: ModelBehaviour
    ) -> web.StreamResponse:
        due = due_times(len(frames), paced, model)
        resp = (CoalescedStream if due[0] <= 0 else web.StreamResponse)(headers=SSE_HEADERS)
        self.stats.active_streams += 1
        try:
            await resp.prepare(request)
            await send_paced(resp, frames, due)
        except ConnectionResetError:  # the client went away: the next write found the socket closed
            self.stats.cancelled_streams += 1
        except asyncio.CancelledError:  # the client went away: aiohttp cancelled us (handler_cancellation)
            self.stats.cancelled_streams += 1
            raise
        finally:
            self.stats.active_streams -= 1
        return resp

    async def models(self, _request: web.Request) -> web.Response:
        cards: list[dict[str, Any]] = [
            {
                "id": s.name,
                "object": "model",
                "created": 0,
                "owned_by": "vllm",
                "root": s.root,
                "parent": s.parent,
                "max_model_len": 4096,
                "permission": [],
            }
            for s in self.served.values()
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": cards}), content_type=JSON)

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def sim_stats(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(dataclasses.asdict(self.stats)), content_type=JSON)

    async def _lora_request(self, request: web.Request, keys: tuple[str, ...]) -> dict[str, str]:
        if request.content_type != JSON:
            raise Reject(400, f"Expected Content-Type {JSON}, got {request.content_type!r}")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise Reject(400, f"Invalid JSON in request body: {exc}") from exc
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body[k] for k in keys):
            raise Reject(400, f"Both {' and '.join(repr(k) for k in keys)} must be provided.")
        return body

    async def load_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._lora_request(request, ("lora_name", "lora_path"))
        except Reject as exc:
            return envelope(exc.status, exc.message, exc.kind, exc.param)
        name, path = body["lora_name"], body["lora_path"]
        if name in self.served:
            return envelope(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        if not await asyncio.to_thread(os.path.exists, path):  # a stat, off the loop
            return envelope(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        self._serve(name, self.behaviour.for_adapter(name), path, self.base)
        self.stats.adapter_loads += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        try:
            name = (await self._lora_request(request, ("lora_name",)))["lora_name"]
        except Reject as exc:
            return envelope(exc.status, exc.message, exc.kind, exc.param)
        served = self.served.get(name)
        if served is None or served.parent is None:
            return envelope(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.served[name]
        self.stats.adapter_unloads += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def create_app(behaviour: Behaviour) -> web.Application:
    """The simulated engine as an aiohttp app. Run it with `handler_cancellation=True` (as `serve` and
    `running` do) so a client hang-up cancels a stream at once; without it, the stream stops at its next
    frame."""
    engine = _Engine(behaviour)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", engine.chat)
    app.router.add_get("/v1/models", engine.models)
    app.router.add_get("/health", engine.health)
    app.router.add_get("/sim/stats", engine.sim_stats)
    app.router.add_post("/v1/load_lora_adapter", engine.load_lora)
    app.router.add_post("/v1/unload_lora_adapter", engine.unload_lora)
    return app


@contextlib.asynccontextmanager
async def running(behaviour: Behaviour, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the simulated engine on the current loop for the `async with` block; yields its base URL."""
    runner = web.AppRunner(create_app(behaviour), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency through uvicorn[standard]
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def command(port: int, behaviour: Path) -> list[str]:
    """The argv that runs the simulated engine in a process of its own, on `port`, with a behaviour file."""
    return [
        sys.executable,
        "-m",
        "gateway.devtools.sim_engine",
        "--port",
        str(port),
        "--behaviour",
        str(behaviour),
    ]


def serve(host: str, port: int, behaviour_path: Path | None) -> None:
    """Run the simulated engine until interrupted (uvloop when available, no access log)."""
    app = create_app(load_behaviour(behaviour_path))
    web.run_app(app, host=host, port=port, access_log=None, handler_cancellation=True, loop=_new_loop())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.devtools.sim_engine", description="Run the simulated engine."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--behaviour", type=Path, default=None, help="behaviour TOML file")
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.behaviour)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
