"""Fuzzing the chat endpoint: thousands of request bodies, valid and broken, against an in-process gateway.

Each example starts from a valid request and applies up to three mutations (a known field set to any JSON value,
an edge number or a deeply nested value, a field dropped, odd unicode, extra unknown fields), or sends raw bytes.
The gateway runs in this process (httpx's ASGI transport, the app's own lifespan) in front of the simulated
engine on a loopback port, set to answer every request well, so any 5xx is the gateway's own fault. For every
example: no 5xx, every error in OpenAI's envelope, every stream complete and free of error events, and exactly
one record in the request log carrying the status the client saw.

`GATEWAY_FUZZ_EXAMPLES` sets the number of examples (2,000 by default, about 25 s here; `make fuzz` runs 50,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import GatewayASGI, create_app
from gateway.devtools import sim_engine
from gateway.devtools.sim_behaviour import Behaviour, ModelBehaviour
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN, CLIENT_TOKEN, CRM_POLICY, FORCER_TOKEN, UPDATE_CRM, write_keys

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "2000"))

# Every served model answers at once and well: no injected errors, flaws or latency.
BEHAVIOUR = Behaviour(models={name: ModelBehaviour() for name in ("crm-base", "crm-formatter")})
RAG_POLICY = """
route = "rag"
[variants.only]
model = "crm-base"
weight = 1
system_prompt = "Use these notes:\\n{context}"
retrieval = { documents = "KB", top_k = 2 }
"""
OTHER_POLICY = CRM_POLICY.replace('route = "crm-assistant"', 'route = "other"')


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    app: GatewayASGI
    log: sqlite3.Connection

    def post(self, content: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.loop.run_until_complete(
            self.client.post("/v1/chat/completions", content=content, headers=headers)
        )

    def records_of(self, request_id: str) -> list[tuple[int, str]]:
        assert self.app.components.records.flush(timeout=10)
        rows = self.log.execute("SELECT status, outcome FROM records WHERE request_id = ?", (request_id,))
        return list(rows)


def _settings(tmp: Path, engine_url: str) -> Settings:
    kb = tmp / "kb"
    kb.mkdir()
    (kb / "amounts.md").write_text("# Amounts\n\nWrite amounts as plain numbers in EUR.\n")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "crm.toml").write_text(CRM_POLICY)
    (policies / "other.toml").write_text(OTHER_POLICY)
    (policies / "rag.toml").write_text(RAG_POLICY.replace("KB", str(kb)))
    return Settings(
        policies_dir=policies,
        engines={"default": engine_url},
        data_dir=tmp / "var",
        adapters_dir=tmp / "adapters",
        admin_token=ADMIN_TOKEN,
        keys_file=write_keys(tmp / "keys.toml"),
    )


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    try:
        url = loop.run_until_complete(stack.enter_async_context(sim_engine.running(BEHAVIOUR)))
        app = create_app(_settings(tmp, url))
        loop.run_until_complete(
            stack.enter_async_context(app.starlette.router.lifespan_context(app.starlette))
        )
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        stack.push_async_callback(client.aclose)
        log = sqlite3.connect(app.components.settings.records_db)
        stack.callback(log.close)
        yield Harness(loop, client, app, log)
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


# -- strategies -------------------------------------------------------------------------------------------------

ODD_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # surrogates, controls, NUL included
NUMBER_LIKE = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e999", "-0", "0x10", "", " 1", "true", "null"]
)
EDGE_NUMBERS = st.one_of(
    st.sampled_from(
        [0, -0.0, 1, -1, 2, 2.0000001, 20, 21, 4, 5, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1]
    ),
    st.sampled_from([10**30, 1e308, -1e308, 5e-324, float("nan"), float("inf"), float("-inf")]),
    st.floats(-3, 3),
    st.integers(-(2**70), 2**70),
)
LEAVES = st.one_of(st.none(), st.booleans(), EDGE_NUMBERS, ODD_TEXT, NUMBER_LIKE)
ANY_JSON = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12,
)

ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])
CONTENT = st.one_of(
    st.text(max_size=40),
    ODD_TEXT,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": ODD_TEXT}), min_size=1, max_size=2),
)
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": CONTENT})
SCHEMA = st.one_of(
    st.just(UPDATE_CRM["function"]["parameters"]),  # type: ignore[index]
    st.just({"type": "object", "properties": {"x": {"type": "integer"}}}),
    st.dictionaries(
        st.sampled_from(["type", "properties", "required", "enum", "items"]), ANY_JSON, max_size=3
    ),
)
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.just("update_crm"), "parameters": SCHEMA}),
    }
)

# A valid value for every field the gateway knows.
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["crm-assistant", "rag", "other", "no-such-route"]),
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "max_tokens": st.integers(1, 64),
    "max_completion_tokens": st.integers(1, 64),
    "n": st.integers(1, 3),
    "top_logprobs": st.integers(0, 20),
    "logprobs": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4)),
    "tools": st.lists(TOOL, min_size=1, max_size=2),
    "tool_choice": st.sampled_from(
        ["auto", "none", "required", {"type": "function", "function": {"name": "update_crm"}}]
    ),
    "response_format": st.sampled_from(
        [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        ]
    ),
    "user": st.text(max_size=10),
}
REQUIRED = ("model", "messages")
OPTIONAL = tuple(name for name in GOOD if name not in REQUIRED)


def nested(depth: int, leaf: Any = "x") -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    body = {name: draw(GOOD[name]) for name in REQUIRED}
    for name in draw(st.lists(st.sampled_from(OPTIONAL), max_size=6, unique=True)):
        body[name] = draw(GOOD[name])
    stream = draw(st.sampled_from([None, False, True, True]))  # streams take a path of their own
    if stream is not None:
        body["stream"] = stream
    if "tool_choice" in body and isinstance(body["tool_choice"], dict) and "tools" not in body:
        body["tools"] = [UPDATE_CRM]
    return body


@st.composite
def mutated(draw: st.DrawFn, body: dict[str, Any]) -> dict[str, Any]:
    field = draw(st.sampled_from((*GOOD, "seed", "x_vendor")))
    kind = draw(st.sampled_from(["any", "edge", "drop", "deep", "deep-inside", "null"]))
    if kind == "any":
        body[field] = draw(ANY_JSON)
    elif kind == "edge":
        body[field] = draw(st.one_of(EDGE_NUMBERS, NUMBER_LIKE))
    elif kind == "drop":
        body.pop(field, None)
    elif kind == "null":
        body[field] = None
    elif kind == "deep":
        body[field] = nested(draw(st.integers(30, 300)))
    else:  # deep inside the places that hold structure: a message's content, a tool's schema
        deep = nested(draw(st.integers(30, 300)), draw(LEAVES))
        body["messages"] = [{"role": "user", "content": [deep]}]
        if draw(st.booleans()):
            body["tools"] = [{"type": "function", "function": {"name": "update_crm", "parameters": deep}}]
    return body


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    body = draw(valid_bodies())
    for _ in range(draw(st.integers(0, 3))):
        body = draw(mutated(body))
    if draw(st.booleans()):
        body.update(draw(st.dictionaries(ODD_TEXT, ANY_JSON, max_size=2)))  # unknown fields pass through
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    mangle = draw(st.sampled_from(["none"] * 8 + ["truncate", "bytes", "scalar"]))
    if mangle == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    if mangle == "bytes":
        return draw(st.binary(max_size=64))
    if mangle == "scalar":
        return json.dumps(draw(ANY_JSON)).encode()
    return raw


@st.composite
def request_headers(draw: st.DrawFn) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    # Mostly a key that may use every route; sometimes one restricted to crm-assistant, a wrong one or none.
    keys = [FORCER_TOKEN] * 6 + [CLIENT_TOKEN] * 2 + ["sk-wrong", None]
    token = draw(st.sampled_from(keys))
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if draw(st.integers(0, 3)) == 0:
        headers["x-gateway-variant"] = draw(st.sampled_from(["baseline", "formatter", "only", "nope", ""]))
    if draw(st.booleans()):
        headers["x-user-id"] = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12))
    return headers


# -- the property -----------------------------------------------------------------------------------------------


def check_envelope(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error


def check_answer(response: httpx.Response) -> None:
    if response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-200:]
        assert '\ndata: {"error"' not in "\n" + response.text, response.text[-500:]
    else:
        assert isinstance(response.json().get("choices"), list)


@settings(
    max_examples=EXAMPLES,
    deadline=None,  # a busy CI machine may stall one request for longer than hypothesis' 200 ms: not a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(raw=request_bytes(), headers=request_headers())
def test_any_request_gets_a_clean_answer_and_one_record(
    harness: Harness, raw: bytes, headers: dict[str, str]
) -> None:
    response = harness.post(raw, headers)
    assert response.status_code < 500, response.text[:500]
    if response.status_code == 200:
        check_answer(response)
    else:
        check_envelope(response)
    records = harness.records_of(response.headers["x-request-id"])
    assert len(records) == 1 and records[0][0] == response.status_code, records
