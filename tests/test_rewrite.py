"""What a variant does to a request on its way to the engine."""

from __future__ import annotations

import orjson

from gateway.policy import Variant
from gateway.rewrite import engine_body

BASE = Variant("baseline", "crm-base", "default", 90, system_prompt="You update the CRM.")
PLAIN = Variant("formatter", "crm-formatter@2", "default", 10)


def test_the_model_is_rewritten_and_unknown_fields_pass_through() -> None:
    body = {
        "model": "crm-assistant",
        "messages": [{"role": "user", "content": "hi"}],
        "top_k": 5,
        "seed": 7,
        "vendor_extension": {"x": [1, 2]},
    }
    out = orjson.loads(engine_body(body, PLAIN, stream=False))
    assert out == {**body, "model": "crm-formatter@2"}
    assert body["model"] == "crm-assistant"  # the caller's dict is not modified


def test_the_system_prompt_is_merged_into_a_leading_system_message() -> None:
    body = {
        "model": "r",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    }
    out = orjson.loads(engine_body(body, BASE, stream=False))
    assert out["messages"] == [
        {"role": "system", "content": "You update the CRM.\n\nBe brief."},
        {"role": "user", "content": "hi"},
    ]


def test_the_system_prompt_is_inserted_when_there_is_none() -> None:
    body = {"model": "r", "messages": [{"role": "user", "content": "hi"}]}
    out = orjson.loads(engine_body(body, BASE, stream=False))
    assert out["messages"][0] == {"role": "system", "content": "You update the CRM."}
    parts = {"model": "r", "messages": [{"role": "system", "content": [{"type": "text", "text": "x"}]}]}
    assert orjson.loads(engine_body(parts, BASE, stream=False))["messages"][0]["role"] == "system"
    assert len(orjson.loads(engine_body(parts, BASE, stream=False))["messages"]) == 2


def test_streams_always_ask_the_engine_for_usage_keeping_other_options() -> None:
    body = {
        "model": "r",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"continuous_usage_stats": False},
    }
    out = orjson.loads(engine_body(body, PLAIN, stream=True))
    assert out["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    bare = {"model": "r", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert orjson.loads(engine_body(bare, PLAIN, stream=True))["stream_options"] == {"include_usage": True}
