"""What the simulated engine answers, before any wire format: the chat request read (`chat_body`; what vLLM
would refuse is a `Reject`), then the model's text, or one call of the chosen tool with arguments drawn from its
JSON Schema (compiled once per schema: `Compiler`) and spoiled by the drawn flaw, cut to the request's max_tokens
(`limit_tokens`). Every draw comes from the request's own `random.Random`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

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


Make = Callable[[random.Random], Any]


def _constant(value: Any) -> Make:
    return lambda _rng: value


def _integer(low: int, high: int) -> Make:
    return lambda rng: rng.randint(low, high)


class Compiler:
    """Compiles a tool's `parameters` (the JSON Schema subset tool declarations use) into a function that draws
    a valid value from an rng. Compiled once per distinct schema (the engine's plan cache): interpreting the
    schema on every request measured ~80 µs per tool-call answer, the whole answer with a compiled plan ~25 µs."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.by_kind: dict[str, Callable[[Mapping[str, Any], int], Make]] = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "integer": lambda schema, _: _integer(*_bounds(schema)),
            "number": lambda schema, _: _integer(*_bounds(schema)),
            "boolean": lambda _schema, _: lambda rng: rng.random() < 0.5,
        }

    def compile(self, schema: Any, depth: int = 0) -> Make:
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

    def _object(self, schema: Mapping[str, Any], depth: int) -> Make:
        props = schema.get("properties")
        parts = [(k, self.compile(v, depth + 1)) for k, v in props.items()] if isinstance(props, dict) else []
        return lambda rng: {name: make(rng) for name, make in parts}

    def _array(self, schema: Mapping[str, Any], depth: int) -> Make:
        count = range(int(min(max(1, _num(schema, "minItems", 1)), _num(schema, "maxItems", 3))))
        item = self.compile(schema.get("items", {}), depth + 1)
        return lambda rng: [item(rng) for _ in count]

    def _string(self, schema: Mapping[str, Any], _depth: int) -> Make:
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


class Reject(Exception):
    """A request vLLM would refuse before generating: rendered as an error envelope with `status`."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "BadRequestError"
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def chat_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Reject(400, f"Invalid JSON in request body: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise Reject(400, "The request body must be a JSON object with `model` and `messages`.", "messages")
    return body


@dataclass(frozen=True, slots=True)
class Answer:
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


def text_pieces(count: int) -> tuple[str, ...]:
    """The `count` word pieces of a model's text answer (the same for every request: it is never judged)."""
    return _words(" ".join(_WORDS[i % len(_WORDS)] for i in range(count)))


def _hermes(name: str, arguments: str) -> str:
    """The call as the model writes it for vLLM's hermes parser (what a cut call comes back as)."""
    return f'<tool_call>\n{{"name": {orjson.dumps(name).decode()}, "arguments": {arguments}}}\n</tool_call>'


def chosen_tool(body: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], bool] | None:
    """The tool to call, every declared name, and whether tool_choice named it; None when no call is due."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools
    ):
        raise Reject(400, "`tools` must be a list of {type: function, function: {...}} objects", "tools")
    functions = [t["function"] for t in tools]
    names = [str(f.get("name", "")) for f in functions]
    named = choice.get("function") if isinstance(choice, dict) else None
    wanted = named.get("name") if isinstance(named, dict) else None
    if wanted is None:
        return functions[0], names, False
    if wanted not in names:
        raise Reject(400, f"Tool '{wanted}' has not been passed in `tools`.", "tool_choice")
    return functions[names.index(wanted)], names, True


def tool_answer(
    function: Mapping[str, Any],
    names: list[str],
    named: bool,
    flaw: str | None,
    rng: random.Random,
    plan: Make,
) -> Answer:
    params = function.get("parameters", {})
    args = plan(rng)
    name = str(function.get("name", ""))
    if flaw == "schema_violation":
        args = _violate(args, params)
    text = orjson.dumps(args if args is not None else {}).decode()
    call_id = f"chatcmpl-tool-{rng.getrandbits(64):016x}"
    if flaw == "missing_tool_call":
        return Answer(_words(_REFUSAL), "stop")
    if flaw == "truncated":  # cut inside the arguments, as max_tokens cuts a call: plain content, "length"
        partial = _hermes(name, text)[: len(_hermes(name, "")) - 14 + len(text) // 2]
        return Answer(_split(partial, 4), "length")
    if flaw == "malformed_json":
        text = text[: max(1, len(text) * 2 // 3)]
    elif flaw == "unknown_tool":
        while name in names:
            name += "_v2"
    return Answer(_split(text), "stop" if named else "tool_calls", (call_id, name, text))


def limit_tokens(answer: Answer, body: Mapping[str, Any]) -> Answer:
    """Apply the request's max_tokens: a longer answer is cut and finishes with "length" (a cut call arrives
    as plain content with no tool_calls, as vLLM's hermes parser returns it)."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(limit, int) or limit <= 0 or answer.tokens <= limit:
        return answer
    if answer.call is None:
        return Answer(answer.pieces[:limit], "length", None, answer.deltas and answer.deltas[:limit])
    return Answer(_split(_hermes(answer.call[1], answer.call[2]), 4)[:limit], "length")
