"""What a faulty or indiscreet engine can and cannot do to a client and to what the gateway keeps: an engine stream
that is not a stream of JSON chunks ends with an error event (and an error record), and an engine whose errors
echo the prompt puts it in neither the request log nor the logs. Also: a stream's tool-call verdict on its last
chunk, where the `openai` SDK keeps it. The faulty engine is a small HTTP server in this file, the gateway runs
in process (tests/conftest.py); the rest is real."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import orjson
import pytest

from gateway import relay, sse
from tests.conftest import (
    FORCER_TOKEN,
    UPDATE_CRM,
    AppGatewayFactory,
    InProcessGateway,
    sdk_client,
    sse_events,
)

SECRET = "Zanzibar-Quokka-7731"  # stands for a prompt the engine echoes back
MESSAGES = [{"role": "user", "content": f"Update {SECRET}: stage won."}]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }
    return sse.data_event(body)


COMPLETION = {
    "id": "chatcmpl-2",
    "object": "chat.completion",
    "created": 1,
    "model": "good",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "done"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


class _FaultyEngine(BaseHTTPRequestHandler):
    """Answers by model name: `garbage` streams a non-JSON event mid-way, `echo-500` / `echo-400` refuse with
    the prompt in the error, `echo-midstream` fails mid-stream with the prompt in every error field, `good`
    answers normally."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = json.dumps(body["messages"])
        model = body["model"]
        if model in ("echo-500", "echo-400"):
            status = int(model[-3:])
            self._send(status, {"error": {"message": f"cannot handle {prompt}", "type": "X", "code": status}})
        elif model == "garbage":
            self._stream([_chunk({"role": "assistant", "content": "Hel"}), b"data: <html>oops</html>\n\n"])
        elif model == "echo-midstream":
            error = {"error": {"message": prompt, "type": prompt, "param": None, "code": prompt}}
            self._stream([_chunk({"role": "assistant", "content": "Hel"}), sse.data_event(error)])
        else:
            self._send(200, COMPLETION)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _stream(self, events: list[bytes]) -> None:
        """The events, then content that must never reach the client, a finish chunk and [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        tail = [_chunk({"content": "AFTER-THE-FAULT"}), _chunk({}, "stop"), sse.DONE]
        for event in [*events, *tail]:
            self.wfile.write(event)
            self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def faulty_engine() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FaultyEngine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


POLICIES = {
    "echo.toml": 'route = "echo"\nfallback = ["good"]\n[variants.bad]\nmodel = "echo-500"\nweight = 1\n'
    '[variants.good]\nmodel = "good"\nweight = 0\n',
    "reject.toml": 'route = "reject"\n[variants.only]\nmodel = "echo-400"\nweight = 1\n',
    "mid.toml": 'route = "mid"\n[variants.only]\nmodel = "echo-midstream"\nweight = 1\n',
    "garbage.toml": 'route = "garbage"\n[variants.only]\nmodel = "garbage"\nweight = 1\n',
}


def faulty_gateway(make_app_gateway: AppGatewayFactory, url: str, **settings: Any) -> InProcessGateway:
    return make_app_gateway(POLICIES, engines={"default": url}, **settings)


# -- a stream that is not a stream of JSON chunks --------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"<html>oops</html>", b"42", b'"text"', b"[1, 2]"])
def test_the_relay_stops_at_a_data_event_that_is_not_a_json_object(payload: bytes) -> None:
    stream = relay.StreamRelay(client_wants_usage=False, hold_tool_calls=False)
    first = _chunk({"content": "Hel"})
    out = stream.feed(first + b"data: " + payload + b"\n\n" + _chunk({"content": "lo"}), now=0.0)
    assert out == first  # what came before is relayed; the bad event and everything after it are not
    assert stream.fault is not None and stream.fault.code == "engine_bad_stream"
    assert not stream.fault.fallback_ok


def test_an_empty_data_event_is_dropped_not_a_fault() -> None:
    # WHATWG SSE: an event whose data buffer is empty is not dispatched; the openai SDK would choke on it.
    stream = relay.StreamRelay(client_wants_usage=False, hold_tool_calls=False)
    assert stream.feed(b"data:\n\n: ping\n\n", now=0.0) == b": ping\n\n"
    assert stream.fault is None


def test_a_non_json_engine_event_ends_the_stream_with_an_error_event_and_an_error_record(
    make_app_gateway: AppGatewayFactory, faulty_engine: str
) -> None:
    gw = faulty_gateway(make_app_gateway, faulty_engine)
    events = sse_events(gw, {"model": "garbage", "messages": MESSAGES, "stream": True}, FORCER_TOKEN)
    assert "oops" not in "".join(events) and "AFTER-THE-FAULT" not in "".join(events)
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "engine_bad_stream")
    assert events[-1] == "data: [DONE]"
    with pytest.raises(openai.APIError) as raised:  # not a JSONDecodeError
        for _ in sdk_client(gw, FORCER_TOKEN).chat.completions.create(
            model="garbage", messages=MESSAGES, stream=True
        ):
            pass
    assert "not a JSON object" in raised.value.message
    records = gw.records()
    assert [(r.status, r.outcome, r.error_code) for r in records] == [
        (200, "stream_error", "engine_bad_stream")
    ] * 2


# -- engine error text stays out of what the gateway keeps -----------------------------------------------------


def _drive_engine_errors(gw: InProcessGateway) -> None:
    c = sdk_client(gw, FORCER_TOKEN)
    assert c.chat.completions.create(model="echo", messages=MESSAGES).choices[0].message.content == "done"
    with pytest.raises(openai.BadRequestError):  # the client's own input may come back to the client
        c.chat.completions.create(model="reject", messages=MESSAGES)
    with pytest.raises(openai.APIError):
        for _ in c.chat.completions.create(model="mid", messages=MESSAGES, stream=True):
            pass


def test_an_engine_that_echoes_the_prompt_in_errors_puts_it_in_no_log(
    make_app_gateway: AppGatewayFactory, faulty_engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = faulty_gateway(make_app_gateway, faulty_engine)
    _drive_engine_errors(gw)
    fell_back, rejected, midstream = gw.records()
    assert (fell_back.fallback_from, fell_back.fallback_reason, fell_back.outcome) == (
        "bad",
        "engine_error",
        "ok",
    )
    assert (rejected.status, rejected.error_code) == (400, "engine_rejected")
    assert (midstream.outcome, midstream.error_code) == ("stream_error", "engine_stream_error")
    for path in gw.settings.data_dir.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text
    assert "falling back to 'good'" in caplog.text and "engine_stream_error" in caplog.text


def test_engine_error_text_is_logged_when_the_operator_opts_in(
    make_app_gateway: AppGatewayFactory, faulty_engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    gw = faulty_gateway(make_app_gateway, faulty_engine, log_engine_errors=True)
    _drive_engine_errors(gw)
    assert caplog.text.count(SECRET) >= 2  # the fallback and the mid-stream error
    assert len(gw.records()) == 3
    for path in gw.settings.data_dir.iterdir():  # the request log keeps the classification all the same
        assert SECRET.encode() not in path.read_bytes(), path


# -- the verdict where SDKs keep it ----------------------------------------------------------------------------

ANNOTATED = 'route = "crm"\ntool_calls = "annotate"\n[variants.base]\nmodel = "crm-base"\nweight = 1\n'
ENFORCED = (
    'route = "crm"\ntool_calls = "enforce"\nfallback = ["safe"]\n[variants.sloppy]\nmodel = "always-invalid"\n'
    'weight = 1\n[variants.safe]\nmodel = "crm-formatter"\nweight = 0\n'
)
OBSERVED = ANNOTATED.replace('"annotate"', '"observe"')


def sdk_chunks(gw: InProcessGateway, **kwargs: Any) -> list[Any]:
    return list(
        sdk_client(gw, FORCER_TOKEN).chat.completions.create(
            model="crm", messages=MESSAGES, tools=[UPDATE_CRM], stream=True, **kwargs
        )
    )


@pytest.mark.parametrize("usage", [False, True])
def test_the_stream_verdict_is_on_the_last_chunk_for_sdk_users(
    make_app_gateway: AppGatewayFactory, usage: bool
) -> None:
    gw = make_app_gateway({"crm.toml": ANNOTATED})
    chunks = sdk_chunks(gw, stream_options={"include_usage": usage})
    *body, last = chunks
    (rec,) = gw.records()
    verdict = (last.model_extra or {})["gateway"]
    assert verdict["tool_calls"] == rec.tool_verdict and verdict["variant"] == "base"
    assert verdict.get("reason") == rec.tool_reason
    assert not any("gateway" in (c.model_extra or {}) for c in body)
    if usage:  # the usage chunk is the last one
        assert (
            last.usage is not None and last.usage.completion_tokens == rec.output_tokens and not last.choices
        )
    else:  # no extra chunk shape: the finish chunk carries it
        assert last.usage is None and last.choices[0].finish_reason is not None


def test_an_enforced_stream_carries_the_verdict_of_the_call_it_served(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway({"crm.toml": ENFORCED})
    last = sdk_chunks(gw)[-1]
    assert (last.model_extra or {})["gateway"] == {"tool_calls": "valid", "variant": "safe"}
    (rec,) = gw.records()
    assert (rec.variant, rec.fallback_from, rec.tool_verdict) == ("safe", "sloppy", "valid")


def test_observe_mode_puts_no_verdict_in_the_stream(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway({"crm.toml": OBSERVED})
    assert not any("gateway" in (c.model_extra or {}) for c in sdk_chunks(gw))


def test_a_verdict_without_a_finish_chunk_gets_a_chunk_of_its_own() -> None:
    head = {"id": "r1", "created": 5, "model": "m"}
    (extra,) = relay.with_verdict([], {"tool_calls": "none", "variant": "v"}, head)
    body = orjson.loads(sse.event_data(extra) or b"")
    assert body == {
        **head,
        "object": "chat.completion.chunk",
        "choices": [],
        "gateway": {"tool_calls": "none", "variant": "v"},
    }
    usage = sse.data_event({"choices": [], "usage": {"prompt_tokens": 1}})
    annotated = relay.with_verdict([_chunk({}, "stop"), usage, b": note\n\n"], {"tool_calls": "valid"}, head)
    assert annotated[0] == _chunk({}, "stop") and annotated[2] == b": note\n\n"
    assert orjson.loads(sse.event_data(annotated[1]) or b"")["gateway"] == {"tool_calls": "valid"}
