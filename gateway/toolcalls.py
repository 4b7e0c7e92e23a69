"""Online tool-call validation: what a request declared (`Expectation`), what the model returned
(`Completion`), and the verdict on it (`Verdict`). Owns reading `tools` / `tool_choice` / `response_format`
from a request body, the compiled-schema cache (`SchemaCache`, JSON Schema 2020-12 through jsonschema-rs) and
the rules of `check()`: declared tool names only, arguments that parse as JSON and validate against the tool's
`parameters`, a required call present, a `json_schema` response format honoured, and calls cut by `max_tokens`
counted as truncated rather than invalid. Pure: no I/O. A verdict never carries prompt or completion text:
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

VALID: Final = "valid"
INVALID: Final = "invalid"
NONE: Final = "none"
TRUNCATED: Final = "truncated"

UNKNOWN_TOOL: Final = "unknown_tool"
MALFORMED_JSON: Final = "malformed_json"
SCHEMA_VIOLATION: Final = "schema_violation"
MISSING_TOOL_CALL: Final = "missing_tool_call"
UNPARSED_TOOL_CALL: Final = "unparsed_tool_call"

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

    @property
    def active(self) -> bool:
        # tool_choice "none" takes the tools out of play (vLLM runs no tool parser then), so only a content
        # schema is left to check.
        return (bool(self.tools) and self.tool_choice != "none") or self.content_schema is not None


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # "valid" | "invalid" | "none" | "truncated"
    reason: str | None  # unknown_tool | malformed_json | schema_violation | missing_tool_call | truncated
    path: str | None  # JSON pointer into the arguments of the first schema error, e.g. "/amount"
    detail: str | None  # the first error's keyword and schema path, e.g. "type at /properties/amount/type"
    calls: int  # number of tool calls returned (all choices)
    bad_schema: bool = False  # a called tool's schema (or the content schema) did not compile; left unchecked

    @property
    def header(self) -> str:
        # x-gateway-tool-calls has three values only (DESIGN.md); a truncation is not a verdict on a call.
        return NONE if self.status == TRUNCATED else self.status


_VALID = Verdict(VALID, None, None, None, 0)
_VALID_BAD_SCHEMA = Verdict(VALID, None, None, None, 0, bad_schema=True)
_NONE = Verdict(NONE, None, None, None, 0)
_TRUNCATED = Verdict(TRUNCATED, TRUNCATED, None, None, 0)
_UNKNOWN = Verdict(INVALID, UNKNOWN_TOOL, None, None, 0)
_MALFORMED = Verdict(INVALID, MALFORMED_JSON, None, None, 0)
_MISSING = Verdict(INVALID, MISSING_TOOL_CALL, None, None, 0)
_UNPARSED = Verdict(INVALID, UNPARSED_TOOL_CALL, None, None, 0)
_UNCOMPILED: Final = object()  # cache marker for a schema that failed to compile


# --- reading the request ------------------------------------------------------------------------------------


def expectation_from_request(body: Mapping[str, Any]) -> Expectation:
    """Read what the request declared; entries of the wrong shape are ignored rather than trusted."""
    tools = _declared_tools(body.get("tools"))
    choice, forced = _tool_choice(body.get("tool_choice"), bool(tools))
    return Expectation(
        tools=tools,
        required=choice in ("required", "named"),
        forced_name=forced,
        content_schema=_content_schema(body.get("response_format")),
        tool_choice=choice,
    )


def _declared_tools(tools: Any) -> dict[str, Mapping[str, Any] | None]:
    declared: dict[str, Mapping[str, Any] | None] = {}
    if not isinstance(tools, list):
        return declared
    for tool in tools:
        fn = (
            tool.get("function")
            if isinstance(tool, dict) and tool.get("type", "function") == "function"
            else None
        )
        if isinstance(fn, dict) and isinstance(name := fn.get("name"), str):
            params = fn.get("parameters")
            declared[name] = params if isinstance(params, dict) else None
    return declared


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


class SchemaCache:
    """Compiles each JSON Schema (draft 2020-12) once; bounded LRU keyed by the schema's orjson bytes.

    Keying by content (not identity) is what lets one compiled validator serve every request that declares the
    same tool: bodies are parsed afresh per request. A schema that fails to compile is cached as such, so a
    client sending it on every request pays the failed compile once; `validator()` returns None for it.
    `validate_formats` asserts `format` (date, date-time, email, uuid, ...), which 2020-12 otherwise treats as
    an annotation: a CRM `close_date` of "next Friday" is an invalid call for the product.
    """

    def __init__(self, maxsize: int = 1024, *, validate_formats: bool = True) -> None:
        self._maxsize = maxsize
        self._validate_formats = validate_formats
        self._entries: OrderedDict[bytes, Any] = OrderedDict()
        self.rejected = 0  # schemas that failed to compile (counted once per cache entry)

    @property
    def size(self) -> int:
        # A property, not __len__: an empty cache must not be falsy (`cache or SchemaCache()` would drop it).
        return len(self._entries)

    def validator(self, schema: Mapping[str, Any]) -> Any:
        """The compiled validator for `schema`, or None when it does not compile."""
        key = orjson.dumps(schema)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._compile(schema)
            self._entries[key] = entry
            if len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return None if entry is _UNCOMPILED else entry

    def _compile(self, schema: Mapping[str, Any]) -> Any:
        try:
            # offline: a client-supplied remote $ref must never make the gateway fetch a URL (SSRF, and a
            # network round trip on the hot path); it fails to compile instead.
            doc = schema if isinstance(schema, dict) else dict(schema)
            return jsonschema_rs.Draft202012Validator(
                doc, validate_formats=self._validate_formats, offline=True
            )
        except (ValueError, TypeError, OverflowError):  # jsonschema_rs.ValidationError is a ValueError
            self.rejected += 1
            return _UNCOMPILED


# --- the check ----------------------------------------------------------------------------------------------


def check(completions: Sequence[Completion], exp: Expectation, cache: SchemaCache) -> Verdict:
    """The verdict on all choices: the first invalid one, else truncated, else valid, else none."""
    if not exp.active:
        return _NONE
    results = [_check_choice(c, exp, cache) for c in completions]
    if not results:
        return _NONE
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
        return _check_json(choice.content or "", exp.content_schema, cache)
    return _NONE


def _has_markup(content: str) -> bool:
    return any(marker in content for marker in TOOL_CALL_MARKERS)


def _check_calls(calls: tuple[ToolCall, ...], exp: Expectation, cache: SchemaCache) -> Verdict:
    bad = False
    for call in calls:
        if call.name not in exp.tools or (exp.forced_name is not None and call.name != exp.forced_name):
            return _UNKNOWN
        schema = exp.tools[call.name]
        verdict = _check_json(call.arguments, schema, cache) if schema is not None else _parse_only(call)
        if verdict.status == INVALID:
            return Verdict(INVALID, verdict.reason, verdict.path, verdict.detail, 0, True) if bad else verdict
        bad = bad or verdict.bad_schema
    return _VALID_BAD_SCHEMA if bad else _VALID


def _parse_only(call: ToolCall) -> Verdict:
    try:
        orjson.loads(call.arguments)
    except orjson.JSONDecodeError:
        return _MALFORMED
    return _VALID


def _check_json(text: str, schema: Mapping[str, Any], cache: SchemaCache) -> Verdict:
    try:
        instance = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _MALFORMED
    validator = cache.validator(schema)
    if validator is None:
        return _VALID_BAD_SCHEMA
    if validator.is_valid(instance):  # the common case costs one pass; errors are collected only on failure
        return _VALID
    return _violation(next(iter(validator.iter_errors(instance)), None))


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
