"""The subset of OpenAI's chat-completions request that the gateway reads, parsed once from the body's bytes.

`parse_chat_request` checks the fields the gateway relies on, and the types and ranges of the sampling fields
OpenAI defines, and raises `BadRequest` naming the offending field (`param`, in OpenAI's dotted/indexed style) with
OpenAI's wording and codes (`invalid_type`, `decimal_above_max_value`, `integer_below_min_value`, ...); `null`
means the default. Every other field passes through to the engine untouched. The parsed body stays a plain dict,
so that rewriting it for a variant is a shallow copy, not a re-validation; the field checks cost one dict lookup
per known field, no model class.

Nesting: orjson reads 1,024 levels of arrays and objects but writes only 254 (`MAX_DEPTH`), and the engine's body
is exactly as deep as the client's, so 254 levels is what the gateway can forward. A deeper body is refused with a
400 `nesting_too_deep` naming the limit: past 1,024 here, otherwise where the engine's body is written
(`rewrite.engine_body`), whose walk orjson does anyway: walking every body here as well (`deeper_than`) cost 3 to 5
times `orjson.loads` itself on a request with six tools or a 100-message conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequest, InvalidJSON

MAX_DEPTH = 254  # levels of arrays and objects orjson writes, the body itself being the first

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_TOOL_CHOICES = frozenset({"none", "auto", "required"})
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
_MAX_STOP = 4


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client itself asked for the usage chunk
    user: str | None


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = _load(raw)
    model = _required_str(body, "model")
    _check_messages(body.get("messages"))
    for name, check in _FIELD_CHECKS:
        value = body.get(name)
        if value is not None:  # null: the default
            check(name, value)
    stream = body.get("stream") is True
    include_usage = _check_stream_options(body.get("stream_options"))
    tools = _check_tools(body.get("tools"))
    _check_tool_choice(body.get("tool_choice"), tools)
    _check_response_format(body.get("response_format"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid_type("user", "a string", user)
    return ChatRequest(body=body, model=model, stream=stream, include_usage=include_usage, user=user)


def _load(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson reads 1,024 levels: past that, the same answer as past ours
            raise nesting_too_deep(None) from None
        raise InvalidJSON(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` arrays/objects, walking one level at a time (no recursion)."""
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        if not level:
            return False
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
    return bool(level)


def nesting_too_deep(param: str | None) -> BadRequest:
    return BadRequest(
        f"The request body is nested too deeply: at most {MAX_DEPTH} levels of arrays and objects are allowed.",
        param=param,
        code="nesting_too_deep",
    )


def deepest_field(body: dict[str, Any]) -> str | None:
    """The first top-level field nested past `MAX_DEPTH` (the body being level 1), for the error's `param`."""
    return next((name for name, value in body.items() if deeper_than(value, MAX_DEPTH - 1)), None)


# -- OpenAI's wording and codes ---------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    """A JSON value's type in the words OpenAI's errors use."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _invalid_type(param: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _invalid_value(param: str, message: str) -> BadRequest:
    return BadRequest(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def _in_range(param: str, value: float, low: float, high: float | None, kind: str) -> None:
    if value < low:
        raise BadRequest(
            f"Invalid '{param}': {kind} below minimum value. Expected a value >= {low}, but got {value} instead.",
            param=param,
            code=f"{kind}_below_min_value",
        )
    if high is not None and value > high:
        raise BadRequest(
            f"Invalid '{param}': {kind} above maximum value. Expected a value <= {high}, but got {value} instead.",
            param=param,
            code=f"{kind}_above_max_value",
        )


def _decimal(low: float, high: float) -> Callable[[str, Any], None]:
    def check(param: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid_type(param, "a decimal", value)
        _in_range(param, value, low, high, "decimal")

    return check


def _integer(low: int, high: int | None = None) -> Callable[[str, Any], None]:
    def check(param: str, value: Any) -> None:
        # JSON's 1.0 is a decimal, as in OpenAI's API.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid_type(param, "an integer", value)
        _in_range(param, value, low, high, "integer")

    return check


def _boolean(param: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _invalid_type(param, "a boolean", value)


def _stop(param: str, value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise _invalid_type(param, "one of a string or array of strings", value)
    if len(value) > _MAX_STOP:
        raise BadRequest(
            f"Invalid '{param}': array too long. Expected an array with maximum length {_MAX_STOP}, but got an "
            f"array with length {len(value)} instead.",
            param=param,
            code="array_above_max_length",
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _invalid_type(f"{param}[{i}]", "a string", item)


# The sampling fields OpenAI defines, with its types and ranges; anything else passes through unchecked.
_FIELD_CHECKS: tuple[tuple[str, Callable[[str, Any], None]], ...] = (
    ("temperature", _decimal(0, 2)),
    ("top_p", _decimal(0, 1)),
    ("presence_penalty", _decimal(-2, 2)),
    ("frequency_penalty", _decimal(-2, 2)),
    ("max_tokens", _integer(1)),
    ("max_completion_tokens", _integer(1)),
    ("n", _integer(1)),
    ("top_logprobs", _integer(0, 20)),
    ("logprobs", _boolean),
    ("stream", _boolean),
    ("stop", _stop),
)


# -- the fields the gateway itself reads ------------------------------------------------------------------------


def _required_str(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None:
        raise BadRequest(
            f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter"
        )
    if not isinstance(value, str):
        raise _invalid_type(field, "a string", value)
    if not value:
        raise BadRequest(f"'{field}' must be a non-empty string.", param=field)
    return value


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid_type(f"messages[{i}]", "an object", message)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise BadRequest(
                f"'messages[{i}].role' must be one of {sorted(_ROLES)}, got {role!r}.",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _invalid_type(f"messages[{i}].content", "one of a string or array of objects", content)


def _check_stream_options(options: Any) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _invalid_type("stream_options", "an object", options)
    include = options.get("include_usage")
    if include is None:
        return False
    if not isinstance(include, bool):
        raise _invalid_type("stream_options.include_usage", "a boolean", include)
    return include


def _check_tools(tools: Any) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise _invalid_type("tools", "an array", tools)
    names: set[str] = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"'tools[{i}]' must be a function tool.", param=f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"'tools[{i}].function.name' is required.", param=f"tools[{i}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict | bool):
            raise _invalid_type(f"tools[{i}].function.parameters", "an object", parameters)
        names.add(name)
    return names


def _check_tool_choice(choice: Any, tools: set[str]) -> None:
    if choice is None or (isinstance(choice, str) and choice in _TOOL_CHOICES):
        return
    if not isinstance(choice, str | dict):
        raise _invalid_type("tool_choice", "one of a string or object", choice)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _invalid_value(
            "tool_choice",
            'expected \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}.',
        )
    if name not in tools:
        raise _invalid_value("tool_choice", f"the function {name!r} is not in 'tools'.")


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise _invalid_type("response_format", "an object", fmt)
    kind = fmt.get("type")
    if not isinstance(kind, str) or kind not in _RESPONSE_FORMATS:
        raise _invalid_value("response_format.type", f"expected one of {sorted(_RESPONSE_FORMATS)}.")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict | bool):
            raise BadRequest(
                "'response_format.json_schema.schema' must be a JSON Schema object.",
                param="response_format.json_schema.schema",
            )
