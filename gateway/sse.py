"""Server-sent events on the streaming path: `SSEDecoder` splits the engine's byte stream into whole events
(kept as the exact bytes received, so the proxy relays them untouched), `event_data` reads an event's payload,
`StreamAccumulator` folds the parsed chat.completion.chunk objects into final `toolcalls.Completion`s
(content, tool-call deltas, finish reasons) plus usage, model and a mid-stream error, and `comment` /
`data_event` / `error_event` / `DONE` encode what the gateway itself writes into a stream. Pure: no I/O. Line
endings follow the WHATWG SSE spec (CRLF, LF or a lone CR), even though vLLM only ever sends LF.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from gateway.errors import GatewayError
from gateway.toolcalls import Completion, ToolCall

DONE: Final = b"data: [DONE]\n\n"

# Flags returned by StreamAccumulator.add(): plain ints, since IntFlag arithmetic costs on every chunk.
TOKENS: Final = 1  # the chunk carried output: content or reasoning text, or a tool-call delta
USAGE_ONLY: Final = 2  # "choices": [] with a usage object (the include_usage chunk)
ERROR: Final = 4  # {"error": ...} arrived mid-stream (vLLM does this on an HTTP 200)
TOOL_DELTA: Final = 8  # the chunk carried tool_calls deltas
FINISH: Final = 16  # some choice's finish_reason was set

# Two line terminators in a row end an event. The groups are atomic so that a CRLF is never re-read, on
# backtracking, as a lone CR followed by a lone LF (which would be a blank line).
_EVENT_END: Final = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
_BOM: Final = b"\xef\xbb\xbf"


class SSEDecoder:
    """Splits a byte stream into SSE events, each returned as the exact bytes received, blank line included.

    The concatenation of everything `feed()` returned plus `flush()` is always the input, byte for byte. One
    ambiguity: an event whose blank line is a lone CR at the very end of a read may be the first half of a
    CRLF. The event is complete either way, so it is emitted at once (holding it back would delay it until the
    next read); a LF that then arrives is kept at the front of the next event, where it reads as nothing.
    """

    __slots__ = ("_buf", "_cr", "_floor")

    def __init__(self) -> None:
        self._buf = b""
        self._cr = False  # the last event ended on a lone CR at the end of a read
        self._floor = 0  # leading bytes of _buf that must not start a terminator (the LF of a split CRLF)

    def feed(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        old = len(self._buf)
        buf = self._buf + data if old else data
        if self._cr:
            self._cr = False
            if data[:1] == b"\n":  # _buf is empty here: the event before it was emitted whole
                self._floor = 1
        if not self._floor and b"\r" not in buf:
            return self._feed_lf(buf, old)
        # Bytes already scanned cannot start a terminator pair except within its last 3 bytes ("\r\n\r").
        pos = max(self._floor, old - 3)
        events: list[bytes] = []
        start = 0
        while (m := _EVENT_END.search(buf, pos)) is not None:
            pos = m.end()
            events.append(buf[start:pos])
            start = pos
        if events:
            self._floor = 0
            self._cr = start == len(buf) and buf[-1:] == b"\r"
        self._buf = buf[start:] if start else buf
        return events

    def _feed_lf(self, buf: bytes, old: int) -> list[bytes]:
        """The common case (vLLM sends LF only): `bytes.find` instead of the regex, measured ~4 µs less per event."""
        events: list[bytes] = []
        start = 0
        pos = max(0, old - 1)  # a blank line may straddle the previous read
        while (end := buf.find(b"\n\n", pos)) != -1:
            pos = end + 2
            events.append(buf[start:pos])
            start = pos
        self._buf = buf[start:] if start else buf
        return events

    def flush(self) -> bytes:
        """Whatever is left (an unterminated tail), b"" if none; the decoder is reset."""
        tail = self._buf
        self._buf, self._cr, self._floor = b"", False, 0
        return tail


def event_data(event: bytes) -> bytes | None:
    """The payload: the `data:` values joined by LF, or None for an event with no data line (a comment)."""
    # Fast path: vLLM's one-line `data: {...}\n\n` frames, nearly every event seen.
    if (
        event.startswith(b"data: ")
        and event.find(b"\n") == len(event) - 2
        and event.endswith(b"\n\n")
        and b"\r" not in event
    ):
        return event[6:-2]
    return _event_data_slow(event)


def _event_data_slow(event: bytes) -> bytes | None:
    values: list[bytes] = []
    for line in _LINE_END.split(event.removeprefix(_BOM)):
        if line == b"data":  # a field name with no colon has an empty value (WHATWG SSE, "process the field")
            values.append(b"")
        elif line.startswith(b"data:"):
            value = line[5:]
            values.append(value[1:] if value[:1] == b" " else value)
    return b"\n".join(values) if values else None


def comment(text: str) -> bytes:
    """A comment line (`: text`), ignored by clients; newlines would end it early, so they become spaces."""
    clean = text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return b": " + clean.encode() + b"\n\n"


def data_event(obj: Mapping[str, Any]) -> bytes:
    # orjson escapes control characters inside strings, so the payload is always one line.
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(err: GatewayError) -> bytes:
    """An error inside a started stream: a data event holding its OpenAI envelope ({"error": {...}})."""
    return data_event(err.body())


class _Call:
    __slots__ = ("args", "id", "name")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.args: list[str] = []


class _Choice:
    __slots__ = ("calls", "content", "finish_reason")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.calls: dict[int, _Call] = {}
        self.finish_reason: str | None = None


class StreamAccumulator:
    """Accumulates parsed chat.completion.chunk objects into final Completions, usage, model and error."""

    __slots__ = ("_choices", "error", "model", "usage")

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None  # the last usage object seen
        self.error: dict[str, Any] | None = None  # an error object seen mid-stream
        self.model: str | None = None

    def add(self, chunk: Mapping[str, Any]) -> int:
        """Fold one chunk in; returns the module's flag bits describing it."""
        if _is_error(chunk):
            err = chunk.get("error")
            self.error = err if isinstance(err, dict) else dict(chunk)
            return ERROR
        model = chunk.get("model")
        if isinstance(model, str):
            self.model = model
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return USAGE_ONLY if isinstance(usage, dict) else 0
        flags = 0
        for choice in choices:
            if isinstance(choice, dict):
                flags |= self._add_choice(choice)
        return flags

    def _add_choice(self, choice: Mapping[str, Any]) -> int:
        index = choice.get("index")
        index = index if isinstance(index, int) else 0
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _Choice()
        delta = choice.get("delta")
        flags = _add_delta(state, delta) if isinstance(delta, dict) and delta else 0
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            state.finish_reason = finish
            flags |= FINISH
        return flags

    def completions(self) -> list[Completion]:
        """One Completion per choice index, in index order; tool calls in their index order."""
        return [_completion(i, self._choices[i]) for i in sorted(self._choices)]


def _is_error(chunk: Mapping[str, Any]) -> bool:
    # vLLM: {"error": {...}}; older vLLM flattened its ErrorResponse: {"object": "error", "message": ...}.
    return chunk.get("error") is not None or chunk.get("object") == "error"


def _add_delta(state: _Choice, delta: Mapping[str, Any]) -> int:
    flags = 0
    content = delta.get("content")
    if isinstance(content, str) and content:
        state.content.append(content)  # kept for a response_format check; joined once at the end
        flags = TOKENS
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        flags = TOKENS
    calls = delta.get("tool_calls")
    if isinstance(calls, list) and calls:
        for call in calls:
            if isinstance(call, dict):
                _add_call_delta(state, call)
        flags |= TOKENS | TOOL_DELTA
    return flags


def _add_call_delta(state: _Choice, delta: Mapping[str, Any]) -> None:
    index = delta.get("index")
    if not isinstance(index, int):  # OpenAI and vLLM always send it; without one, continue the last call
        index = max(state.calls, default=0)
    call = state.calls.get(index)
    if call is None:
        call = state.calls[index] = _Call()
    if not call.id and isinstance(cid := delta.get("id"), str):
        call.id = cid
    fn = delta.get("function")
    if isinstance(fn, dict):
        # The name comes whole in the first delta; some servers repeat it later, so it is never concatenated.
        if not call.name and isinstance(name := fn.get("name"), str):
            call.name = name
        if isinstance(args := fn.get("arguments"), str) and args:
            call.args.append(args)


def _completion(index: int, state: _Choice) -> Completion:
    calls = tuple(
        ToolCall(id=c.id, name=c.name, arguments="".join(c.args))
        for c in (state.calls[i] for i in sorted(state.calls))
    )
    content = "".join(state.content) if state.content else None
    return Completion(index=index, content=content, tool_calls=calls, finish_reason=state.finish_reason)
