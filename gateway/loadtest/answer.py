"""Reading one answer on the load-test client's side: what the gateway said, and whether the task succeeded. Pure.

`Sample` is the runner's record of one request (the client's view, next to the gateway's own `Record`).
`read_unary` and `StreamReader` fill it from a response: the served variant (`x-gateway-variant`), the tool-call
verdict (`x-gateway-tool-calls` and its reason header, or a stream's final `: x-gateway-tool-calls=...` comment),
usage, and the outcome, classified as the gateway classifies its records (`report.ERROR_OUTCOMES`): a 5xx, a
stream that carried an error event or ended without `[DONE]`, or no answer at all is an error; a 4xx is the
client's (counted apart). `judge` compares the answer's tool call with the expected one, argument by argument.
Times come from the caller (`now` arguments), so this module never reads a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import sse
from gateway.toolcalls import Completion, completions_from_response

VERDICTS = ("valid", "invalid", "none", "truncated", "unknown")  # unknown: the target sent no verdict
_COMMENT = b": x-gateway-tool-calls="


@dataclass(slots=True)
class Sample:
    """One measured request. Times are seconds; `start_s` and `scheduled_s` count from the phase's start."""

    seq: int
    item: int
    requested: str | None  # the variant forced by header, if any
    request_id: str
    variant: str | None = None  # the variant that answered (x-gateway-variant)
    status: int = 0  # HTTP status; 0 when no answer came
    outcome: str = "ok"  # ok | error | client_error
    error: str | None = None  # the error's code, or transport / timeout / stream_truncated
    verdict: str = "unknown"
    reason: str | None = None
    success: bool | None = None  # None: the golden item names no expected call
    wrong: tuple[
        str, ...
    ] = ()  # expected arguments the answer got wrong (missing, different); extra ones as +name
    scheduled_s: float | None = None  # open loop: when it was due
    start_s: float = 0.0
    late_s: float = 0.0  # how long after its due time it started (open loop)
    ttft_s: float | None = None  # streams: to the first output token
    tpot_s: float | None = None  # streams: mean time per output token after the first
    e2e_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def read_unary(sample: Sample, status: int, headers: Mapping[str, str], raw: bytes) -> list[Completion]:
    """Fill the sample from a non-stream answer; returns the answer's choices (empty for an error)."""
    _common(sample, status, headers)
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if status >= 400 or not isinstance(data, dict):
        _failed(sample, status, data)
        return []
    _usage(sample, data.get("usage"))
    header = headers.get("x-gateway-tool-calls")
    if header is not None:
        _verdict(sample, header, headers.get("x-gateway-tool-calls-reason"))
    return completions_from_response(data)


def _common(sample: Sample, status: int, headers: Mapping[str, str]) -> None:
    sample.status = status
    sample.variant = headers.get("x-gateway-variant") or sample.variant


def _failed(sample: Sample, status: int, data: Any) -> None:
    error = data.get("error") if isinstance(data, dict) else None
    error = error if isinstance(error, dict) else {}
    sample.outcome = "client_error" if 400 <= status < 500 else "error"
    sample.error = str(error.get("code") or error.get("type") or f"http_{status}")
    if error.get("type") == "invalid_tool_call":  # enforce mode: no valid answer; the record says invalid too
        sample.verdict, sample.reason = "invalid", sample.error


def _usage(sample: Sample, usage: Any) -> None:
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        sample.input_tokens = prompt if isinstance(prompt, int) else None
        sample.output_tokens = completion if isinstance(completion, int) else None


def _verdict(sample: Sample, header: str, reason: str | None) -> None:
    # The header has three values; a cut-off answer reads `none` with the reason `truncated` (README).
    sample.verdict = "truncated" if header == "none" and reason == "truncated" else header
    sample.reason = reason


class StreamReader:
    """Folds a stream's bytes as they arrive: token times, tool-call deltas, usage, the error event, the verdict."""

    __slots__ = ("_decoder", "acc", "comment", "done", "first", "last", "sample")

    def __init__(self, sample: Sample, status: int, headers: Mapping[str, str]) -> None:
        _common(sample, status, headers)
        self.sample = sample
        self._decoder = sse.SSEDecoder()
        self.acc = sse.StreamAccumulator()
        self.first: float | None = None
        self.last: float | None = None
        self.done = False
        self.comment: bytes | None = None

    def feed(self, data: bytes, now: float) -> None:
        for event in self._decoder.feed(data):
            payload = sse.event_data(event)
            if payload is None:
                if event.startswith(_COMMENT):
                    self.comment = event[len(_COMMENT) :].strip()
            elif payload == b"[DONE]":
                self.done = True
            else:
                self._chunk(payload, now)

    def _chunk(self, payload: bytes, now: float) -> None:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(chunk, dict) and self.acc.add(chunk) & sse.TOKENS:
            if self.first is None:
                self.first = now
            self.last = now

    def finish(self, t0: float) -> list[Completion]:
        """Close the sample (t0: when the request was sent); returns the answer's choices."""
        sample, acc = self.sample, self.acc
        _usage(sample, acc.usage)
        if self.first is not None and self.last is not None:
            sample.ttft_s = self.first - t0
            tokens = sample.output_tokens
            if tokens is not None and tokens > 1:
                sample.tpot_s = (self.last - self.first) / (tokens - 1)
        if self.comment is not None:
            fields = dict(_pair(part) for part in self.comment.decode("utf-8", "replace").split(" ") if part)
            _verdict(sample, fields.get("", "unknown"), fields.get("reason"))
        if acc.error is not None or not self.done:
            sample.outcome = "error"
            error = acc.error or {}
            sample.error = str(error.get("code") or error.get("type") or "stream_truncated")
            if error.get("type") == "invalid_tool_call":
                sample.verdict, sample.reason = "invalid", sample.error
            return []
        return acc.completions()


def _pair(part: str) -> tuple[str, str]:
    key, sep, value = part.partition("=")
    return (key, value) if sep else ("", key)  # the first part is the verdict itself


def judge(sample: Sample, completions: list[Completion], expected: Mapping[str, Any] | None) -> None:
    """Task success: exactly one call, to the expected tool, with every argument equal (and no extra ones).

    An error answer is a failed task when an answer was expected. Values compare as JSON values: 7 == 7.0, but
    true is not 1, and strings compare exactly.
    """
    if expected is None:
        return
    calls = [call for c in completions for call in c.tool_calls]
    want: dict[str, Any] = expected["arguments"]
    if sample.outcome != "ok" or len(calls) != 1 or calls[0].name != expected["name"]:
        sample.success, sample.wrong = False, tuple(want)
        return
    try:
        got = orjson.loads(calls[0].arguments)
    except orjson.JSONDecodeError:
        got = None
    if not isinstance(got, dict):
        sample.success, sample.wrong = False, tuple(want)
        return
    wrong = [name for name, value in want.items() if name not in got or not same(got[name], value)]
    wrong += [f"+{name}" for name in got if name not in want]
    sample.success, sample.wrong = not wrong, tuple(wrong)


def same(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value, booleans only equal booleans, containers element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
