"""Enforce mode (invalid calls never reach the client), in process, and client disconnects (the engine stops
working), on a real port: a client hanging up or giving up is something only a server sees."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import FORCER_TOKEN, UPDATE_CRM, AppGatewayFactory, GatewayFactory, sdk_client, sse_events

MESSAGES = [{"role": "user", "content": "Initech: qualified, 800 EUR."}]

ENFORCED = """
route = "strict"
tool_calls = "enforce"
fallback = ["safe"]

[variants.sloppy]
model = "always-invalid"
weight = 1

[variants.safe]
model = "crm-formatter"
weight = 0
"""

NO_FALLBACK = """
route = "strict"
tool_calls = "enforce"

[variants.sloppy]
model = "always-invalid"
weight = 1
"""


def test_enforce_retries_an_invalid_answer_on_the_fallback(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway({"strict.toml": ENFORCED})
    raw = sdk_client(gw, FORCER_TOKEN).chat.completions.with_raw_response.create(
        model="strict", messages=MESSAGES, tools=[UPDATE_CRM]
    )
    assert raw.headers["x-gateway-tool-calls"] == "valid"
    assert raw.headers["x-gateway-variant"] == "safe"
    json.loads(raw.parse().choices[0].message.tool_calls[0].function.arguments)
    (rec,) = gw.records()
    assert (rec.variant, rec.fallback_from, rec.fallback_reason) == ("safe", "sloppy", "schema_violation")


def test_enforce_without_a_fallback_answers_502_invalid_tool_call(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway({"strict.toml": NO_FALLBACK})
    with pytest.raises(openai.APIStatusError) as err:
        sdk_client(gw, FORCER_TOKEN).chat.completions.create(
            model="strict", messages=MESSAGES, tools=[UPDATE_CRM]
        )
    assert err.value.status_code == 502
    body = err.value.body
    assert (
        isinstance(body, dict) and body["type"] == "invalid_tool_call" and body["code"] == "schema_violation"
    )
    (rec,) = gw.records()
    assert (rec.outcome, rec.tool_verdict, rec.tool_reason) == (
        "invalid_tool_call",
        "invalid",
        "schema_violation",
    )


def test_enforce_in_a_stream_holds_the_call_and_sends_the_fallbacks(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway({"strict.toml": ENFORCED})
    arguments = ""
    for chunk in sdk_client(gw, FORCER_TOKEN).chat.completions.create(
        model="strict", messages=MESSAGES, tools=[UPDATE_CRM], stream=True
    ):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                arguments += delta.function.arguments or ""
    parsed = json.loads(arguments)  # the client only ever saw the fallback's valid call
    assert set(parsed) >= {"account", "stage", "amount"}
    (rec,) = gw.records()
    assert rec.tool_verdict == "valid" and rec.fallback_from == "sloppy" and rec.stream


def test_enforce_in_a_stream_without_a_fallback_ends_with_an_error_event(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway({"strict.toml": NO_FALLBACK})
    body = {"model": "strict", "messages": MESSAGES, "tools": [UPDATE_CRM], "stream": True}
    events = sse_events(gw, body, FORCER_TOKEN)
    assert not any('"tool_calls"' in e for e in events)  # the invalid call never reached the client
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "invalid_tool_call" and events[-1] == "data: [DONE]"
    with pytest.raises(openai.APIError):
        for _ in sdk_client(gw, FORCER_TOKEN).chat.completions.create(
            model="strict", messages=MESSAGES, tools=[UPDATE_CRM], stream=True
        ):
            pass


def test_a_client_that_hangs_up_mid_stream_cancels_the_engine_request(
    make_gateway: GatewayFactory, sim_engine_url: str
) -> None:
    gw = make_gateway({"long.toml": 'route = "long"\n[variants.only]\nmodel = "long-stream"\nweight = 1\n'})
    cancelled_before = httpx.get(sim_engine_url + "/sim/stats").json()["cancelled_streams"]
    body = {"model": "long", "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {FORCER_TOKEN}"},
    ) as r:
        for i, _ in enumerate(r.iter_raw()):
            if i == 3:
                break  # hang up after a few chunks of a ten-second answer
    deadline = time.monotonic() + 5
    while httpx.get(sim_engine_url + "/sim/stats").json()["cancelled_streams"] == cancelled_before:
        assert time.monotonic() < deadline, "the engine kept generating for a client that was gone"
        time.sleep(0.05)
    (rec,) = gw.records()
    assert rec.outcome == "client_disconnected" and rec.stream and rec.e2e_s < 5


def test_a_client_that_gives_up_on_a_slow_answer_stops_the_gateways_wait(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway({"slow.toml": 'route = "slow"\n[variants.only]\nmodel = "slow"\nweight = 1\n'})
    body = {"model": "slow", "messages": MESSAGES}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gw.url + "/v1/chat/completions",
            json=body,
            timeout=0.5,
            headers={"Authorization": f"Bearer {FORCER_TOKEN}"},
        )
    (rec,) = gw.records()
    assert rec.outcome == "client_disconnected" and rec.e2e_s < 1.5  # the engine needed 3 s
