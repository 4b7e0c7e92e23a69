"""The load test's pure core: scenarios and their errors, the job order and arrival times, reading answers,
task success, the per-variant figures, and the renderings (the paired statistics: tests/test_stats.py)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.errors import ConfigError
from gateway.loadtest.answer import Sample, StreamReader, judge, read_unary, same
from gateway.loadtest.html import render
from gateway.loadtest.plan import Jobs, arrivals, prepare, request_id
from gateway.loadtest.results import RunData, summarize
from gateway.loadtest.scenario import (
    GoldenItem,
    Loaded,
    load_scenario,
    parse_scenario,
    planned_requests,
    with_overrides,
)
from gateway.loadtest.svg import nice_ticks
from gateway.loadtest.text import compare, format_result
from gateway.pricing import Price
from gateway.toolcalls import Completion, ToolCall
from tests.conftest import ROOT

SCENARIOS = ROOT / "loadtests" / "scenarios"


def scenario_doc(**tables: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "t",
        "target": {"route": "crm-assistant"},
        "requests": {"golden": "g.jsonl"},
        "load": {"arrival": "concurrent", "concurrency": 2},
    }
    for key, value in tables.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return doc


# --- scenarios ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")))
def test_shipped_scenarios_load_with_their_request_sets_and_prices(path: Path) -> None:
    loaded = load_scenario(path)
    assert loaded.golden and loaded.prices
    for variant in loaded.scenario.compare.variants:
        assert variant in loaded.prices


def test_crm_compare_replays_the_golden_set_through_every_formatter_version() -> None:
    loaded = load_scenario(SCENARIOS / "crm-compare.toml")
    s = loaded.scenario
    assert s.compare.mode == "paired" and s.compare.reference == "baseline"
    assert s.compare.variants == ["baseline", "formatter-1", "formatter-2", "formatter-3"]
    assert len(loaded.golden) == 300 and all(item.expected for item in loaded.golden)
    assert planned_requests(s, len(loaded.golden)) == 1200
    assert s.expect["formatter-3"].invalid_rate == (0.25, 1.0)


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"load": {"rate": 5}}, "load: rate: only for arrival 'fixed' or 'poisson'"),
        ({"load": {"arrival": "poisson", "concurrency": None}}, "load: rate: required for arrival 'poisson'"),
        ({"load": {"requests": 5, "duration_s": 3}}, "give requests or duration_s, not both"),
        ({"load": {"rate_per_s": 3}}, "load.rate_per_s: Extra inputs are not permitted"),
        ({"compare": {"mode": "paired", "variants": ["a"]}}, "paired mode compares at least two variants"),
        ({"compare": {"variants": ["a", "a"]}}, "a variant is listed twice"),
        ({"compare": {"variants": ["a", "b"], "baseline": "c"}}, "baseline: 'c' is not one of the variants"),
        (
            {"compare": {"variants": ["a"]}, "expect": {"b": {"invalid_rate": [0, 0.1]}}},
            "expect: ['b'] not among compare.variants",
        ),
        ({"expect": {"a": {"invalid_rate": [0.3, 0.1]}}}, "low 0.3 is above high 0.1"),
        ({"requests": {"body": {"model": "x"}}}, "['model'] are set by the runner"),
        ({"target": {"url": "localhost:8080"}}, "target.url: String should match pattern"),
        ({"compare": {"mode": "split"}}, "compare.mode: Input should be 'as_served' or 'paired'"),
    ],
)
def test_bad_scenarios_are_refused_naming_the_key(tables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(scenario_doc(**tables), "s.toml")
    assert caught.value.message.startswith("s.toml: ") and message in caught.value.message


def test_missing_route_is_named() -> None:
    doc = scenario_doc()
    del doc["target"]["route"]
    with pytest.raises(ConfigError, match=r"target\.route: Field required"):
        parse_scenario(doc)


def test_overrides_are_validated_with_the_rest() -> None:
    s = parse_scenario(scenario_doc(load={"requests": 10}))
    assert with_overrides(s, duration_s=5.0).load.duration_s == 5.0
    assert with_overrides(s, duration_s=5.0).load.requests is None
    assert with_overrides(s, url="http://h:1").target.url == "http://h:1"
    with pytest.raises(ConfigError, match="rate: only for arrival"):
        with_overrides(s, rate=10.0)


def test_request_set_and_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"messages": []}\n')
    (tmp_path / "s.toml").write_text(
        'name = "t"\n[target]\nroute = "r"\n[requests]\ngolden = "g.jsonl"\n[load]\nconcurrency = 1\n'
    )
    with pytest.raises(ConfigError, match=r"g.jsonl:2: expected an object with a non-empty 'messages' list"):
        load_scenario(tmp_path / "s.toml")
    with pytest.raises(ConfigError, match="cannot read the scenario"):
        load_scenario(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(tmp_path / "bad.toml")


def test_prices_must_cover_the_compared_variants(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    policy = ROOT / "loadtests" / "bench" / "policies" / "bench.toml"
    (tmp_path / "s.toml").write_text(
        f'name = "t"\n[target]\nroute = "bench"\nprices = "{policy}"\n[requests]\ngolden = "g.jsonl"\n'
        '[load]\nconcurrency = 1\n[compare]\nmode = "paired"\nvariants = ["baseline", "nope"]\n'
    )
    with pytest.raises(ConfigError, match=r"no variant \['nope'\]"):
        load_scenario(tmp_path / "s.toml")


def test_planned_requests_round_up_to_whole_pairs() -> None:
    paired = {"mode": "paired", "variants": ["a", "b", "c"]}
    assert planned_requests(parse_scenario(scenario_doc(load={"requests": 10}, compare=paired)), 50) == 12
    assert planned_requests(parse_scenario(scenario_doc(compare=paired)), 50) == 150  # one pass
    fixed = {"arrival": "fixed", "concurrency": None, "rate": 7.5, "duration_s": 2}
    assert planned_requests(parse_scenario(scenario_doc(load=fixed)), 50) == 15
    assert planned_requests(parse_scenario(scenario_doc(load={"duration_s": 2})), 50) is None


# --- jobs and arrivals ----------------------------------------------------------------------------------------


def test_paired_jobs_send_each_item_through_every_variant_in_a_seeded_order() -> None:
    s = parse_scenario(scenario_doc(compare={"mode": "paired", "variants": ["a", "b", "c"]}))
    jobs = Jobs(s, items=4)
    groups = [[jobs.job(3 * g + i) for i in range(3)] for g in range(8)]
    for g, group in enumerate(groups):
        assert {j.item for j in group} == {g % 4} and sorted(j.variant or "" for j in group) == [
            "a",
            "b",
            "c",
        ]
    assert len({tuple(j.variant for j in group) for group in groups}) > 1  # the order is not always the same
    assert [jobs.job(k) for k in range(24)] == [Jobs(s, items=4).job(k) for k in range(24)]


def test_as_served_jobs_cycle_the_request_set_without_forcing() -> None:
    jobs = Jobs(parse_scenario(scenario_doc()), items=3)
    assert [(j.item, j.variant) for j in map(jobs.job, range(5))] == [
        (0, None),
        (1, None),
        (2, None),
        (0, None),
        (1, None),
    ]
    assert all(j.seq < 0 for j in jobs.warmup(4))


def test_fixed_arrivals_are_evenly_spaced_and_poisson_ones_average_the_rate() -> None:
    assert list(arrivals("fixed", 4.0, 5, random.Random(1))) == [0.0, 0.25, 0.5, 0.75, 1.0]
    times = list(arrivals("poisson", 100.0, 20_000, random.Random(1)))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= 0 for g in gaps) and sum(gaps) / len(gaps) == pytest.approx(0.01, rel=0.03)
    assert times == list(arrivals("poisson", 100.0, 20_000, random.Random(1)))


def test_prepared_bodies_ask_for_usage_on_streams_and_carry_the_forced_variant() -> None:
    s = parse_scenario(
        scenario_doc(
            requests={"stream": True, "body": {"temperature": 0}},
            compare={"mode": "paired", "variants": ["a", "b"]},
        )
    )
    item = GoldenItem("1", [{"role": "user", "content": "x"}], [{"type": "function"}], None)
    p = prepare(s, [item], "sk-1")
    body = orjson.loads(p.bodies[0])
    assert body == {
        "temperature": 0,
        "model": "crm-assistant",
        "messages": item.messages,
        "tools": item.tools,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    head, _, sent = p.request(0, "b", "lt-1", None).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1" and sent == p.bodies[0]
    assert {
        "x-gateway-variant: b",
        "Authorization: Bearer sk-1",
        f"Content-Length: {len(sent)}",
        "x-request-id: lt-1",
    } <= set(lines)
    assert not any(
        line.startswith("x-gateway-variant") for line in p.request(0, None, "lt-2").decode().split("\r\n")
    )
    assert request_id("lt00", 5) == "lt00-0000005" and request_id("lt00", -2) == "lt00-w000002"


# --- reading answers ------------------------------------------------------------------------------------------


def sample(**kw: Any) -> Sample:
    return Sample(kw.pop("seq", 0), kw.pop("item", 0), kw.pop("requested", None), "r", **kw)


def completion(name: str, arguments: str) -> list[Completion]:
    return [Completion(0, None, (ToolCall("c1", name, arguments),), "tool_calls")]


def test_a_unary_answer_gives_variant_verdict_and_usage() -> None:
    s = sample()
    body = {"choices": [{"message": {"tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}  # fmt: skip
    headers = {
        "x-gateway-variant": "b",
        "x-gateway-tool-calls": "invalid",
        "x-gateway-tool-calls-reason": "schema_violation",
    }
    calls = read_unary(s, 200, headers, orjson.dumps(body))
    assert (s.variant, s.verdict, s.reason, s.input_tokens, s.output_tokens, s.outcome) == (
        "b",
        "invalid",
        "schema_violation",
        7,
        3,
        "ok",
    )
    assert calls[0].tool_calls[0].name == "f"


def test_a_cut_answer_reads_truncated_and_errors_are_classified_like_the_gateways() -> None:
    s = sample()
    read_unary(
        s,
        200,
        {"x-gateway-tool-calls": "none", "x-gateway-tool-calls-reason": "truncated"},
        b'{"choices": []}',
    )
    assert s.verdict == "truncated"
    s = sample()
    read_unary(s, 502, {}, orjson.dumps({"error": {"type": "invalid_tool_call", "code": "malformed_json"}}))
    assert (s.outcome, s.error, s.verdict) == ("error", "malformed_json", "invalid")
    s = sample()
    read_unary(s, 404, {}, orjson.dumps({"error": {"type": "invalid_request_error", "code": "not_found"}}))
    assert (s.outcome, s.error) == ("client_error", "not_found")
    s = sample()
    read_unary(s, 503, {}, b"<html>")
    assert (s.outcome, s.error) == ("error", "http_503")


def chunk(delta: dict[str, Any] | None = None, usage: dict[str, int] | None = None) -> bytes:
    body: dict[str, Any] = {"choices": [{"index": 0, "delta": delta}] if delta is not None else []}
    if usage:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


def test_a_stream_is_folded_into_times_calls_usage_and_the_verdict_comment() -> None:
    s = sample()
    reader = StreamReader(s, 200, {"x-gateway-variant": "a"})
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a": '}}
    wire = (
        chunk({"role": "assistant", "content": ""})
        + chunk({"tool_calls": [call]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})
        + chunk(usage={"prompt_tokens": 5, "completion_tokens": 3})
        + b": x-gateway-tool-calls=valid\n\ndata: [DONE]\n\n"
    )
    for i, t in enumerate((1.0, 2.0, 4.0)):  # split mid-event
        reader.feed(wire[i * len(wire) // 3 : (i + 1) * len(wire) // 3], t)
    calls = reader.finish(0.5)
    assert calls[0].tool_calls[0].arguments == '{"a": 1}'
    assert (s.verdict, s.outcome, s.output_tokens) == ("valid", "ok", 3)
    assert s.ttft_s is not None and s.tpot_s is not None


def test_a_stream_with_an_error_event_or_no_done_is_an_error() -> None:
    s = sample()
    reader = StreamReader(s, 200, {})
    reader.feed(
        chunk({"content": "hi"})
        + b'data: {"error": {"type": "upstream_error", "code": "engine_error"}}\n\ndata: [DONE]\n\n',
        1.0,
    )
    assert reader.finish(0.0) == [] and (s.outcome, s.error) == ("error", "engine_error")
    s = sample()
    reader = StreamReader(s, 200, {})
    reader.feed(chunk({"content": "hi"}), 1.0)
    reader.finish(0.0)
    assert (s.outcome, s.error) == ("error", "stream_truncated")


# --- task success ---------------------------------------------------------------------------------------------

EXPECTED = {"name": "update_crm", "arguments": {"account_id": "ACC-00001", "amount": 1500, "won": True}}


@pytest.mark.parametrize(
    ("arguments", "success", "wrong"),
    [
        ('{"account_id": "ACC-00001", "amount": 1500.0, "won": true}', True, ()),
        ('{"won": true, "amount": 1500, "account_id": "ACC-00001"}', True, ()),
        ('{"account_id": "ACC-00001", "amount": "1500", "won": true}', False, ("amount",)),
        ('{"account_id": "ACC-00001", "amount": 1500, "won": 1}', False, ("won",)),
        ('{"account_id": "ACC-00001", "amount": 1500}', False, ("won",)),
        ('{"account_id": "ACC-00001", "amount": 1500, "won": true, "note": ""}', False, ("+note",)),
        ('{"account_id": "ACC-00001", "amount": 15', False, ("account_id", "amount", "won")),
    ],
)
def test_task_success_compares_every_argument(arguments: str, success: bool, wrong: tuple[str, ...]) -> None:
    s = sample()
    judge(s, completion("update_crm", arguments), EXPECTED)
    assert (s.success, s.wrong) == (success, wrong)


def test_a_wrong_tool_two_calls_or_an_error_fail_the_task() -> None:
    args = orjson.dumps(EXPECTED["arguments"]).decode()
    for completions in (completion("other", args), completion("update_crm", args) * 2, []):
        s = sample()
        judge(s, completions, EXPECTED)
        assert s.success is False
    s = sample(outcome="error")
    judge(s, completion("update_crm", args), EXPECTED)
    assert s.success is False
    s = sample()
    judge(s, [], None)
    assert s.success is None


def test_json_equality_keeps_booleans_apart_from_numbers() -> None:
    assert same(1, 1.0) and same([1, {"a": 2}], [1.0, {"a": 2}])
    assert not same(True, 1) and not same(0, False) and not same("1", 1) and not same([1], [1, 1])


# --- figures and renderings ----------------------------------------------------------------------------------


def loaded_for(tmp_path: Path, mode: str = "paired") -> Loaded:
    compare_table = {"mode": mode, "variants": ["a", "b"]} if mode == "paired" else {}
    s = parse_scenario(
        scenario_doc(
            compare=compare_table, expect={"b": {"invalid_rate": [0, 0.2]}} if mode == "paired" else {}
        )
    )
    golden = tuple(
        GoldenItem(str(i), [{"role": "user", "content": "x"}], None, {"name": "f", "arguments": {"x": i}})
        for i in range(3)
    )
    prices = {"a": Price(1.0, 2.0, "EUR"), "b": Price(0.5, 1.0, "EUR")}
    return Loaded(s, tmp_path / "s.toml", golden, prices)


def paired_samples() -> list[Sample]:
    out = []
    # (requested, served, verdict, success): items 0..2, variants a then b
    plan = [("a", "a", "valid", True), ("b", "b", "invalid", False), ("a", "a", "invalid", False),
            ("b", "b", "valid", True), ("a", "a", "valid", True), ("b", "a", "valid", True)]  # fmt: skip
    for seq, (requested, served, verdict, success) in enumerate(plan):
        out.append(Sample(seq, seq // 2, requested, f"r{seq}", variant=served, status=200, verdict=verdict,
                          success=success, e2e_s=0.01 * (seq + 1), input_tokens=100, output_tokens=10,
                          wrong=() if success else ("x",)))  # fmt: skip
    out.append(
        Sample(6, 0, "b", "r6", status=0, outcome="error", error="timeout", success=False, wrong=("x",))
    )
    return out


def test_figures_per_variant_count_by_the_serving_variant_and_price_by_its_table(tmp_path: Path) -> None:
    run = RunData(paired_samples(), 1000.0, 1001.0, 1.0, 0, 0.1, "lt")
    doc = summarize(run, loaded_for(tmp_path))
    a, b = doc["variants"]
    assert (a["variant"], a["requests"], b["requests"]) == ("a", 4, 3)  # b's third was served by a
    assert doc["overall"]["requests"] == 7 and doc["overall"]["errors"]["count"] == 1
    assert a["verdicts"]["valid"] == 3 and a["invalid"]["count"] == 1 and a["invalid"]["n"] == 4
    assert b["errors"]["count"] == 1 and b["errors_by_code"] == {"error:timeout": 1}
    assert a["cost_total"]["EUR"] == pytest.approx(4 * (100 * 1.0 + 10 * 2.0) / 1e6)
    # the error had no usage: it is not priced, and does not pull the cost per request down
    assert b["cost_per_request"]["EUR"] == pytest.approx((100 * 0.5 + 10 * 1.0) / 1e6)
    assert b["cost_per_1k_requests"]["EUR"] == pytest.approx(1000 * b["cost_per_request"]["EUR"])
    assert a["rerouted"] == 1 and (b["success"]["count"], b["success"]["n"]) == (1, 3)
    assert b["bands"]["invalid_rate"]["inside"] is False  # 1 of 2 checked
    assert a["e2e_ms"]["p50"] == pytest.approx(
        40.0
    )  # 10, 30, 50, 60 ms and len(a["e2e_ms"]["quantiles"]) == 101
    (pair,) = doc["paired"]
    # items 0 and 1 pair cleanly (item 2's b was answered by a: left out); item 0 has a second b, the timeout
    assert pair["pairs"] == 3 and pair["rerouted"] == 1
    assert (pair["success"]["reference_only"], pair["success"]["candidate_only"]) == (1, 1)


def test_renderings_show_every_variant_and_escape_names(tmp_path: Path) -> None:
    samples = paired_samples()
    samples[0].variant = samples[0].requested = "<a>"
    loaded = loaded_for(tmp_path)
    doc = summarize(RunData(samples, 1000.0, 1001.0, 1.0, 0, 0.1, "lt"), loaded)
    page = render(doc)
    assert "&lt;a&gt;" in page and "<a>" not in page and page.count("<svg") >= 4
    text = format_result(doc)
    assert "b vs a" in text and "OUT OF BAND" in text
    changed = compare(doc, orjson.loads(orjson.dumps(doc)))
    assert "error rate" in changed and "+0.0 pts" in changed


def test_compare_flags_rates_whose_intervals_part(tmp_path: Path) -> None:
    loaded = loaded_for(tmp_path, mode="as_served")
    good = [Sample(i, 0, None, f"r{i}", variant="a", status=200, verdict="valid") for i in range(200)]
    bad = [
        Sample(i, 0, None, f"r{i}", variant="a", status=200, verdict="invalid" if i % 2 else "valid")
        for i in range(200)
    ]
    before = summarize(RunData(good, 0.0, 1.0, 1.0, 0, 0.0, "x"), loaded)
    after = summarize(RunData(bad, 0.0, 1.0, 1.0, 0, 0.0, "y"), loaded)
    out = compare(before, after)
    assert "invalid: 95% intervals do not overlap" in out and "+50.0 pts" in out
    assert Counter(line.split()[0] for line in out.splitlines()[4:])["a"] >= 9


def test_axis_ticks_are_round_numbers_covering_the_range() -> None:
    assert nice_ticks(0, 151.2, 4) == [0, 50, 100, 150]
    assert nice_ticks(140, 180) == [140, 150, 160, 170, 180]
    assert nice_ticks(-0.055, 0.055) == pytest.approx([-0.05, 0.0, 0.05])
    assert nice_ticks(3, 3) == [3]
