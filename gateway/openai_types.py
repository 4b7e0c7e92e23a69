"""The subset of OpenAI's chat-completions request that the gateway reads, parsed once from the body's bytes.

`parse_chat_request` checks the fields the gateway relies on and raises `BadRequest` naming the offending field
(`param`, in OpenAI's dotted/indexed style); every other field passes through to the engine untouched. The parsed
body stays a plain dict so that rewriting it for a variant is a shallow copy, not a re-validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequest, InvalidJSON

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_TOOL_CHOICES = frozenset({"none", "auto", "required"})
_RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client itself asked for the usage chunk
    user: str | None


def parse_chat_request(raw: bytes) -> ChatRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = _required_str(body, "model")
    _check_messages(body.get("messages"))
    stream = _optional_bool(body, "stream")
    include_usage = _check_stream_options(body.get("stream_options"))
    tools = _check_tools(body.get("tools"))
    _check_tool_choice(body.get("tool_choice"), tools)
    _check_response_format(body.get("response_format"))
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("'user' must be a string.", param="user")
    return ChatRequest(body=body, model=model, stream=stream, include_usage=include_usage, user=user)


def _required_str(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None:
        raise BadRequest(
            f"Missing required parameter: '{field}'.", param=field, code="missing_required_parameter"
        )
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{field}' must be a non-empty string.", param=field)
    return value


def _optional_bool(body: dict[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"'{field}' must be a boolean.", param=field)
    return value


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise BadRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"'messages[{i}]' must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise BadRequest(
                f"'messages[{i}].role' must be one of {sorted(_ROLES)}, got {role!r}.",
                param=f"messages[{i}].role",
            )


def _check_stream_options(options: Any) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", param="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest(
            "'stream_options.include_usage' must be a boolean.", param="stream_options.include_usage"
        )
    return include


def _check_tools(tools: Any) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", param="tools")
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
            raise BadRequest(
                f"'tools[{i}].function.parameters' must be a JSON Schema object.",
                param=f"tools[{i}].function.parameters",
            )
        names.add(name)
    return names


def _check_tool_choice(choice: Any, tools: set[str]) -> None:
    if choice is None or (isinstance(choice, str) and choice in _TOOL_CHOICES):
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise BadRequest(
            "'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
            '"function": {"name": ...}}.',
            param="tool_choice",
        )
    if name not in tools:
        raise BadRequest(f"'tool_choice' names {name!r}, which is not in 'tools'.", param="tool_choice")


def _check_response_format(fmt: Any) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if not isinstance(kind, str) or kind not in _RESPONSE_FORMATS:
        raise BadRequest(
            f"'response_format.type' must be one of {sorted(_RESPONSE_FORMATS)}.",
            param="response_format.type",
        )
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict | bool):
            raise BadRequest(
                "'response_format.json_schema.schema' must be a JSON Schema object.",
                param="response_format.json_schema.schema",
            )
