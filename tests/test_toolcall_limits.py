"""Tool-call checks at their limits, through an in-process gateway: model output nested too deep is an invalid
call (never a 500 or a broken stream), and a declared schema that is too large or does not compile is the
client's 400 naming the tool, before any engine sees the request.

The engine here is a fake at the edge: a tiny ASGI app on a loopback port that answers every chat request with
one `update_crm` call carrying the arguments a test gives it (the simulated engine only writes valid-shaped
arguments), and counts the chat requests it received.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import (
    UPDATE_CRM,
    AppGatewayFactory,
    InProcessGateway,
    sdk_client,
    serve_in_thread,
    sse_events,
)

POLICY = """
route = "crm-assistant"
tool_calls = "annotate"

[variants.only]
model = "fake-model"
weight = 1
"""

MESSAGES = [{"role": "user", "content": "Move ACME to proposal, 12000 EUR."}]

# The reported crash: a schema violation at the top of arguments nested ~300 deep (jsonschema-rs raised while
# building the error, the gateway answered 500, or 200 then an SSE internal_error in a stream).
DEEP = '{"account": "ACME", "stage": ' + "[" * 300 + "]" * 300 + ', "amount": 1}'


class FakeEngine:
    """Answers `POST /v1/chat/completions` with one `update_crm` call whose arguments are `self.arguments`."""

    def __init__(self) -> None:
        self.arguments = "{}"
        self.chats = 0

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]
    ) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/v1/chat/completions":
            self.chats += 1
            stream = bool(orjson.loads(body).get("stream"))
            await self._answer(send, self._events() if stream else self._completion(), stream)
        else:
            await self._answer(send, orjson.dumps({"object": "list", "data": [{"id": "fake-model"}]}), False)

    def _completion(self) -> bytes:
        call = {
            "id": "call-1",
            "type": "function",
            "function": {"name": "update_crm", "arguments": self.arguments},
        }
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return orjson.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "fake-model",
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
            }
        )

    def _events(self) -> bytes:
        head = {
            "index": 0,
            "id": "call-1",
            "type": "function",
            "function": {"name": "update_crm", "arguments": ""},
        }
        deltas: list[tuple[dict[str, Any], str | None]] = [
            ({"role": "assistant", "tool_calls": [head]}, None),
            ({"tool_calls": [{"index": 0, "function": {"arguments": self.arguments}}]}, None),
            ({}, "tool_calls"),
        ]
        chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "fake-model"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            for delta, finish in deltas
        ]
        events.append({**chunk, "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 10}})
        return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    @staticmethod
    async def _answer(send: Callable[..., Any], body: bytes, stream: bool) -> None:
        kind = b"text/event-stream" if stream else b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def fake_engine() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine()
    server, thread, url = serve_in_thread(engine, "fake engine", lifespan="off")
    yield engine, url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def gateway(make_app_gateway: AppGatewayFactory, fake_engine: tuple[FakeEngine, str]) -> InProcessGateway:
    return make_app_gateway({"crm.toml": POLICY}, engines={"default": fake_engine[1]}, max_schema_bytes=4096)


def tool(parameters: Any, name: str = "update_crm") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


# -- model output nested too deep -----------------------------------------------------------------------------


def test_deeply_nested_arguments_are_an_invalid_call_not_a_500(
    gateway: InProcessGateway, fake_engine: tuple[FakeEngine, str]
) -> None:
    fake_engine[0].arguments = DEEP
    raw = sdk_client(gateway).chat.completions.with_raw_response.create(
        model="crm-assistant", messages=MESSAGES, tools=[UPDATE_CRM]
    )
    assert raw.status_code == 200
    assert raw.headers["x-gateway-tool-calls"] == "invalid"
    assert raw.headers["x-gateway-tool-calls-reason"] == "arguments_too_deep"
    assert raw.parse().choices[0].message.tool_calls[0].function.arguments == DEEP  # annotate: relayed as is
    (rec,) = gateway.records()
    assert (rec.status, rec.outcome, rec.tool_verdict, rec.tool_reason) == (
        200,
        "ok",
        "invalid",
        "arguments_too_deep",
    )


def test_deeply_nested_arguments_in_a_stream_end_with_an_invalid_verdict(
    gateway: InProcessGateway, fake_engine: tuple[FakeEngine, str]
) -> None:
    fake_engine[0].arguments = DEEP
    body = {"model": "crm-assistant", "messages": MESSAGES, "tools": [UPDATE_CRM], "stream": True}
    events = sse_events(gateway, body)
    assert not any('"error"' in e for e in events)
    assert events[-2] == ": x-gateway-tool-calls=invalid reason=arguments_too_deep"
    assert events[-1] == "data: [DONE]"
    (rec,) = gateway.records()
    assert (rec.outcome, rec.tool_verdict, rec.tool_reason) == ("ok", "invalid", "arguments_too_deep")


# -- declared schemas: refused before the engine --------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"$ref": "http://127.0.0.1:9/crm.json"}, "remote $ref is not allowed"),
        ({"type": 5}, "not a valid JSON Schema"),
        (
            {"type": "object", "properties": {"account": {"type": "string", "pattern": "("}}},
            "/properties/account",
        ),
        (json.loads('{"not": ' * 300 + "{}" + "}" * 300), "could not be read"),  # nested past orjson's 255
    ],
)
def test_a_schema_that_does_not_compile_is_a_400_naming_the_tool(
    gateway: InProcessGateway, fake_engine: tuple[FakeEngine, str], parameters: Any, words: str
) -> None:
    tools = [UPDATE_CRM, tool(parameters, name="lookup_account")]
    with pytest.raises(openai.BadRequestError) as err:
        sdk_client(gateway).chat.completions.create(model="crm-assistant", messages=MESSAGES, tools=tools)
    error = err.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_schema",
        "tools[1].function.parameters",
    )
    assert "'lookup_account'" in error["message"] and words in error["message"]
    assert fake_engine[0].chats == 0
    (rec,) = gateway.records()
    assert (rec.status, rec.outcome, rec.error_code) == (400, "client_error", "invalid_schema")


def test_a_response_format_schema_that_does_not_compile_is_a_400(
    gateway: InProcessGateway, fake_engine: tuple[FakeEngine, str]
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "summary", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as err:
        sdk_client(gateway).chat.completions.create(
            model="crm-assistant", messages=MESSAGES, response_format=fmt, stream=True
        )
    error = err.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("invalid_schema", "response_format.json_schema.schema")
    assert fake_engine[0].chats == 0


def test_a_schema_over_the_size_limit_is_a_400_naming_the_tool_and_the_limit(
    gateway: InProcessGateway, fake_engine: tuple[FakeEngine, str]
) -> None:
    properties = {f"field_{i}": {"type": "string", "maxLength": 64} for i in range(200)}
    big = tool({"type": "object", "properties": properties}, name="bulk_update")
    with pytest.raises(openai.BadRequestError) as err:
        sdk_client(gateway).chat.completions.create(model="crm-assistant", messages=MESSAGES, tools=[big])
    error = err.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("schema_too_large", "tools[0].function.parameters")
    assert "'bulk_update'" in error["message"] and "4,096 bytes" in error["message"]
    assert fake_engine[0].chats == 0
    (rec,) = gateway.records()
    assert (rec.status, rec.error_code) == (400, "schema_too_large")
