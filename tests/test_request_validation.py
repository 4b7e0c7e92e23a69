"""Request validation: a bad field gets a 400 in OpenAI's words naming it; deep nesting gets a 400 naming the limit;
a route a key may not use looks exactly like one that does not exist."""

from __future__ import annotations

import json
from typing import Any

import httpx
import orjson
import pytest

from gateway.errors import BadRequest, UnknownRoute
from gateway.keys import ApiKey
from gateway.openai_types import MAX_DEPTH, parse_chat_request
from gateway.policy import Variant
from gateway.rewrite import engine_body
from tests.conftest import CLIENT_TOKEN, CRM_POLICY, FORCER_TOKEN, AppGatewayFactory, Gateway

MESSAGES = [{"role": "user", "content": "Move ACME to proposal."}]


def refusal(**fields: Any) -> dict[str, Any]:
    """The error body `parse_chat_request` answers for a request with `fields` added."""
    with pytest.raises(BadRequest) as err:
        parse_chat_request(orjson.dumps({"model": "crm-assistant", "messages": MESSAGES, **fields}))
    assert err.value.status == 400
    error: dict[str, Any] = err.value.body()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("fields", "param", "code", "message"),
    [
        (
            {"temperature": "hot"},
            "temperature",
            "invalid_type",
            "Invalid type for 'temperature': expected a decimal, but got a string instead.",
        ),
        (
            {"temperature": 2.5},
            "temperature",
            "decimal_above_max_value",
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.5 instead.",
        ),
        ({"temperature": -0.5}, "temperature", "decimal_below_min_value", "Expected a value >= 0"),
        ({"temperature": True}, "temperature", "invalid_type", "but got a boolean instead"),
        ({"top_p": 1.01}, "top_p", "decimal_above_max_value", "Expected a value <= 1"),
        ({"top_p": [0.5]}, "top_p", "invalid_type", "but got an array instead"),
        ({"presence_penalty": -2.5}, "presence_penalty", "decimal_below_min_value", ">= -2"),
        ({"frequency_penalty": 3}, "frequency_penalty", "decimal_above_max_value", "<= 2"),
        ({"frequency_penalty": "1"}, "frequency_penalty", "invalid_type", "expected a decimal"),
        (
            {"max_tokens": 0},
            "max_tokens",
            "integer_below_min_value",
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        ),
        ({"max_tokens": True}, "max_tokens", "invalid_type", "expected an integer, but got a boolean"),
        ({"max_tokens": 16.5}, "max_tokens", "invalid_type", "expected an integer, but got a decimal"),
        ({"max_completion_tokens": "16"}, "max_completion_tokens", "invalid_type", "expected an integer"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "integer_below_min_value", ">= 1"),
        ({"n": 0}, "n", "integer_below_min_value", ">= 1"),
        ({"n": {"k": 1}}, "n", "invalid_type", "but got an object instead"),
        ({"top_logprobs": 21}, "top_logprobs", "integer_above_max_value", "<= 20"),
        ({"top_logprobs": -1}, "top_logprobs", "integer_below_min_value", ">= 0"),
        ({"logprobs": "yes"}, "logprobs", "invalid_type", "expected a boolean"),
        ({"logprobs": 1}, "logprobs", "invalid_type", "expected a boolean, but got an integer"),
        ({"stream": "yes"}, "stream", "invalid_type", "expected a boolean"),
        ({"stream_options": "usage"}, "stream_options", "invalid_type", "expected an object"),
        (
            {"stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "invalid_type",
            "expected a boolean",
        ),
        ({"stop": 7}, "stop", "invalid_type", "expected one of a string or array of strings"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length", "maximum length 4"),
        ({"stop": ["a", None]}, "stop[1]", "invalid_type", "but got null instead"),
        ({"tool_choice": 3}, "tool_choice", "invalid_type", "expected one of a string or object"),
        ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value", "Invalid value for 'tool_choice'"),
        ({"response_format": "json"}, "response_format", "invalid_type", "expected an object"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_value", "json_schema"),
        ({"model": 7}, "model", "invalid_type", "expected a string, but got an integer"),
        ({"messages": {"role": "user"}}, "messages", "invalid_type", "expected an array"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type", "content"),
        ({"user": 5}, "user", "invalid_type", "expected a string"),
    ],
)
def test_a_wrong_type_or_value_is_named_in_openais_words(
    fields: dict[str, Any], param: str, code: str, message: str
) -> None:
    error = refusal(**fields)
    assert (error["param"], error["code"]) == (param, code)
    assert message in error["message"]


def test_valid_values_nulls_and_unknown_fields_pass_through_untouched() -> None:
    fields: dict[str, Any] = {
        "temperature": 0,
        "top_p": 1.0,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "max_tokens": 1,
        "max_completion_tokens": 4096,
        "n": 2,
        "top_logprobs": 20,
        "logprobs": True,
        "stop": ["a", "b", "c", "d"],
        "stream": False,
        "stream_options": {"include_usage": True},
        "tool_choice": "none",
        "response_format": {"type": "json_object"},
        "seed": "not checked: the engine's business",
        "vendor_extension": {"anything": [1, {"goes": None}]},
    }
    body = {"model": "crm-assistant", "messages": MESSAGES, **fields}
    assert parse_chat_request(orjson.dumps(body)).body == body
    nulls = dict.fromkeys(fields, None)
    req = parse_chat_request(orjson.dumps({"model": "crm-assistant", "messages": MESSAGES, **nulls}))
    assert (req.stream, req.include_usage) == (False, False)  # null means the default
    assert parse_chat_request(orjson.dumps({**body, "stop": "END"})).body["stop"] == "END"


def nested(depth: int) -> Any:
    """A value `depth` arrays/objects deep."""
    value: Any = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_up_to_what_orjson_writes_is_forwarded_and_deeper_is_refused_naming_the_limit() -> None:
    variant = Variant("only", "crm-base", "default", 1, system_prompt="Be brief.")

    def forwarded(**fields: Any) -> Any:
        body = parse_chat_request(json.dumps({"model": "r", "messages": MESSAGES, **fields}).encode()).body
        return orjson.loads(engine_body(body, variant, stream=True))

    def refused(**fields: Any) -> dict[str, Any]:
        with pytest.raises(BadRequest) as err:
            forwarded(**fields)
        error: dict[str, Any] = err.value.body()["error"]
        assert error["code"] == "nesting_too_deep" and f"at most {MAX_DEPTH} levels" in error["message"]
        return error

    # The body is level 1, `messages` 2, a message 3, its content 4: a content value adds its own depth.
    content = [nested(MAX_DEPTH - 4)]
    assert forwarded(messages=[{"role": "user", "content": content}])["messages"][1]["content"] == content
    assert refused(messages=[{"role": "user", "content": [nested(MAX_DEPTH - 3)]}])["param"] == "messages"
    tool = {"type": "function", "function": {"name": "f", "parameters": nested(MAX_DEPTH - 3)}}
    assert refused(tools=[tool])["param"] == "tools"
    assert refused(vendor_extension=nested(MAX_DEPTH))["param"] == "vendor_extension"
    # Deeper than orjson reads (1,024 levels): the same answer, not a JSON syntax error.
    with pytest.raises(BadRequest) as err:
        parse_chat_request(b'{"model": "r", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}")
    assert err.value.code == "nesting_too_deep"


def test_a_forbidden_route_is_refused_like_an_unknown_one() -> None:
    key = ApiKey("crm-service", "acme", frozenset({"crm-assistant"}))
    key.check_route("crm-assistant")
    with pytest.raises(UnknownRoute) as err:
        key.check_route("billing")
    assert err.value.body()["error"] == {
        "message": "The model `billing` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


# -- through an in-process gateway ------------------------------------------------------------------------------


def post(gw: Gateway, body: Any, token: str = CLIENT_TOKEN) -> httpx.Response:
    return gw.http.post(
        "/v1/chat/completions",
        content=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )


def test_bad_sampling_fields_and_deep_bodies_never_reach_the_engine(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    hot = post(gw, {"model": "crm-assistant", "messages": MESSAGES, "temperature": "hot"})
    assert hot.status_code == 400
    assert hot.json()["error"] == {
        "message": "Invalid type for 'temperature': expected a decimal, but got a string instead.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_type",
    }
    # 260 levels: orjson reads it (up to 1,024) but cannot write it for the engine (254 at most): a 500 before.
    deep = post(gw, {"model": "crm-assistant", "messages": [{"role": "user", "content": [nested(256)]}]})
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "nesting_too_deep"
    records = gw.records()
    assert [(r.status, r.outcome, r.error_code) for r in records] == [
        (400, "client_error", "invalid_type"),
        (400, "client_error", "nesting_too_deep"),
    ]
    assert records[0].variant is None  # refused before any variant was chosen
    # 254 levels, the most orjson writes, reach the engine intact.
    deepest = post(gw, {"model": "crm-assistant", "messages": [{"role": "user", "content": [nested(250)]}]})
    assert deepest.status_code == 200


def test_a_restricted_key_cannot_tell_forbidden_routes_from_unknown_ones(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(
        {
            "crm.toml": CRM_POLICY,
            "other.toml": CRM_POLICY.replace('route = "crm-assistant"', 'route = "other"'),
        }
    )
    answers = {}
    for route in ("other", "no-such-route"):
        r = post(gw, {"model": route, "messages": MESSAGES})
        headers = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date", "content-length")}
        answers[route] = (r.status_code, headers, r.json()["error"] | {"message": None})
        assert r.json()["error"]["message"] == (
            f"The model `{route}` does not exist or you do not have access to it."
        )
    assert answers["other"] == answers["no-such-route"]
    assert answers["other"][0] == 404 and answers["other"][2]["code"] == "model_not_found"
    assert "x-gateway-route" not in answers["other"][1]
    assert post(gw, {"model": "other", "messages": MESSAGES}, FORCER_TOKEN).status_code == 200
    # /v1/models lists only the routes the key may use
    models = gw.http.get("/v1/models", headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert [m["id"] for m in models.json()["data"]] == ["crm-assistant"]
    assert len(gw.records()) == 3
