"""The simulated engine: an OpenAI-compatible HTTP server that answers like vLLM where the gateway can tell.

It owns the behaviour file (`[models.<name>]`, `[adapters.<name>]`, `[lora_modules]`, `[defaults]`, `seed`)
parsed into a frozen `Behaviour`, the answer generator (text, or one tool call whose arguments are built from
the tool's JSON Schema, then spoiled by a drawn flaw), vLLM's wire shapes (chat completion, SSE chunks, the
usage chunk, `data: {"error": ...}` mid-stream then `[DONE]`, error envelopes, plain-text LoRA load/unload
answers, the model list) and its counters at `GET /sim/stats`. Every draw for a request comes from one
`random.Random` seeded from (seed, model, `X-Request-Id` or a per-model counter), so a replay with the same
ids gives the same answers. It runs next to the gateway and the load generator on a small machine, so the hot
path is one orjson parse, a few draws, preformatted byte frames and no logging; streams paced by `ttft_ms` /
`tokens_per_s` coalesce every frame that is due into one write, and stop (counted as cancelled) when the
client goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import random
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

FLAW_NAMES = ("unknown_tool", "malformed_json", "schema_violation", "missing_tool_call", "truncated")
DEFAULT_MODEL = "crm-base"

# -------------------------------------------------------------------------------------------------- behaviour


@dataclass(frozen=True, slots=True)
class Flaws:
    """Probability of each flaw in a tool-call answer; at most one flaw is drawn per answer (they add up)."""

    unknown_tool: float = 0.0
    malformed_json: float = 0.0
    schema_violation: float = 0.0
    missing_tool_call: float = 0.0
    truncated: float = 0.0

    def draw(self, u: float) -> str | None:
        edge = 0.0
        for name in FLAW_NAMES:
            edge += getattr(self, name)
            if u < edge:
                return name
        return None


@dataclass(frozen=True, slots=True)
class ModelBehaviour:
    """How one served name answers. Non-stream answers take `latency_ms`; streams take `ttft_ms` then one
    piece every 1/`tokens_per_s` seconds (0: as fast as possible)."""

    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    output_tokens: int = 16
    error_rate: float = 0.0
    midstream_error_rate: float = 0.0
    invalid: Flaws = Flaws()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """The simulated engine's setup: served base models, adapter behaviours, adapters loaded at start."""

    models: Mapping[str, ModelBehaviour] = field(
        default_factory=lambda: MappingProxyType({DEFAULT_MODEL: ModelBehaviour()})
    )
    adapters: Mapping[str, ModelBehaviour] = field(default_factory=lambda: MappingProxyType({}))
    lora_modules: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    defaults: ModelBehaviour = ModelBehaviour()
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a behaviour serves at least one base model")

    def for_adapter(self, name: str) -> ModelBehaviour:
        """Adapter `name` or `name@version` takes `[adapters.name]`, else `[models.name]`, else defaults."""
        for key in (name, name.split("@", 1)[0]):
            found = self.adapters.get(key) or self.models.get(key)
            if found is not None:
                return found
        return self.defaults


_RATE_KEYS = frozenset({"error_rate", "midstream_error_rate"})
_MODEL_KEYS = frozenset({"latency_ms", "ttft_ms", "tokens_per_s", "output_tokens", "invalid"}) | _RATE_KEYS
_TOP_KEYS = frozenset({"seed", "defaults", "models", "adapters", "lora_modules"})


def _number(value: Any, where: str, *, rate: bool = False, integer: bool = False) -> float:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a {'whole ' if integer else ''}number, got {value!r}")
    low, high = (1, math.inf) if integer else (0, 1 if rate else math.inf)
    if not low <= value <= high:
        raise ValueError(f"{where}: {value!r} is outside {low}..{high}")
    return value if integer else float(value)


def _table(value: Any, where: str, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table, got {type(value).__name__}")
    unknown = set(value) - allowed if allowed is not None else set()
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed or ())}")
    return value


def _flaws(value: Any, base: Flaws, where: str) -> Flaws:
    table = _table(value, where, frozenset(FLAW_NAMES))
    flaws = dataclasses.replace(base, **{k: _number(v, f"{where}.{k}", rate=True) for k, v in table.items()})
    if sum(getattr(flaws, name) for name in FLAW_NAMES) > 1 + 1e-9:
        raise ValueError(f"{where}: flaw probabilities add up to more than 1")
    return flaws


def _model_behaviour(value: Any, base: ModelBehaviour, where: str) -> ModelBehaviour:
    values: dict[str, Any] = {}
    for key, raw in _table(value, where, _MODEL_KEYS).items():
        if key == "invalid":
            values[key] = _flaws(raw, base.invalid, f"{where}.invalid")
        else:
            is_int = key == "output_tokens"
            values[key] = _number(raw, f"{where}.{key}", rate=key in _RATE_KEYS, integer=is_int)
    return dataclasses.replace(base, **values)


def _named(value: Any, where: str, base: ModelBehaviour) -> dict[str, ModelBehaviour]:
    out = {}
    for name, table in _table(value, where).items():
        if not name:
            raise ValueError(f"{where}: empty name")
        out[name] = _model_behaviour(table, base, f"{where}.{name}")
    return out


def parse_behaviour(data: Mapping[str, Any], source: str = "behaviour") -> Behaviour:
    """Validate a parsed behaviour document (the TOML file's tables) into a frozen `Behaviour`."""
    top = _table(dict(data), source, _TOP_KEYS)
    seed = top.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{source}.seed: expected an integer, got {seed!r}")
    defaults = _model_behaviour(top.get("defaults", {}), ModelBehaviour(), f"{source}.defaults")
    models = _named(top.get("models", {}), f"{source}.models", defaults) or {DEFAULT_MODEL: defaults}
    adapters = _named(top.get("adapters", {}), f"{source}.adapters", defaults)
    modules = _table(top.get("lora_modules", {}), f"{source}.lora_modules")
    for name, path in modules.items():
        if not isinstance(path, str) or not path or name in models:
            raise ValueError(f"{source}.lora_modules.{name}: expected a path string and a name no model has")
    return Behaviour(
        models=MappingProxyType(models),
        adapters=MappingProxyType(adapters),
        lora_modules=MappingProxyType(dict(modules)),
        defaults=defaults,
        seed=seed,
    )


def load_behaviour(path: Path | None) -> Behaviour:
    """Read and validate a behaviour TOML file; None gives the default (one model `crm-base`, no delays, no
    flaws). Any problem is a ValueError that names the file and the key."""
    if path is None:
        return Behaviour()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read behaviour file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    return parse_behaviour(data, str(path))


# ------------------------------------------------------------------------------- arguments from JSON Schemas

_FORMATS = {
    "date": "2026-03-01",
    "date-time": "2026-03-01T09:30:00Z",
    "time": "09:30:00",
    "email": "ana@example.com",
    "uri": "https://example.com/a",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
}
_WORDS = ("alpha", "bravo", "delta", "echo", "lima", "oscar", "sierra", "tango")
_MAX_DEPTH = 8
_PLAN_CACHE = 1024  # distinct tool schemas kept compiled; a load test declares a handful


def _kind(schema: Mapping[str, Any]) -> str:
    declared = schema.get("type")
    if isinstance(declared, list):
        declared = next((t for t in declared if t != "null"), "null")
    if isinstance(declared, str):
        return declared
    return "object" if "properties" in schema else "array" if "items" in schema else "string"


def _num(schema: Mapping[str, Any], key: str, default: float) -> float:
    value = schema.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else default


def _bounds(schema: Mapping[str, Any]) -> tuple[int, int]:
    low = math.ceil(_num(schema, "minimum", _num(schema, "exclusiveMinimum", 0) + 1))
    high = math.floor(_num(schema, "maximum", _num(schema, "exclusiveMaximum", low + 21) - 1))
    return low, max(low, high)


_Make = Callable[[random.Random], Any]


def _constant(value: Any) -> _Make:
    return lambda _rng: value


def _integer(low: int, high: int) -> _Make:
    return lambda rng: rng.randint(low, high)


class _Compiler:
    """Compiles a tool's `parameters` (the JSON Schema subset tool declarations use) into a function that draws
    a valid value from an rng. Compiled once per distinct schema (`_Engine.plans`): interpreting the schema on
    every request measured ~80 µs per tool-call answer, the whole answer with a compiled plan ~25 µs."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.by_kind: dict[str, Callable[[Mapping[str, Any], int], _Make]] = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "integer": lambda schema, _: _integer(*_bounds(schema)),
            "number": lambda schema, _: _integer(*_bounds(schema)),
            "boolean": lambda _schema, _: lambda rng: rng.random() < 0.5,
        }

    def compile(self, schema: Any, depth: int = 0) -> _Make:
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return _constant(None)
        if isinstance(schema.get("$ref"), str):
            return self.compile(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return _constant(schema["const"])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return lambda rng: rng.choice(enum)
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.compile(schema[key][0], depth + 1)
        build = self.by_kind.get(_kind(schema))
        return build(schema, depth) if build is not None else _constant(None)

    def _resolve(self, ref: str) -> Any:
        """A local reference (`#/$defs/Name`); remote ones resolve to nothing."""
        node: Any = self.root if ref.startswith("#") else None
        for part in filter(None, ref[1:].split("/")):
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        return node

    def _object(self, schema: Mapping[str, Any], depth: int) -> _Make:
        props = schema.get("properties")
        parts = [(k, self.compile(v, depth + 1)) for k, v in props.items()] if isinstance(props, dict) else []
        return lambda rng: {name: make(rng) for name, make in parts}

    def _array(self, schema: Mapping[str, Any], depth: int) -> _Make:
        count = range(int(min(max(1, _num(schema, "minItems", 1)), _num(schema, "maxItems", 3))))
        item = self.compile(schema.get("items", {}), depth + 1)
        return lambda rng: [item(rng) for _ in count]

    def _string(self, schema: Mapping[str, Any], _depth: int) -> _Make:
        fixed = _FORMATS.get(str(schema.get("format")))
        if fixed is not None:
            return _constant(fixed)
        low, high = int(_num(schema, "minLength", 0)), int(_num(schema, "maxLength", 64))
        words = [(word * (1 + low // len(word)))[: max(low, min(high, len(word)))] for word in _WORDS]
        return lambda rng: rng.choice(words)


def _wrong_value(schema: Any, current: Any) -> tuple[int, Any] | None:
    """A wrong value for `schema`, ranked (numbers first: `"12 EUR"` is the classic model slip)."""
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list):
        return 1, "other-" + "-".join(str(v) for v in schema["enum"])[:40]
    declared = schema.get("type")
    if declared in ("number", "integer"):
        return 0, f"{current} EUR"
    if declared == "string":
        return 2, 12
    return (3, "n/a") if isinstance(declared, str) and declared != "null" else None


def _violate(args: Any, params: Any) -> Any:
    """Break `args` against `params`: a field of the wrong type, else a required field dropped, else no
    object at all."""
    props = params.get("properties") if isinstance(params, dict) else None
    if isinstance(args, dict) and isinstance(props, dict):
        ranked = [(bad, name) for name, sub in props.items() if (bad := _wrong_value(sub, args.get(name)))]
        if ranked:
            (_, value), name = min(ranked, key=lambda item: item[0][0])
            return {**args, name: value}
        required = [name for name in params.get("required", ()) if name in args]
        if required:
            return {k: v for k, v in args.items() if k != required[0]}
    return [args]


# ---------------------------------------------------------------------------------------------------- answers


class _Reject(Exception):
    """A request vLLM would refuse before generating: rendered as an error envelope with `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "BadRequestError"
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _chat_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Reject(400, f"Invalid JSON in request body: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise _Reject(400, "The request body must be a JSON object with `model` and `messages`.", "messages")
    return body


@dataclass(frozen=True, slots=True)
class _Answer:
    pieces: tuple[str, ...]  # content pieces, or the call's argument fragments
    finish: str
    call: tuple[str, str, str] | None = None  # (id, name, arguments)
    deltas: tuple[bytes, ...] | None = None  # the pieces' stream deltas, when precomputed (text answers)

    @property
    def tokens(self) -> int:
        return len(self.pieces) + (1 if self.call else 0)


_FRAGMENT = 6  # characters per streamed argument fragment: vLLM's hermes parser sends a few per delta
_REFUSAL = "I can help with that, but first I need to know which account you mean."


def _split(text: str, size: int = _FRAGMENT) -> tuple[str, ...]:
    return tuple(text[i : i + size] for i in range(0, len(text), size)) or ("",)


def _words(text: str) -> tuple[str, ...]:
    first, *rest = text.split(" ")
    return (first, *(" " + word for word in rest))


def _text_pieces(count: int) -> tuple[str, ...]:
    """The `count` word pieces of a model's text answer (the same for every request: it is never judged)."""
    return _words(" ".join(_WORDS[i % len(_WORDS)] for i in range(count)))


def _hermes(name: str, arguments: str) -> str:
    """The call as the model writes it for vLLM's hermes parser (what a cut call comes back as)."""
    return f'<tool_call>\n{{"name": {orjson.dumps(name).decode()}, "arguments": {arguments}}}\n</tool_call>'


def _chosen_tool(body: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], bool] | None:
    """The tool to call, every declared name, and whether tool_choice named it; None when no call is due."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools
    ):
        raise _Reject(400, "`tools` must be a list of {type: function, function: {...}} objects", "tools")
    functions = [t["function"] for t in tools]
    names = [str(f.get("name", "")) for f in functions]
    named = choice.get("function") if isinstance(choice, dict) else None
    wanted = named.get("name") if isinstance(named, dict) else None
    if wanted is None:
        return functions[0], names, False
    if wanted not in names:
        raise _Reject(400, f"Tool '{wanted}' has not been passed in `tools`.", "tool_choice")
    return functions[names.index(wanted)], names, True


def _tool_answer(
    function: Mapping[str, Any],
    names: list[str],
    named: bool,
    flaw: str | None,
    rng: random.Random,
    plan: _Make,
) -> _Answer:
    params = function.get("parameters", {})
    args = plan(rng)
    name = str(function.get("name", ""))
    if flaw == "schema_violation":
        args = _violate(args, params)
    text = orjson.dumps(args if args is not None else {}).decode()
    call_id = f"chatcmpl-tool-{rng.getrandbits(64):016x}"
    if flaw == "missing_tool_call":
        return _Answer(_words(_REFUSAL), "stop")
    if flaw == "truncated":  # cut inside the arguments, as max_tokens cuts a call: plain content, "length"
        partial = _hermes(name, text)[: len(_hermes(name, "")) - 14 + len(text) // 2]
        return _Answer(_split(partial, 4), "length")
    if flaw == "malformed_json":
        text = text[: max(1, len(text) * 2 // 3)]
    elif flaw == "unknown_tool":
        while name in names:
            name += "_v2"
    return _Answer(_split(text), "stop" if named else "tool_calls", (call_id, name, text))


def _limit(answer: _Answer, body: Mapping[str, Any]) -> _Answer:
    """Apply the request's max_tokens: a longer answer is cut and finishes with "length" (a cut call arrives
    as plain content with no tool_calls, as vLLM's hermes parser returns it)."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(limit, int) or limit <= 0 or answer.tokens <= limit:
        return answer
    if answer.call is None:
        return _Answer(answer.pieces[:limit], "length", None, answer.deltas and answer.deltas[:limit])
    return _Answer(_split(_hermes(answer.call[1], answer.call[2]), 4)[:limit], "length")


# -------------------------------------------------------------------------------------------------- rendering

_JSON = "application/json"
_DONE = b"data: [DONE]\n\n"
_ROLE = b'{"role":"assistant","content":""}'
_EMPTY = b"{}"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}


def _envelope(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    """vLLM's error body: OpenAI's envelope, the exception class name as `type`, the status as `code`."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def _completion_body(head: _Frames, answer: _Answer, prompt: int) -> bytes:
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


class _Frames:
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


def _content_deltas(pieces: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(orjson.dumps({"content": piece}) for piece in pieces)


def _body_deltas(answer: _Answer) -> Sequence[bytes]:
    if answer.deltas is not None:
        return answer.deltas
    if answer.call is None:
        return _content_deltas(answer.pieces)
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


def _stream_frames(frames: _Frames, answer: _Answer, usage: int | None, break_at: int | None) -> list[bytes]:
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


def _due(count: int, paced: int, model: ModelBehaviour) -> list[float]:
    """Seconds after the headers at which each of `count` frames is due: the role delta and the first delta
    at `ttft_ms`, then one delta per 1/`tokens_per_s` up to frame `paced`; the closing frames go with it."""
    ttft, interval = model.ttft_ms / 1000, (1 / model.tokens_per_s if model.tokens_per_s else 0.0)
    return [ttft + max(0, min(i, paced) - 1) * interval for i in range(count)]


class _CoalescedStream(web.StreamResponse):
    """A stream whose first frame is due at once: aiohttp then sends the headers with the first frames (and,
    unpaced, with the chunked terminator) in one socket write instead of three. Profiled under load, those
    separate writes were the largest single cost of an unpaced stream on this server."""

    _send_headers_immediately = False  # aiohttp's own switch, the one `web.Response` sets


async def _send_paced(resp: web.StreamResponse, frames: list[bytes], due: list[float]) -> None:
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


# ----------------------------------------------------------------------------------------------------- server


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
    text: _Answer
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
        self.plans: dict[bytes, _Make] = {}
        self.total = 0
        for name, model in behaviour.models.items():
            self._serve(name, model, name, None)
        for name, path in behaviour.lora_modules.items():
            self._serve(name, behaviour.for_adapter(name), path, self.base)

    def _serve(self, name: str, model: ModelBehaviour, root: str, parent: str | None) -> None:
        pieces = _text_pieces(model.output_tokens)
        text = _Answer(pieces, "stop", None, _content_deltas(pieces))
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
            body = _chat_body(raw)
            served = self.served.get(body["model"]) if isinstance(body.get("model"), str) else None
            if served is None:
                raise _Reject(
                    404, f"The model `{body.get('model')}` does not exist.", "model", "NotFoundError"
                )
            return await self._generate(request, body, served, max(1, len(raw) // 4))
        except _Reject as exc:
            return _envelope(exc.status, exc.message, exc.kind, exc.param)

    async def _generate(
        self, request: web.Request, body: dict[str, Any], served: _Served, prompt: int
    ) -> web.StreamResponse:
        self.stats.requests[served.name] = self.stats.requests.get(served.name, 0) + 1
        rng, rid = self._rng(served.name, request.headers.get("X-Request-Id"))
        u_error, u_flaw, u_break = rng.random(), rng.random(), rng.random()  # always drawn, in this order
        model = served.behaviour
        if u_error < model.error_rate:
            self.stats.injected_errors += 1
            return _envelope(500, "simulated engine failure", "InternalServerError")
        answer = self._answer(body, served, model.invalid.draw(u_flaw), rng)
        head = _Frames(f"chatcmpl-{rid}", int(time.time()), served.name)
        if body.get("stream") is True:
            broken = u_break < model.midstream_error_rate
            return await self._stream(request, *self._frames(body, head, answer, prompt, broken, rng), model)
        if model.latency_ms:
            await asyncio.sleep(model.latency_ms / 1000)
        return web.Response(body=_completion_body(head, answer, prompt), content_type=_JSON)

    def _frames(
        self,
        body: dict[str, Any],
        head: _Frames,
        answer: _Answer,
        prompt: int,
        broken: bool,
        rng: random.Random,
    ) -> tuple[list[bytes], int]:
        """The stream's frames, and how many of them are paced (the role delta and the body deltas)."""
        options = body.get("stream_options")
        usage = prompt if isinstance(options, dict) and options.get("include_usage") is True else None
        break_at = rng.randint(1, max(1, answer.tokens - 1)) if broken else None
        self.stats.midstream_errors += broken
        return _stream_frames(head, answer, usage, break_at), 1 + (break_at or answer.tokens)

    def _answer(self, body: dict[str, Any], served: _Served, flaw: str | None, rng: random.Random) -> _Answer:
        chosen = _chosen_tool(body)
        if chosen is None:
            return _limit(served.text, body)
        return _limit(_tool_answer(*chosen, flaw, rng, self._plan(chosen[0].get("parameters", {}))), body)

    def _plan(self, params: Any) -> _Make:
        key = orjson.dumps(params)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _PLAN_CACHE:
                self.plans.clear()
            plan = self.plans[key] = _Compiler(params if isinstance(params, dict) else {}).compile(params)
        return plan

    async def _stream(
        self, request: web.Request, frames: list[bytes], paced: int, model: ModelBehaviour
    ) -> web.StreamResponse:
        due = _due(len(frames), paced, model)
        resp = (_CoalescedStream if due[0] <= 0 else web.StreamResponse)(headers=_SSE_HEADERS)
        self.stats.active_streams += 1
        try:
            await resp.prepare(request)
            await _send_paced(resp, frames, due)
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
        return web.Response(body=orjson.dumps({"object": "list", "data": cards}), content_type=_JSON)

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response()

    async def sim_stats(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(dataclasses.asdict(self.stats)), content_type=_JSON)

    async def _lora_request(self, request: web.Request, keys: tuple[str, ...]) -> dict[str, str]:
        if request.content_type != _JSON:
            raise _Reject(400, f"Expected Content-Type {_JSON}, got {request.content_type!r}")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise _Reject(400, f"Invalid JSON in request body: {exc}") from exc
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) and body[k] for k in keys):
            raise _Reject(400, f"Both {' and '.join(repr(k) for k in keys)} must be provided.")
        return body

    async def load_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._lora_request(request, ("lora_name", "lora_path"))
        except _Reject as exc:
            return _envelope(exc.status, exc.message, exc.kind, exc.param)
        name, path = body["lora_name"], body["lora_path"]
        if name in self.served:
            return _envelope(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        if not await asyncio.to_thread(os.path.exists, path):  # a stat, off the loop
            return _envelope(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        self._serve(name, self.behaviour.for_adapter(name), path, self.base)
        self.stats.adapter_loads += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        try:
            name = (await self._lora_request(request, ("lora_name",)))["lora_name"]
        except _Reject as exc:
            return _envelope(exc.status, exc.message, exc.kind, exc.param)
        served = self.served.get(name)
        if served is None or served.parent is None:
            return _envelope(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
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
