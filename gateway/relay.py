"""What the gateway does with the engine's output on its way back. Pure: the caller passes the clock readings.

- `StreamRelay`: takes the engine's SSE bytes as they arrive and returns the bytes to forward at once: every event
  untouched, except the usage-only chunk when the client did not ask for it (the gateway always asks the engine,
  to price every stream) and the engine's own `[DONE]` (the relay's caller ends the stream itself, after the
  verdict comment). In enforce mode, everything from the first tool-call delta on is held back until the verdict;
  when the verdict is shown, everything from the first finish chunk on (the verdict goes on the last chunk). A
  `data:` event that is not a JSON object is never relayed: the relay stops there and sets `fault` (the `openai`
  SDK would raise a JSONDecodeError on it, and the answer cannot be checked). It also notes when output tokens
  arrived (time to first token, time per output token).
- `tool_call_events(...)`: a replacement answer's tool calls as stream chunks (enforce mode, fallback's call).
- `with_verdict(...)`: the stream's last events with the verdict on the last chunk, where SDKs keep it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from gateway import sse
from gateway.errors import EngineError
from gateway.toolcalls import ToolCall


class _NotAChunk(Exception):
    """A `data:` payload that is not a JSON object (nor `[DONE]`)."""


class StreamRelay:
    def __init__(self, *, client_wants_usage: bool, hold_tool_calls: bool, hold_finish: bool = False) -> None:
        self._decoder = sse.SSEDecoder()
        self.acc = sse.StreamAccumulator()
        self._client_wants_usage = client_wants_usage
        self._hold_tools = hold_tool_calls
        # The flags of the event that starts holding back: one mask, so the check costs the same either way.
        self._hold_from = (sse.TOOL_DELTA if hold_tool_calls else 0) | (sse.FINISH if hold_finish else 0)
        self.held: list[bytes] = []
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.done = False  # the engine sent [DONE]: the stream ended normally
        self.fault: EngineError | None = None  # the engine sent something that is not a stream of chunks

    def feed(self, data: bytes, now: float) -> bytes:
        """The bytes to forward now. After a `fault`, nothing more is read: the caller ends the stream."""
        out: list[bytes] = []
        try:
            for event in self._decoder.feed(data):
                keep = self._event(event, now)
                if keep is None:
                    continue
                if self.held:
                    self.held.append(keep)
                else:
                    out.append(keep)
        except _NotAChunk:
            self.fault = EngineError(
                "The engine sent a stream event that is not a JSON object; the stream was ended.",
                code="engine_bad_stream",
            )
            self.fault.fallback_ok = False
        return b"".join(out)

    def _event(self, event: bytes, now: float) -> bytes | None:
        payload = sse.event_data(event)
        if payload is None:
            return event
        if payload == b"[DONE]":
            self.done = True
            return None
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            # An empty data buffer is not dispatched (WHATWG SSE), so it is not relayed either.
            if not payload.strip():
                return None
            raise _NotAChunk from None
        if not isinstance(chunk, dict):
            raise _NotAChunk
        flags = self.acc.add(chunk)
        if flags & sse.TOKENS:
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        if flags & sse.USAGE_ONLY and not self._client_wants_usage:
            return None
        if flags & self._hold_from and not self.held:
            self.held.append(event)
            return None
        return event

    def timing(self, started: float) -> tuple[float | None, float | None]:
        """Time to first token since `started`, and mean time per output token after the first (None: unknown)."""
        first, last = self.first_token_at, self.last_token_at
        if first is None or last is None:
            return None, None
        tokens = (self.acc.usage or {}).get("completion_tokens")
        per_token = (last - first) / (tokens - 1) if isinstance(tokens, int) and tokens > 1 else None
        return first - started, per_token

    def release(self) -> list[bytes]:
        """The held events, once the verdict allows them through."""
        out = self.held
        self.held = []
        return out

    def discard(self) -> list[bytes]:
        """In enforce mode, drop the held tool-call events and return the others (usage...); otherwise nothing
        held is about an unchecked call, and all of it is returned."""
        if not self._hold_tools:
            return self.release()
        kept = [e for e in self.held if not _is_tool_event(e)]
        self.held.clear()
        return kept


def _is_tool_event(event: bytes) -> bool:
    payload = sse.event_data(event)
    if payload is None:
        return False
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and bool(chunk.get("choices"))


def tool_call_events(
    calls: Sequence[ToolCall], *, chunk_id: str, model: str, created: int, finish_reason: str
) -> list[bytes]:
    """A complete call per delta, then the finish chunk: what a client's SDK accumulates into the same calls."""
    deltas = [
        {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]
    head = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
    first = {**head, "choices": [{"index": 0, "delta": {"tool_calls": deltas}, "finish_reason": None}]}
    last = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]}
    return [sse.data_event(first), sse.data_event(last)]


def with_verdict(events: Sequence[bytes], verdict: Mapping[str, Any], head: Mapping[str, Any]) -> list[bytes]:
    """`events` with `"gateway": verdict` on the last chunk among them: SDKs drop SSE comments but keep a chunk's
    unknown fields (the `openai` SDK: `chunk.model_extra`). Without a chunk there (an engine that sent no
    finish chunk), a chunk with empty `choices` and `head`'s id, created and model carries it."""
    for i in range(len(events) - 1, -1, -1):
        payload = sse.event_data(events[i])
        try:
            chunk = orjson.loads(payload) if payload is not None else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(chunk, dict):
            return [*events[:i], sse.data_event({**chunk, "gateway": verdict}), *events[i + 1 :]]
    extra = {**head, "object": "chat.completion.chunk", "choices": [], "gateway": verdict}
    return [*events, sse.data_event(extra)]
