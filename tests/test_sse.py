"""SSE decoding, chunk accumulation and event encoding on realistic vLLM streams."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import sse
from gateway.errors import EngineError
from gateway.sse import DONE, SSEDecoder, StreamAccumulator, comment, data_event, error_event, event_data
from gateway.toolcalls import Completion, SchemaCache, ToolCall, check, expectation_from_request

ARGS = '{"account_id": "ACC-004211", "stage": "negotiation", "amount": 48000, "close_date": "2025-09-30"}'
UPDATE_CRM = {
    "type": "object",
    "properties": {
        "account_id": {"type": "string"},
        "stage": {
            "enum": ["prospecting", "qualification", "proposal", "negotiation", "closed_won", "closed_lost"]
        },
        "amount": {"type": "number"},
        "close_date": {"type": "string", "format": "date"},
    },
    "required": ["account_id", "stage", "amount"],
    "additionalProperties": False,
}


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, index: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-b7e2",
        "object": "chat.completion.chunk",
        "created": 1754300000,
        "model": "crm-lora@3",
        "choices": [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def tool_stream(args: str, pieces: list[int] | None = None) -> list[dict[str, Any]]:
    """What vLLM streams for one update_crm call: role, the call head, argument fragments, finish, usage."""
    cuts = sorted({0, len(args), *(pieces or [len(args) // 3, 2 * len(args) // 3])})
    head = {
        "index": 0,
        "id": "chatcmpl-tool-5d1",
        "type": "function",
        "function": {"name": "update_crm", "arguments": ""},
    }
    frags = [
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[a:b]}}]}, usage=None)
        for a, b in itertools.pairwise(cuts)
    ]
    return [
        chunk({"role": "assistant", "content": ""}, usage=None),
        chunk({"tool_calls": [head]}, usage=None),
        *frags,
        chunk({}, finish="tool_calls", usage=None),
        {
            "id": "chatcmpl-b7e2",
            "object": "chat.completion.chunk",
            "model": "crm-lora@3",
            "choices": [],
            "usage": {"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450},
        },
    ]


def wire(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + DONE


# --- decoding -----------------------------------------------------------------------------------------------


def test_decoder_returns_whole_events_as_received() -> None:
    stream = wire(tool_stream(ARGS))
    dec = SSEDecoder()
    events = dec.feed(stream[:50]) + dec.feed(stream[50:51]) + dec.feed(stream[51:])
    assert dec.flush() == b""
    assert b"".join(events) == stream
    assert events[-1] == DONE
    assert all(e.endswith(b"\n\n") and e.count(b"\n\n") == 1 for e in events)
    assert [orjson.loads(event_data(e) or b"") for e in events[:-1]] == tool_stream(ARGS)


def test_decoder_keeps_an_unterminated_tail() -> None:
    dec = SSEDecoder()
    assert dec.feed(b'data: {"a": 1}\n\ndata: {"b"') == [b'data: {"a": 1}\n\n']
    assert dec.feed(b"") == []
    assert dec.feed(b": 2}\n") == []
    assert dec.flush() == b'data: {"b": 2}\n'
    assert dec.flush() == b""


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"])
def test_all_three_line_endings(nl: bytes) -> None:
    stream = b"".join(
        [b": ping", nl, nl, b"event: message", nl, b"data: one", nl, b"data:two", nl, nl, b"data", nl, nl]
    )
    events = SSEDecoder().feed(stream)
    assert len(events) == 3
    assert [event_data(e) for e in events] == [None, b"one\ntwo", b""]


def test_crlf_split_between_cr_and_lf_emits_at_once() -> None:
    dec = SSEDecoder()
    first = dec.feed(b"data: a\r\n\r")
    assert first == [b"data: a\r\n\r"]  # complete already: not held back waiting for the LF
    rest = dec.feed(b"\ndata: b\r\n\r\n")
    assert rest == [b"\ndata: b\r\n\r\n"]
    assert [event_data(e) for e in first + rest] == [b"a", b"b"]


def test_lone_cr_endings_split_anywhere() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\r") == [b"data: a\r\r"]
    assert dec.feed(b"data: b\r\r") == [b"data: b\r\r"]
    assert dec.feed(b"\n") == []  # the LF of a CRLF blank line, kept for the next event
    assert dec.feed(b"\n") == []
    assert dec.feed(b"data: c\n\n") == [b"\n\ndata: c\n\n"]
    assert event_data(b"\n\ndata: c\n\n") == b"c"


@pytest.mark.parametrize(
    ("event", "data"),
    [
        (b'data: {"x": 1}\n\n', b'{"x": 1}'),
        (b"data:  two spaces\n\n", b" two spaces"),
        (b"data:\n\n", b""),
        (b"data: a\ndata: b\n\n", b"a\nb"),
        (b"id: 7\nevent: chunk\nretry: 10\ndata: x\n\n", b"x"),
        (b": ping\n\n", None),
        (b"event: keepalive\n\n", None),
        (b"datum: x\n\n", None),
        (b"\xef\xbb\xbfdata: bom\n\n", b"bom"),
        (b"data: crlf\r\n\r\n", b"crlf"),
        (b"data: cr\r\r", b"cr"),
        (b"data: [DONE]\n\n", b"[DONE]"),
    ],
)
def test_event_data(event: bytes, data: bytes | None) -> None:
    assert event_data(event) == data


# A stream of well-formed events with random line endings; values never contain CR or LF.
_values = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20
)
_line = st.one_of(
    _values.map(lambda v: ("data", "data: " + v)),
    _values.map(lambda v: ("data", "data:" + v)),
    _values.map(lambda v: ("comment", ":" + v)),
    st.integers(0, 99).map(lambda i: ("other", f"id: {i}")),
)
_event = st.lists(st.tuples(_line, st.sampled_from(["\n", "\r\n", "\r"])), min_size=1, max_size=4)


def _encode(
    events: list[list[tuple[tuple[str, str], str]]], blank: list[str]
) -> tuple[bytes, list[bytes | None]]:
    out, expected, prev = [], [], ""
    for lines, end in zip(events, blank, strict=False):
        values = []
        for (kind, text), nl in lines:
            out.append(text + nl)
            if kind == "data":
                v = text[5:]
                values.append(v[1:] if v.startswith(" ") else v)
            prev = nl
        # A lone CR followed by a lone LF would read as one CRLF: pick CRLF for the blank line then.
        out.append("\r\n" if prev == "\r" and end == "\n" else end)
        expected.append("\n".join(values).encode() if values else None)
    return "".join(out).encode(), expected


@given(
    events=st.lists(_event, min_size=1, max_size=6),
    blank=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=6, max_size=6),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_splitting_anywhere_yields_the_same_bytes_and_payloads(
    events: list[list[tuple[tuple[str, str], str]]], blank: list[str], cuts: list[int]
) -> None:
    stream, expected = _encode(events, blank)
    whole = SSEDecoder().feed(stream)
    assert [event_data(e) for e in whole] == expected
    dec = SSEDecoder()
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    pieces = [e for a, b in itertools.pairwise(bounds) for e in dec.feed(stream[a:b])]
    tail = dec.flush()  # at most the LF of a CRLF split after a lone-CR terminator: no event, no data
    assert tail in (b"", b"\n")
    assert b"".join(pieces) + tail == stream
    assert [d for d in map(event_data, pieces) if d is not None] == [d for d in expected if d is not None]


@given(
    chunks=st.lists(st.text(max_size=30), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_lf_streams_split_anywhere_yield_identical_events(chunks: list[str], cuts: list[int]) -> None:
    stream = wire([chunk({"content": c}) for c in chunks])
    dec = SSEDecoder()
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    pieces = [e for a, b in itertools.pairwise(bounds) for e in dec.feed(stream[a:b])]
    assert pieces == SSEDecoder().feed(stream)
    assert len(pieces) == len(chunks) + 1


# --- encoding -----------------------------------------------------------------------------------------------


def test_encoders() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert comment("tool-calls=valid") == b": tool-calls=valid\n\n"
    assert comment("a\nb\r\nc\rd") == b": a b c d\n\n"
    assert event_data(comment("x\n\ndata: injected")) is None
    env = {
        "error": {
            "message": "engine went away\nmid-stream",
            "type": "upstream_error",
            "param": None,
            "code": "engine_error",
        }
    }
    ev = error_event(EngineError("engine went away\nmid-stream"))
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and ev.count(b"\n") == 2
    assert orjson.loads(event_data(ev) or b"") == env
    assert SSEDecoder().feed(ev) == [ev]
    assert data_event({"a": "é"}) == b'data: {"a":"\xc3\xa9"}\n\n'


# --- accumulation -------------------------------------------------------------------------------------------


def test_accumulates_a_vllm_tool_call_stream() -> None:
    acc = StreamAccumulator()
    flags = [acc.add(c) for c in tool_stream(ARGS)]
    assert flags[0] == 0  # role only, empty content
    assert flags[1] == sse.TOKENS | sse.TOOL_DELTA
    assert all(f == sse.TOKENS | sse.TOOL_DELTA for f in flags[2:-2])
    assert flags[-2] == sse.FINISH
    assert flags[-1] == sse.USAGE_ONLY
    assert acc.usage == {"prompt_tokens": 412, "completion_tokens": 38, "total_tokens": 450}
    assert acc.model == "crm-lora@3"
    assert acc.error is None
    assert acc.completions() == [
        Completion(0, None, (ToolCall("chatcmpl-tool-5d1", "update_crm", ARGS),), "tool_calls")
    ]


def test_stream_end_to_end_through_the_checker() -> None:
    body = {"tools": [{"type": "function", "function": {"name": "update_crm", "parameters": UPDATE_CRM}}]}
    exp, cache = expectation_from_request(body), SchemaCache()
    for args, status in [(ARGS, "valid"), (ARGS.replace("negotiation", "won"), "invalid")]:
        dec, acc = SSEDecoder(), StreamAccumulator()
        stream = wire(tool_stream(args))
        for i in range(0, len(stream), 7):
            for ev in dec.feed(stream[i : i + 7]):
                data = event_data(ev)
                if data is not None and data != b"[DONE]":
                    acc.add(orjson.loads(data))
        assert check(acc.completions(), exp, cache).status == status


@given(args=st.text(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_argument_fragments_split_anywhere_reconstruct(args: str, cuts: list[int]) -> None:
    acc = StreamAccumulator()
    for c in tool_stream(args, [c for c in cuts if c <= len(args)]):
        acc.add(c)
    (completion,) = acc.completions()
    assert completion.tool_calls == (ToolCall("chatcmpl-tool-5d1", "update_crm", args),)


def test_parallel_calls_and_two_entries_for_one_index_in_a_chunk() -> None:
    acc = StreamAccumulator()
    acc.add(
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call-b",
                        "type": "function",
                        "function": {"name": "lookup_account", "arguments": ""},
                    },
                    {"index": 1, "function": {"arguments": '{"query": '}},
                ]
            }
        )
    )
    acc.add(
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call-a",
                        "type": "function",
                        "function": {"name": "update_crm", "arguments": '{"amount"'},
                    },
                    {"index": 1, "function": {"arguments": '"Acme"}'}},
                    {
                        "index": 0,
                        "function": {"name": "update_crm", "arguments": ": 1}"},
                    },  # a server repeating the name
                ]
            }
        )
    )
    acc.add(chunk({}, finish="tool_calls"))
    (completion,) = acc.completions()
    assert completion.tool_calls == (
        ToolCall("call-a", "update_crm", '{"amount": 1}'),
        ToolCall("call-b", "lookup_account", '{"query": "Acme"}'),
    )


def test_content_reasoning_and_several_choices() -> None:
    acc = StreamAccumulator()
    assert acc.add(chunk({"reasoning_content": "The user wants"})) == sse.TOKENS
    assert acc.add(chunk({"reasoning": " a summary."})) == sse.TOKENS
    assert acc.add(chunk({"content": '{"account_id": '}, index=0)) == sse.TOKENS
    assert acc.add(chunk({"content": "Hello"}, index=1)) == sse.TOKENS
    assert acc.add(chunk({"content": '"ACC-1"}'}, finish="stop")) == sse.TOKENS | sse.FINISH
    assert acc.add(chunk({"content": ""}, finish="length", index=1)) == sse.FINISH
    assert acc.completions() == [
        Completion(0, '{"account_id": "ACC-1"}', (), "stop"),
        Completion(1, "Hello", (), "length"),
    ]


def test_usage_error_and_odd_chunks() -> None:
    acc = StreamAccumulator()
    assert acc.add({"choices": [], "usage": None}) == 0
    assert (
        acc.add(
            chunk({"content": "x"}, usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
        )
        == sse.TOKENS
    )
    assert acc.usage == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert acc.add({"choices": ["garbage", {"index": 0, "delta": None}]}) == 0
    err = {"message": "CUDA out of memory", "type": "InternalServerError", "param": None, "code": 500}
    assert acc.add({"error": err}) == sse.ERROR
    assert acc.error == err
    legacy = {"object": "error", "message": "boom", "type": "BadRequestError", "code": 400}
    assert StreamAccumulator().add(legacy) == sse.ERROR
    assert StreamAccumulator().completions() == []
