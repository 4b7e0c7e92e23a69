"""Online tool-call validation: what a request declared (`Expectation`), what the model returned
(`Completion`), and the verdict on it (`Verdict`). Owns reading `tools` / `tool_choice` / `response_format`
from a request body, the compiled-schema cache (`SchemaCache`, JSON Schema 2020-12 through jsonschema-rs) and
the rules of `check()`: declared tool names only, arguments that parse as JSON and validate against the tool's
`parameters`, a required call present, a `json_schema` response format honoured, and calls cut by `max_tokens`
counted as truncated rather than invalid. Given the cache, `expectation_from_request` compiles every declared
schema when the request is read, so a schema that is too large or does not compile is the client's 400 (naming
the tool) before any engine sees the request, and the check itself never compiles. Whatever the model returns,
the check gives a verdict and never raises. Pure: no I/O. A verdict never carries prompt or completion text:
only JSON pointers into the schema and, for instance locations, segments that also appear in the schema (or
array indices).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jsonschema_rs
import orjson

from gateway.errors import BadRequest
from gateway.openai_types import deeper_than

VALID: Final = "valid"
INVALID: Final = "invalid"
NONE: Final = "none"
TRUNCATED: Final = "truncated"

UNKNOWN_TOOL: Final = "unknown_tool"
MALFORMED_JSON: Final = "malformed_json"
SCHEMA_VIOLATION: Final = "schema_violation"
MISSING_TOOL_CALL: Final = "missing_tool_call"
UNPARSED_TOOL_CALL: Final = "unparsed_tool_call"
ARGUMENTS_TOO_DEEP: Final = "arguments_too_deep"
UNVALIDATABLE: Final = "unvalidatable"  # the validator raised on the arguments: they could not be checked
# The called tool's schema did not compile (only when the request's schemas were not compiled as it was read).
SCHEMA_UNUSABLE: Final = "schema_unusable"

# Arguments (or json_schema content) nested deeper than this are invalid (`arguments_too_deep`), whatever the
# schema allows. jsonschema-rs 0.61 raises "Recursion limit reached" when it builds an error whose instance is
# more than 255 levels deep, and orjson refuses more than 1,024 levels; tool arguments are a few levels deep
# (OpenAI's structured outputs allow 10).
MAX_ARGUMENT_DEPTH: Final = 128

DEFAULT_CACHE_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_SCHEMA_BYTES: Final = 256 * 1024
# The cache's memory estimate per entry, measured with loadtests/bench_schemas.py (RSS gained while compiling
# distinct schemas in a fresh process, jsonschema-rs 0.61.2): a compiled draft 2020-12 validator holds 21-22
# bytes per byte of its schema's compact JSON when the schema is mostly properties with patterns, bounds and
# enums (about 7 when it is mostly descriptions), plus about 6 KB per entry whatever its size. The cache also
# keeps the key (1 byte per byte).
_BYTES_PER_SCHEMA_BYTE: Final = 22 + 1
_BYTES_PER_ENTRY: Final = 6 * 1024
_PROBLEM_CHARS: Final = 200  # a compile error's message is cut to this length in the client's 400

# The markup engines' tool parsers read (hermes, mistral, llama 3). Content that still carries one when the parser
# returned no call is a call the model wrote and the parser could not read: vLLM's hermes parser hands a call with
# broken JSON back as plain content, which would otherwise look like an answer without a call.
TOOL_CALL_MARKERS: Final = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw JSON string the model produced


@dataclass(frozen=True, slots=True)
class Completion:
    """One choice's final output, from a non-stream body or an accumulated stream."""

    index: int
    content: str | None
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the request declared, read once per request by `expectation_from_request`."""

    tools: Mapping[str, Mapping[str, Any] | None]  # tool name -> its `parameters` schema (None = no schema)
    required: bool  # tool_choice == "required" or names a tool
    forced_name: str | None  # the tool named by tool_choice, if any
    content_schema: Mapping[str, Any] | None  # response_format json_schema's schema
    tool_choice: str  # "auto" | "none" | "required" | "named" (for records)
    # Compiled as the request was read (`expectation_from_request` given a cache): tool name -> validator,
    # and the content schema's. None: not compiled yet, so `check()` compiles through its cache.
    validators: Mapping[str, Any] | None = None
    content_validator: Any = None

    @property
    def active(self) -> bool:
        # tool_choice "none" takes the tools out of play (vLLM runs no tool parser then), so only a content
        # schema is left to check.
        return (bool(self.tools) and self.tool_choice != "none") or self.content_schema is not None


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # "valid" | "invalid" | "none" | "truncated"
    # unknown_tool | malformed_json | schema_violation | missing_tool_call | unparsed_tool_call | truncated |
    # arguments_too_deep | unvalidatable | schema_unusable
    reason: str | None
    path: str | None  # JSON pointer into the arguments of the first schema error, e.g. "/amount"
    detail: str | None  # the first error's keyword and schema path, e.g. "type at /properties/amount/type"
    calls: int  # number of tool calls returned (all choices)
    bad_schema: bool = False  # a called tool's schema (or the content schema) did not compile

    @property
    def header(self) -> str:
        # x-gateway-tool-calls has three values only (README, "Tool-call modes"); a truncation is not a verdict on
        # a call.
        return NONE if self.status == TRUNCATED else self.status


_VALID = Verdict(VALID, None, None, None, 0)
NO_VERDICT = Verdict(NONE, None, None, None, 0)  # nothing was expected or checked; the proxy returns it too
_TRUNCATED = Verdict(TRUNCATED, TRUNCATED, None, None, 0)
_UNKNOWN = Verdict(INVALID, UNKNOWN_TOOL, None, None, 0)
_MALFORMED = Verdict(INVALID, MALFORMED_JSON, None, None, 0)
_MISSING = Verdict(INVALID, MISSING_TOOL_CALL, None, None, 0)
_UNPARSED = Verdict(INVALID, UNPARSED_TOOL_CALL, None, None, 0)
_TOO_DEEP = Verdict(INVALID, ARGUMENTS_TOO_DEEP, None, None, 0)
_UNVALIDATABLE = Verdict(INVALID, UNVALIDATABLE, None, None, 0)
_UNUSABLE = Verdict(INVALID, SCHEMA_UNUSABLE, None, None, 0, bad_schema=True)


# --- reading the request ------------------------------------------------------------------------------------


def expectation_from_request(body: Mapping[str, Any], schemas: SchemaCache | None = None) -> Expectation:
    """Read what the request declared; entries of the wrong shape are ignored rather than trusted.

    With `schemas`, every declared schema is compiled now (a cache hit for a schema seen before), and one that
    is too large or does not compile raises `BadRequest` naming the tool and the reason."""
    declared = list(_function_tools(body.get("tools")))
    tools = {name: params for _, name, params in declared}  # a repeated name: the last one counts
    choice, forced = _tool_choice(body.get("tool_choice"), bool(tools))
    content = _content_schema(body.get("response_format"))
    validators: dict[str, Any] | None = None
    content_validator = None
    if schemas is not None:
        validators = {
            name: schemas.require(params, i, name) for i, name, params in declared if params is not None
        }
        if content is not None:
            content_validator = schemas.require(content, None, None)
    return Expectation(
        tools=tools,
        required=choice in ("required", "named"),
        forced_name=forced,
        content_schema=content,
        tool_choice=choice,
        validators=validators,
        content_validator=content_validator,
    )


def _function_tools(tools: Any) -> Iterable[tuple[int, str, Mapping[str, Any] | None]]:
    """(index in `tools`, name, `parameters` or None) of each function tool with a name."""
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        fn = (
            tool.get("function")
            if isinstance(tool, dict) and tool.get("type", "function") == "function"
            else None
        )
        if isinstance(fn, dict) and isinstance(name := fn.get("name"), str):
            params = fn.get("parameters")
            yield i, name, params if isinstance(params, dict) else None


def _tool_choice(choice: Any, has_tools: bool) -> tuple[str, str | None]:
    if choice is None:  # OpenAI's default: "auto" when tools are present, else "none"
        return ("auto" if has_tools else "none"), None
    if choice in ("auto", "none", "required"):
        return choice, None
    if isinstance(choice, dict) and isinstance(fn := choice.get("function"), dict):
        name = fn.get("name")
        if isinstance(name, str):
            return "named", name
    return "auto", None  # an unknown form constrains nothing we can check


def _content_schema(fmt: Any) -> Mapping[str, Any] | None:
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def completions_from_response(body: Mapping[str, Any]) -> list[Completion]:
    """The choices of a non-stream chat.completion body, in the shape `check()` takes."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return []
    return [_completion(i, c) for i, c in enumerate(choices) if isinstance(c, dict)]


def _completion(position: int, choice: Mapping[str, Any]) -> Completion:
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content = message.get("content")
    index = choice.get("index")
    return Completion(
        index=index if isinstance(index, int) else position,
        content=content if isinstance(content, str) else None,
        tool_calls=tuple(_tool_calls(message.get("tool_calls"))),
        finish_reason=choice.get("finish_reason"),
    )


def _tool_calls(calls: Any) -> Iterable[ToolCall]:
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            yield ToolCall(
                id=_str(call.get("id")), name=_str(fn.get("name")), arguments=_str(fn.get("arguments"))
            )


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


# --- compiled schemas ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Compiled:
    validator: Any  # None: too large, or it did not compile
    problem: str | None  # why not, completing "Tool 'x': its parameters schema ..." in the client's 400
    code: str | None  # the 400's code: schema_too_large | invalid_schema
    cost: int  # estimated bytes this entry holds while cached


class SchemaCache:
    """Compiles each JSON Schema (draft 2020-12) once; an LRU keyed by the schema's orjson bytes, bounded both
    by count and by an estimate of the memory its validators hold (`max_bytes`).

    Keying by content (not identity) is what lets one compiled validator serve every request that declares the
    same tool: bodies are parsed afresh per request. A schema that fails to compile is cached as such, so a
    client sending it on every request pays the failed compile once. A schema over `max_schema_bytes` is never
    compiled. Compiling holds the GIL for its whole length (loadtests/bench_schemas.py: 70-180 ms for 1 MB on the
    2-core machine, and the event loop stalled as long with the compile in a worker thread), so schemas compile
    inline, and the size cap is what bounds the stall (about 17 ms at the default 256 KiB, once per schema).
    `validate_formats` asserts `format` (date, date-time, email, uuid, ...), which 2020-12 otherwise treats as
    an annotation: a CRM `close_date` of "next Friday" is an invalid call for the product.
    """

    def __init__(
        self,
        maxsize: int = 1024,
        *,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        max_schema_bytes: int = DEFAULT_MAX_SCHEMA_BYTES,
        validate_formats: bool = True,
    ) -> None:
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._max_schema_bytes = max_schema_bytes
        self._validate_formats = validate_formats
        self._entries: OrderedDict[bytes, _Compiled] = OrderedDict()
        self.bytes = 0  # the estimated memory held by the cached entries
        self.rejected = 0  # schemas that failed to compile (counted once per cache entry)

    @property
    def size(self) -> int:
        # A property, not __len__: an empty cache must not be falsy (`cache or SchemaCache()` would drop it).
        return len(self._entries)

    def validator(self, schema: Mapping[str, Any]) -> Any:
        """The compiled validator for `schema`, or None when it is too large or does not compile."""
        return self._lookup(schema).validator

    def require(self, schema: Mapping[str, Any], index: int | None, name: str | None) -> Any:
        """The compiled validator for `schema`, declared by `tools[index]` named `name` (None: the request's
        response_format); else `BadRequest` naming the tool (or the response format) and why."""
        found = self._lookup(schema)
        if found.validator is not None:
            return found.validator
        if index is None:
            where, param = "response_format: the json_schema schema", "response_format.json_schema.schema"
        else:
            where, param = f"Tool {name!r}: its parameters schema", f"tools[{index}].function.parameters"
        raise BadRequest(f"{where} {found.problem}.", param=param, code=found.code)

    def _lookup(self, schema: Mapping[str, Any]) -> _Compiled:
        try:
            key = orjson.dumps(schema)
        except TypeError as exc:  # orjson.JSONEncodeError: nested deeper than 255 levels
            return _Compiled(None, f"could not be read: {exc}", "invalid_schema", 0)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        if len(key) > self._max_schema_bytes:
            limit = f"{self._max_schema_bytes:,} bytes per schema"
            return _Compiled(
                None, f"is {len(key):,} bytes of JSON; the limit is {limit}", "schema_too_large", 0
            )
        entry = self._compile(schema, len(key))
        self._store(key, entry)
        return entry

    def _store(self, key: bytes, entry: _Compiled) -> None:
        if entry.cost > self._max_bytes:
            return  # larger than the whole cache: compiled for this request only
        self._entries[key] = entry
        self.bytes += entry.cost
        while self.bytes > self._max_bytes or len(self._entries) > self._maxsize:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.cost

    def _compile(self, schema: Mapping[str, Any], size: int) -> _Compiled:
        try:
            # offline: a client-supplied remote $ref must never make the gateway fetch a URL (SSRF, and a
            # network round trip on the hot path); it fails to compile instead.
            doc = schema if isinstance(schema, dict) else dict(schema)
            validator = jsonschema_rs.Draft202012Validator(
                doc, validate_formats=self._validate_formats, offline=True
            )
        except (ValueError, TypeError, OverflowError) as exc:  # jsonschema_rs.ValidationError is a ValueError
            self.rejected += 1
            return _Compiled(None, _problem(exc), "invalid_schema", _BYTES_PER_ENTRY + size)
        return _Compiled(validator, None, None, _BYTES_PER_ENTRY + size * _BYTES_PER_SCHEMA_BYTE)


def _problem(exc: Exception) -> str:
    """Why a schema did not compile, in words for the client (who sent the schema)."""
    message = getattr(exc, "message", None)
    message = message if isinstance(message, str) else str(exc)
    if "retrieving it failed" in message:  # jsonschema-rs's Referencing error, offline or without a base URI
        reason = message[:_PROBLEM_CHARS]
        return f"has a $ref this gateway does not resolve ({reason}); remote $ref is not allowed: use $defs"
    where = _pointer(getattr(exc, "instance_path", None) or ())
    at = f" at {where}" if where else ""
    return f"is not a valid JSON Schema (draft 2020-12){at}: {message[:_PROBLEM_CHARS]}"


# --- the check ----------------------------------------------------------------------------------------------


def check(completions: Sequence[Completion], exp: Expectation, cache: SchemaCache) -> Verdict:
    """The verdict on all choices: the first invalid one, else truncated, else valid, else none."""
    if not exp.active:
        return NO_VERDICT
    results = [_check_choice(c, exp, cache) for c in completions]
    if not results:
        return NO_VERDICT
    found = min(results, key=_rank)  # min() keeps the first of equals: the first invalid choice wins
    calls = sum(len(c.tool_calls) for c in completions)
    bad = any(r.bad_schema for r in results)
    if not calls and bad == found.bad_schema:
        return found
    # Built directly: dataclasses.replace() costs more than the whole valid-path check.
    return Verdict(found.status, found.reason, found.path, found.detail, calls, bad)


_RANK: Final = {INVALID: 0, TRUNCATED: 1, VALID: 2, NONE: 3}


def _rank(verdict: Verdict) -> int:
    return _RANK[verdict.status]


def _check_choice(choice: Completion, exp: Expectation, cache: SchemaCache) -> Verdict:
    if choice.finish_reason == "length":
        # vLLM returns a call cut by max_tokens as plain content: neither a call nor a verdict on one.
        return _TRUNCATED
    if choice.tool_calls:
        return _check_calls(choice.tool_calls, exp, cache)
    if exp.tools and exp.tool_choice != "none" and choice.content and _has_markup(choice.content):
        return _UNPARSED
    if exp.required:
        return _MISSING
    if exp.content_schema is not None:
        validator = (
            exp.content_validator if exp.validators is not None else cache.validator(exp.content_schema)
        )
        return _check_json(choice.content or "", validator)
    return NO_VERDICT


def _has_markup(content: str) -> bool:
    return any(marker in content for marker in TOOL_CALL_MARKERS)


def _check_calls(calls: tuple[ToolCall, ...], exp: Expectation, cache: SchemaCache) -> Verdict:
    for call in calls:
        if call.name not in exp.tools or (exp.forced_name is not None and call.name != exp.forced_name):
            return _UNKNOWN
        schema = exp.tools[call.name]
        if schema is None:
            verdict = _parse_only(call.arguments)
        elif exp.validators is not None:
            verdict = _check_json(call.arguments, exp.validators.get(call.name))
        else:
            verdict = _check_json(call.arguments, cache.validator(schema))
        if verdict.status == INVALID:
            return verdict
    return _VALID


def _parse(text: str) -> Any:
    """The parsed JSON, or the verdict on text that does not parse or nests too deep."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return _TOO_DEEP if "depth" in str(exc) else _MALFORMED  # orjson: "depth limit exceeded" past 1,024
    if _deeper_than(value, text, MAX_ARGUMENT_DEPTH):
        return _TOO_DEEP
    return value


def _parse_only(text: str) -> Verdict:
    value = _parse(text)
    return value if isinstance(value, Verdict) else _VALID


def _deeper_than(value: Any, text: str, limit: int) -> bool:
    # Every array or object opens with a bracket, so text with no more brackets than the limit is within it:
    # two C-level counts (~0.1 µs) spare the walk for all but unusual arguments.
    return text.count("{") + text.count("[") > limit and deeper_than(value, limit)


# What jsonschema-rs raises on an instance it cannot evaluate (or an error it cannot hand back).
_VALIDATOR_ERRORS: Final = (ValueError, TypeError, OverflowError, RecursionError)


def _check_json(text: str, validator: Any) -> Verdict:
    instance = _parse(text)
    if isinstance(instance, Verdict):
        return instance
    if validator is None:  # the schema did not compile (only when the request's schemas were not prepared)
        return _UNUSABLE
    try:
        # The common case costs one pass; errors are collected only on failure.
        if validator.is_valid(instance):
            return _VALID
    except _VALIDATOR_ERRORS:
        return _UNVALIDATABLE
    try:
        return _violation(next(iter(validator.iter_errors(instance)), None))
    except _VALIDATOR_ERRORS:  # e.g. an error it cannot hand back to Python
        return _violation(None)


def _violation(error: Any) -> Verdict:
    if error is None:  # is_valid said no but no error came out: still a violation, location unknown
        return Verdict(INVALID, SCHEMA_VIOLATION, None, None, 0)
    # Never error.message / verbose_message / instance / kind details: they quote the instance (completion
    # text). Only the keyword and the two paths are kept; the instance path is redacted against the schema.
    kind = getattr(getattr(error, "kind", None), "name", None)
    keyword = kind if isinstance(kind, str) else "unknown"
    schema_path = _pointer(error.schema_path)
    path = _pointer(_redact(error.instance_path, error.evaluation_path))
    return Verdict(INVALID, SCHEMA_VIOLATION, path, f"{keyword} at {schema_path}", 0)


def _redact(instance_path: Sequence[str | int], evaluation_path: Sequence[str | int]) -> list[str | int]:
    # An object key reached through `properties` appears in the evaluation path (it is schema text); a key
    # reached through additionalProperties / patternProperties does not: the model chose it, so it is hidden.
    if all(isinstance(seg, int) for seg in instance_path):
        return list(instance_path)
    known = {seg for seg in evaluation_path if isinstance(seg, str)}
    return [seg if isinstance(seg, int) or seg in known else "*" for seg in instance_path]


def _pointer(segments: Iterable[str | int]) -> str:
    """RFC 6901 JSON pointer ("" is the whole document)."""
    return "".join("/" + str(seg).replace("~", "~0").replace("/", "~1") for seg in segments)
