"""The simulated engine's answers as vLLM puts them on the wire: the chat completion body, the error envelope,
a stream's preformatted SSE frames (role delta, body deltas, finish chunk, usage chunk, `[DONE]`; on a mid-stream
failure `data: {"error": ...}` then `[DONE]`), and their pacing by `ttft_ms` / `tokens_per_s`, which coalesces
every frame that is due into one write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

from gateway.devtools.sim_answers import Answer
from gateway.devtools.sim_behaviour import ModelBehaviour

JSON = "application/json"
_DONE = b"data: [DONE]\n\n"
_ROLE = b'{"role":"assistant","content":""}'
_EMPTY = b"{}"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}


def envelope(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    """vLLM's error body: OpenAI's envelope, the exception class name as `type`, the status as `code`."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def completion_body(head: Frames, answer: Answer, prompt: int) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": []}
    if answer.call is None:
        message["content"] = "".join(answer.pieces)
    else:
        call_id, name, arguments = answer.call
        function = {"name": name, "arguments": arguments}
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}
    body = {"id": head.rid, "object": "chat.completion", "created": head.created, "model": head.model}
    body |= {"choices": [{**choice, "stop_reason": None}], "usage": _usage(prompt, answer.tokens)}
    return orjson.dumps(body)


class Frames:
    """Preformatted SSE frames of one stream: every chunk shares the id/object/created/model head."""

    __slots__ = ("created", "head", "model", "open", "rid")

    def __init__(self, rid: str, created: int, model: str) -> None:
        self.rid, self.created, self.model = rid, created, model
        head = b'data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s'
        self.head = head % (orjson.dumps(rid), created, orjson.dumps(model))
        self.open = self.head + b',"choices":[{"index":0,"delta":'

    def delta(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return b"".join((self.open, delta, b',"logprobs":null,"finish_reason":', finish, b"}]}\n\n"))

    def usage(self, prompt: int, completion: int) -> bytes:
        return self.head + b',"choices":[],"usage":' + orjson.dumps(_usage(prompt, completion)) + b"}\n\n"


def content_deltas(pieces: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(orjson.dumps({"content": piece}) for piece in pieces)


def _body_deltas(answer: Answer) -> Sequence[bytes]:
    if answer.deltas is not None:
        return answer.deltas
    if answer.call is None:
        return content_deltas(answer.pieces)
    call_id, name, _ = answer.call
    head = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    deltas = [orjson.dumps({"tool_calls": [head]})]
    deltas += [
        orjson.dumps({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in answer.pieces
    ]
    return deltas


_ERROR_EVENT = b'data: {"error":{"message":"simulated engine failure during generation",' + (
    b'"type":"InternalServerError","param":null,"code":500}}\n\n'
)


def stream_frames(frames: Frames, answer: Answer, usage: int | None, break_at: int | None) -> list[bytes]:
    """Role delta, body deltas, the finish chunk, the usage chunk (when `usage` carries the prompt tokens),
    [DONE]. With `break_at`, the body stops after that many deltas and an error event takes the rest's place,
    as vLLM's stream generator does on an engine failure (it still ends with [DONE])."""
    body = [frames.delta(delta) for delta in _body_deltas(answer)]
    out = [frames.delta(_ROLE), *body[:break_at]]
    if break_at is not None:
        return [*out, _ERROR_EVENT, _DONE]
    out.append(frames.delta(_EMPTY, orjson.dumps(answer.finish)))
    if usage is not None:
        out.append(frames.usage(usage, answer.tokens))
    out.append(_DONE)
    return out


def due_times(count: int, paced: int, model: ModelBehaviour) -> list[float]:
    """Seconds after the headers at which each of `count` frames is due: the role delta and the first delta
    at `ttft_ms`, then one delta per 1/`tokens_per_s` up to frame `paced`; the closing frames go with it."""
    ttft, interval = model.ttft_ms / 1000, (1 / model.tokens_per_s if model.tokens_per_s else 0.0)
    return [ttft + max(0, min(i, paced) - 1) * interval for i in range(count)]


class CoalescedStream(web.StreamResponse):
    """A stream whose first frame is due at once: aiohttp then sends the headers with the first frames (and,
    unpaced, with the chunked terminator) in one socket write instead of three. Profiled under load, those
    separate writes were the largest single cost of an unpaced stream on this server."""

    _send_headers_immediately = False  # aiohttp's own switch, the one `web.Response` sets


async def send_paced(resp: web.StreamResponse, frames: list[bytes], due: list[float]) -> None:
    """Write each frame at its due time, coalescing all frames already due into one write (cheap at any
    pace: one timer and one write per due instant, not per frame); the last write also ends the body."""
    loop = asyncio.get_running_loop()
    start, i = loop.time(), 0
    while i < len(frames):
        wait = due[i] - (loop.time() - start)
        if wait > 0:
            await asyncio.sleep(wait)
        now, j = loop.time() - start, i + 1
        while j < len(frames) and due[j] <= now:
            j += 1
        if j == len(frames):
            await resp.write_eof(b"".join(frames[i:j]))
        else:
            await resp.write(b"".join(frames[i:j]))
        i = j
