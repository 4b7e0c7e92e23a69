"""The simulated engine, over real loopback HTTP, with the real `openai` SDK and httpx as callers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import jsonschema_rs
import openai
import pytest
from aiohttp import web

from gateway.devtools import sim_engine
from gateway.devtools.sim_behaviour import Behaviour, load_behaviour, parse_behaviour

ROOT = Path(__file__).resolve().parents[1]

BEHAVIOUR = """
seed = 42

[models.crm-base]
output_tokens = 12

[models.flawed]
invalid = { unknown_tool = 0.05, malformed_json = 0.05, schema_violation = 0.10, missing_tool_call = 0.05, \
truncated = 0.05 }

[models.slow]
ttft_ms = 10
tokens_per_s = 40
output_tokens = 400

[models.broken]
midstream_error_rate = 1.0

[models.failing]
error_rate = 1.0

[adapters.crm-formatter]
invalid = { schema_violation = 1.0 }
"""

TICKET_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "account_id": {"type": "string", "minLength": 3},
        "priority": {"type": "string", "enum": ["low", "normal", "high"]},
        "due": {"type": "string", "format": "date"},
        "amount": {"type": "number", "minimum": 1, "maximum": 500},
        "seats": {"type": "integer", "exclusiveMinimum": 0},
        "notify": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "contact": {"$ref": "#/$defs/contact"},
    },
    "required": ["account_id", "priority", "due", "amount"],
    "additionalProperties": False,
    "$defs": {
        "contact": {
            "type": "object",
            "properties": {"email": {"type": "string", "format": "email"}},
            "required": ["email"],
        }
    },
}
TICKET = {"type": "function", "function": {"name": "create_ticket", "parameters": TICKET_PARAMS}}
NOTE_PARAMS = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
NOTE = {"type": "function", "function": {"name": "add_note", "parameters": NOTE_PARAMS}}
MESSAGES: list[Any] = [{"role": "user", "content": "Open a ticket for ACME, high priority."}]
TICKET_OK = jsonschema_rs.validator_for(TICKET_PARAMS)


class _ServerThread:
    """The simulated engine on a loopback port, served by its own event loop in a daemon thread."""

    def __init__(self, behaviour: Behaviour, *, handler_cancellation: bool = True) -> None:
        self.behaviour = behaviour
        self.cancellation = handler_cancellation
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.url = ""
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self.stop = asyncio.Event()
        app = sim_engine.create_app(self.behaviour)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=self.cancellation)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self.ready.set()
        await self.stop.wait()
        await runner.cleanup()

    def __enter__(self) -> _ServerThread:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def behaviour() -> Behaviour:
    return parse_behaviour(__import__("tomllib").loads(BEHAVIOUR), "test")


@pytest.fixture(scope="module")
def server(behaviour: Behaviour) -> Iterator[_ServerThread]:
    with _ServerThread(behaviour) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: _ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server: _ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as session:
        yield session


def stats(http: httpx.Client) -> dict[str, Any]:
    result: dict[str, Any] = http.get("/sim/stats").json()
    return result


# ------------------------------------------------------------------------------------------------ answers


def test_non_stream_tool_call_has_vllm_shape(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="crm-base", messages=MESSAGES, tools=[TICKET, NOTE])
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == "crm-base"
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "create_ticket"  # the first declared tool
    arguments = json.loads(call.function.arguments)
    assert TICKET_OK.is_valid(arguments), arguments
    assert arguments["due"] == "2026-03-01" and arguments["contact"] == {"email": "ana@example.com"}
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_named_tool_choice_calls_that_tool_and_finishes_stop_like_vllm(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="crm-base",
        messages=MESSAGES,
        tools=[TICKET, NOTE],
        tool_choice={"type": "function", "function": {"name": "add_note"}},
    )
    [call] = answer.choices[0].message.tool_calls or []
    assert call.function.name == "add_note" and isinstance(json.loads(call.function.arguments)["text"], str)
    assert answer.choices[0].finish_reason == "stop"


def test_named_tool_that_was_not_declared_is_a_400(http: httpx.Client) -> None:
    body = {"model": "crm-base", "messages": MESSAGES, "tools": [NOTE]}
    body["tool_choice"] = {"type": "function", "function": {"name": "nope"}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


def test_text_answer_and_max_tokens(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="crm-base", messages=MESSAGES)
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.tool_calls in (None, [])
    assert len((answer.choices[0].message.content or "").split()) == 12
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    cut = client.chat.completions.create(model="crm-base", messages=MESSAGES, max_tokens=5)
    assert (
        cut.choices[0].finish_reason == "length" and len((cut.choices[0].message.content or "").split()) == 5
    )
    none = client.chat.completions.create(
        model="crm-base", messages=MESSAGES, tools=[TICKET], tool_choice="none"
    )
    assert none.choices[0].message.content and not none.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "params",
    [
        TICKET_PARAMS,
        {
            "type": "object",
            "properties": {"rows": {"type": "array", "items": TICKET_PARAMS, "minItems": 2}},
            "$defs": TICKET_PARAMS["$defs"],  # the nested $ref resolves against the root
        },
        {
            "type": "object",
            "properties": {"x": {"anyOf": [{"type": "integer", "maximum": 3}, {"type": "null"}]}},
        },
        {
            "type": "object",
            "properties": {"x": {"type": ["string", "null"], "maxLength": 2}, "k": {"const": 7}},
        },
        {
            "type": "object",
            "properties": {"n": {"type": "number", "exclusiveMinimum": 10, "exclusiveMaximum": 12}},
        },
        {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}},
        {"type": "object"},
    ],
)
def test_generated_arguments_satisfy_the_schema(http: httpx.Client, params: dict[str, Any]) -> None:
    tool = {"type": "function", "function": {"name": "t", "parameters": params}}
    body = {"model": "crm-base", "messages": MESSAGES, "tools": [tool]}
    response = http.post("/v1/chat/completions", json=body).json()
    arguments = json.loads(response["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert jsonschema_rs.validator_for(params).is_valid(arguments), arguments


# ------------------------------------------------------------------------------------------------ streams


def test_stream_tool_call_deltas_reassemble_to_valid_arguments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="crm-base",
        messages=MESSAGES,
        tools=[TICKET],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    [head] = chunks[1].choices[0].delta.tool_calls or []
    assert (head.index, head.type) == (0, "function") and head.id and head.id.startswith("chatcmpl-tool-")
    assert head.function is not None and (head.function.name, head.function.arguments) == (
        "create_ticket",
        "",
    )
    fragments = []
    for chunk in chunks[2:-2]:
        [delta] = chunk.choices[0].delta.tool_calls or []
        assert delta.index == 0 and delta.id is None and delta.function is not None
        fragments.append(delta.function.arguments or "")
    assert len(fragments) > 3 and all(0 < len(f) <= 8 for f in fragments)
    assert TICKET_OK.is_valid(json.loads("".join(fragments)))
    finish = chunks[-2].choices[0]
    assert finish.finish_reason == "tool_calls" and not finish.delta.tool_calls and not finish.delta.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(fragments) + 1


def test_usage_chunk_only_when_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="crm-base", messages=MESSAGES, stream=True))
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    words = "".join(c.choices[0].delta.content or "" for c in chunks).split()
    assert len(words) == 12 and words[:3] == ["alpha", "bravo", "delta"]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_stream_framing(http: httpx.Client) -> None:
    body = {
        "model": "crm-base",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    frames = text.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(frame.startswith("data: {") for frame in frames[:-2])
    last = json.loads(frames[-3].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12


def test_midstream_error_arrives_on_the_200_then_done(http: httpx.Client) -> None:
    body = {"model": "broken", "messages": MESSAGES, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        frames = response.read().decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    error = json.loads(frames[-3].removeprefix("data: "))
    assert set(error) == {"error"} and error["error"]["code"] == 500
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-3]]
    assert len(chunks) >= 2 and all(c["choices"][0]["finish_reason"] is None for c in chunks)


def test_error_rate_gives_500_envelope_before_any_byte(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": "failing", "messages": MESSAGES, "stream": True}
    )
    assert response.status_code == 500 and response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["type"] == "InternalServerError"


@pytest.mark.parametrize("handler_cancellation", [True, False])
def test_client_hang_up_stops_the_stream_and_is_counted(
    behaviour: Behaviour, handler_cancellation: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with _ServerThread(behaviour, handler_cancellation=handler_cancellation) as running:
        with httpx.Client(base_url=running.url) as session:
            body = {"model": "slow", "messages": MESSAGES, "stream": True}
            with session.stream("POST", "/v1/chat/completions", json=body) as response:
                frames = (line for line in response.iter_lines() if line)
                assert all(next(frames).startswith("data: {") for _ in range(3))
            deadline = time.monotonic() + 3
            while (counts := stats(session))["cancelled_streams"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert counts["cancelled_streams"] == 1 and counts["active_streams"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------------------------------- errors


def test_unknown_model_is_vllms_404_envelope(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    response = http.post("/v1/chat/completions", json={"model": "gpt-nope", "messages": MESSAGES})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `gpt-nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_bad_json_is_a_400_envelope(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and set(error) >= {"message", "param"}


# ----------------------------------------------------------------------------------------------- adapters


def test_models_and_health(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    listing = http.get("/v1/models").json()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    assert {"crm-base", "flawed", "slow"} <= set(cards)
    assert cards["crm-base"]["object"] == "model" and cards["crm-base"]["parent"] is None


def test_adapter_load_use_unload(http: httpx.Client, tmp_path: Path) -> None:
    before = stats(http)
    name, load = "crm-formatter@v2", {"lora_name": "crm-formatter@v2", "lora_path": str(tmp_path)}
    response = http.post("/v1/load_lora_adapter", json=load)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert response.text == f"Success: LoRA adapter '{name}' added successfully."
    card = next(c for c in http.get("/v1/models").json()["data"] if c["id"] == name)
    assert (card["root"], card["parent"]) == (str(tmp_path), "crm-base")
    body = {"model": name, "messages": MESSAGES, "tools": [TICKET]}
    answer = http.post("/v1/chat/completions", json=body).json()  # [adapters.crm-formatter]: always violates
    assert not TICKET_OK.is_valid(
        json.loads(answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    )
    again = http.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and again.json()["error"]["code"] == 400
    missing = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "none")})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
    plain = http.post(
        "/v1/load_lora_adapter", content=json.dumps(load), headers={"Content-Type": "text/plain"}
    )
    assert plain.status_code == 400 and "error" in plain.json()
    unload = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert (
        unload.status_code == 200 and unload.text == f"Success: LoRA adapter '{name}' removed successfully."
    )
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 404
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "crm-base"}).status_code == 404
    assert http.post("/v1/chat/completions", json=body).status_code == 404
    after = stats(http)
    assert after["adapter_loads"] - before["adapter_loads"] == 1
    assert after["adapter_unloads"] - before["adapter_unloads"] == 1
    assert after["requests"][name] == 1


@pytest.mark.parametrize(
    "params",
    [
        TICKET_PARAMS,
        {"type": "object", "properties": {"level": {"enum": ["a", "b"]}}},
        {"type": "object", "properties": {"text": {"type": "string"}}},
        {"type": "object", "properties": {"flag": {"type": "boolean"}}},
        {"type": "object", "properties": {"any": {}}, "required": ["any"]},
        {"type": "object"},
    ],
)
def test_schema_violations_really_violate(http: httpx.Client, tmp_path: Path, params: dict[str, Any]) -> None:
    name = f"crm-formatter@{tmp_path.name}"
    assert http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(tmp_path)}).is_success
    tool = {"type": "function", "function": {"name": "t", "parameters": params}}
    answer = http.post(
        "/v1/chat/completions", json={"model": name, "messages": MESSAGES, "tools": [tool]}
    ).json()
    arguments = json.loads(answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert not jsonschema_rs.validator_for(params).is_valid(arguments), arguments
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).is_success


# ------------------------------------------------------------------------------------ draws and determinism


def _call(http: httpx.Client, model: str, request_id: str | None = None) -> dict[str, Any]:
    headers = {"X-Request-Id": request_id} if request_id else {}
    body = {"model": model, "messages": MESSAGES, "tools": [TICKET]}
    answer: dict[str, Any] = http.post("/v1/chat/completions", json=body, headers=headers).json()
    return answer


def test_same_request_id_gives_the_same_answer(client: openai.OpenAI, http: httpx.Client) -> None:
    first, second = (
        client.chat.completions.create(
            model="flawed", messages=MESSAGES, tools=[TICKET], extra_headers={"X-Request-Id": "req-7"}
        )
        for _ in range(2)
    )
    assert first.id == second.id == "chatcmpl-req-7"
    assert first.choices == second.choices and first.usage == second.usage
    arguments = {
        _call(http, "crm-base", f"req-{i}")["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        for i in range(10)
    }
    assert len(arguments) > 1  # other ids draw other values


def test_same_seed_replays_the_same_sequence_without_ids(behaviour: Behaviour) -> None:
    runs = []
    for _ in range(2):
        with _ServerThread(behaviour) as running, httpx.Client(base_url=running.url) as session:
            runs.append([_call(session, "flawed")["choices"] for _ in range(15)])
    assert runs[0] == runs[1]


def _verdict(choice: dict[str, Any]) -> str:
    if choice["finish_reason"] == "length":
        return "truncated"
    if not choice["message"]["tool_calls"]:
        return "missing_tool_call"
    function = choice["message"]["tool_calls"][0]["function"]
    if function["name"] != "create_ticket":
        return "unknown_tool"
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return "malformed_json"
    return "valid" if TICKET_OK.is_valid(arguments) else "schema_violation"


def test_flaw_rates_follow_the_behaviour(http: httpx.Client) -> None:
    n = 400
    counts = Counter(_verdict(_call(http, "flawed")["choices"][0]) for _ in range(n))
    expected = {
        "unknown_tool": 0.05,
        "malformed_json": 0.05,
        "schema_violation": 0.10,
        "missing_tool_call": 0.05,
        "truncated": 0.05,
        "valid": 0.70,
    }
    for verdict, p in expected.items():
        assert abs(counts[verdict] - n * p) <= 4 * (n * p * (1 - p)) ** 0.5 + 2, (verdict, counts)


# ------------------------------------------------------------------------------------ behaviour and serving


def test_example_behaviour_file_loads() -> None:
    example = load_behaviour(ROOT / "loadtests" / "sim" / "engine.toml")
    base = example.models["crm-base"].invalid
    assert (base.schema_violation, base.malformed_json, base.truncated) == (0.08, 0.03, 0.02)
    assert example.for_adapter("crm-formatter@v3").invalid.schema_violation == 0.01
    bench = example.models["bench"]
    assert bench.latency_ms == bench.ttft_ms == bench.tokens_per_s == 0


def test_defaults_fill_model_tables() -> None:
    text = "[defaults]\nlatency_ms = 5\ninvalid = { truncated = 0.1 }\n[models.a]\ninvalid = { unknown_tool = 0.2 }\n"
    loaded = parse_behaviour(__import__("tomllib").loads(text))
    model = loaded.models["a"]
    assert (model.latency_ms, model.invalid.truncated, model.invalid.unknown_tool) == (5, 0.1, 0.2)
    assert loaded.for_adapter("other") == loaded.defaults
    assert list(load_behaviour(None).models) == ["crm-base"]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('seed = "x"', "seed"),
        ("nonsense = 1", "nonsense"),
        ("models = 3", "models"),
        ("[models.a]\nlatency_ms = -1", "models.a.latency_ms"),
        ("[models.a]\nerror_rate = 1.5", "models.a.error_rate"),
        ("[models.a]\noutput_tokens = 2.5", "models.a.output_tokens"),
        ("[models.a]\nbogus = 1", "bogus"),
        ("[models.a]\ninvalid = { schema_violation = 0.7, truncated = 0.5 }", "add up"),
        ("[models.a]\ninvalid = { sloppy = 0.1 }", "sloppy"),
        ("[lora_modules]\nx = 3", "lora_modules.x"),
        ("[models.a", "not valid TOML"),
    ],
)
def test_bad_behaviour_files_are_rejected_clearly(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "engine.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=complaint) as caught:
        load_behaviour(path)
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_behaviour(tmp_path / "absent.toml")


def test_lora_modules_are_served_at_start(tmp_path: Path) -> None:
    loaded = parse_behaviour({"lora_modules": {"crm-formatter@v1": str(tmp_path)}})

    async def models() -> list[dict[str, Any]]:
        async with (
            sim_engine.running(loaded) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/v1/models") as response,
        ):
            listing: dict[str, Any] = await response.json()
            return listing["data"]

    cards = asyncio.run(models())
    assert [(c["id"], c["parent"]) for c in cards] == [("crm-base", None), ("crm-formatter@v1", "crm-base")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_module_entry_point_serves_and_rejects_bad_files(tmp_path: Path) -> None:
    port, env = _free_port(), {**os.environ, "PYTHONPATH": str(ROOT)}
    example = ROOT / "loadtests" / "sim" / "engine.toml"
    process = subprocess.Popen(
        sim_engine.command(port, example), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline, status = time.monotonic() + 10, None
        while status != 200 and time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health").status_code
            except httpx.TransportError:
                time.sleep(0.05)
        assert status == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "crm-base"
    finally:
        process.terminate()
        process.wait(5)
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.a]\nerror_rate = 2")
    failed = subprocess.run(
        sim_engine.command(port, bad), env=env, capture_output=True, text=True, timeout=20
    )
    assert failed.returncode == 2 and "models.a.error_rate" in failed.stderr
