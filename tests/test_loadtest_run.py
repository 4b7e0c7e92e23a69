"""`gateway loadtest` end to end: real gateways (uvicorn on loopback) in front of a real simulated engine, the
shipped scenarios in short versions, and the runner's figures checked against the gateway's own request log
through `gateway report` for the same window."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.cli.main import main
from tests.adapter_factory import make_adapter
from tests.conftest import FORCER_TOKEN, ROOT, GatewayFactory, RunningGateway, running_sim_engine

SCENARIOS = ROOT / "loadtests" / "scenarios"


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    """A simulated engine of this module's own (tests/data/loadtest_engine.toml)."""
    with running_sim_engine(ROOT / "tests" / "data" / "loadtest_engine.toml") as url:
        yield url


@pytest.fixture(autouse=True)
def loadtest_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LOADTEST_KEY", FORCER_TOKEN)  # a key that may force variants


def run_loadtest(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["loadtest", *args, "--quiet"])
    return code, capsys.readouterr().out


def gateway_report(
    gw: RunningGateway, doc: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    """`gateway report --json` over the run's window, by variant."""
    gw.records()  # everything answered is in the log
    window = doc["window"]
    capsys.readouterr()
    where = ["--route", doc["scenario"]["route"], "--since", window["started"], "--until", window["ended"]]
    code = main(["report", "--json", "--db", str(gw.settings.records_db), *where])
    assert code == 0
    return {row["variant"]: row for row in json.loads(capsys.readouterr().out)}


def assert_agrees(doc: dict[str, Any], report: dict[str, Any]) -> None:
    assert set(report) == {v["variant"] for v in doc["variants"]}
    for v in doc["variants"]:
        r = report[v["variant"]]
        assert (v["requests"], v["errors"]["count"], v["client_errors"]) == (
            r["requests"],
            r["errors"],
            r["client_errors"],
        )
        assert (v["invalid"]["count"], v["invalid"]["n"]) == (r["invalid"], r["tool_checked"])
        assert v["verdicts"]["truncated"] == r["truncated"]
        assert (v["input_tokens"], v["output_tokens"]) == (r["input_tokens"], r["output_tokens"])
        assert v["cost_total"].keys() == r["cost_total"].keys()
        for currency, total in v["cost_total"].items():
            assert total == pytest.approx(r["cost_total"][currency], rel=1e-9)
            assert v["cost_per_request"][currency] == pytest.approx(r["cost_per_request"][currency], rel=1e-9)


def read_outputs(out: Path) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    doc = orjson.loads((out / "result.json").read_bytes())
    page = (out / "report.html").read_text()
    rows = [orjson.loads(line) for line in (out / "requests.jsonl").read_bytes().splitlines()]
    return doc, page, rows


def assert_self_contained(page: str, variants: list[str]) -> None:
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<svg" in page and "<script" not in page and "<link" not in page
    assert "src=" not in page and "url(" not in page  # nothing fetched: readable offline
    for name in variants:
        assert name in page


# --- crm-compare: paired, through every formatter version ------------------------------------------------------


@pytest.fixture
def compare_gateway(make_gateway: GatewayFactory, engine_url: str, tmp_path: Path) -> RunningGateway:
    adapters = tmp_path / "adapters"
    for version in ("1", "2", "3"):
        make_adapter(adapters, version=version, seed=int(version))
    policy = (SCENARIOS / "policies" / "crm-assistant.toml").read_text()
    policy = policy.replace('"policies/kb/crm"', json.dumps(str(ROOT / "policies" / "kb" / "crm")))
    return make_gateway(
        {"crm-assistant.toml": policy}, engines={"default": engine_url}, adapters_dir=adapters
    )


def test_crm_compare_short_run_agrees_with_the_gateway_report(
    compare_gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, printed = run_loadtest(
        capsys,
        str(SCENARIOS / "crm-compare.toml"),
        "--url",
        compare_gateway.url,
        "--requests",
        "120",
        "--out",
        str(out),
    )
    assert code == 0
    doc, page, rows = read_outputs(out)
    names = ["baseline", "formatter-1", "formatter-2", "formatter-3"]
    assert [v["variant"] for v in doc["variants"]] == names
    assert [v["requests"] for v in doc["variants"]] == [
        30,
        30,
        30,
        30,
    ]  # each golden item through each variant
    assert len(rows) == 120 and {r["requested"] for r in rows} == set(names)
    assert all(r["variant"] == r["requested"] for r in rows)  # forced by header, served as asked
    assert [(p["reference"], p["candidate"], p["pairs"]) for p in doc["paired"]] == [
        ("baseline", n, 30) for n in names[1:]
    ]
    for p in doc["paired"]:
        assert p["invalid"]["n"] + p["success"]["n"] > 0 and p["invalid"]["test"] in (
            "exact",
            "chi2-cc",
            "none",
        )
    assert {v["variant"]: set(v["bands"]) for v in doc["variants"]} == {n: {"invalid_rate"} for n in names}
    assert_agrees(doc, gateway_report(compare_gateway, doc, capsys))
    assert_self_contained(page, names)
    assert "formatter-3 vs baseline" in printed and "bands:" in printed


def test_a_variant_the_route_lacks_stops_the_run_with_the_gateways_answer(
    make_gateway: GatewayFactory, engine_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = make_gateway(engines={"default": engine_url})  # crm-assistant with baseline and formatter only
    code = main(
        ["loadtest", str(SCENARIOS / "crm-compare.toml"), "--url", gw.url, "--requests", "8", "--quiet"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "variant 'formatter-1'" in err and "404" in err
    assert not gw.records()[4:]  # stopped at the preflight: nothing measured


# --- overhead: as served, open loop, streaming ------------------------------------------------------------------


def test_overhead_short_run_agrees_with_the_gateway_report(
    make_gateway: GatewayFactory, engine_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = (ROOT / "loadtests" / "bench" / "policies" / "bench.toml").read_text()
    gw = make_gateway({"bench.toml": policy}, engines={"default": engine_url})
    out = tmp_path / "out"
    args = ("--url", gw.url, "--requests", "150", "--rate", "300", "--warmup", "10", "--out", str(out))
    code, printed = run_loadtest(capsys, str(SCENARIOS / "overhead.toml"), *args)
    assert code == 0 and "overhead: as_served on route bench" in printed
    doc, page, rows = read_outputs(out)
    assert doc["load"]["requests"] == 150 == len(rows) and doc["scenario"]["arrival"] == "poisson"
    assert doc["load"]["late"] == sum(1 for r in rows if r["late_s"] > 0.010)
    assert sum(v["requests"] for v in doc["variants"]) == 150
    for v in doc["variants"]:
        assert v["ttft_ms"]["n"] == v["requests"] and v["e2e_ms"]["n"] == v["requests"]
        assert len(v["e2e_ms"]["quantiles"]) == 101 and v["ttft_ms"]["p50"] <= v["e2e_ms"]["p99"]
        assert v["cost_per_1k_requests"]["EUR"] == pytest.approx(1000 * v["cost_per_request"]["EUR"])
    assert_agrees(doc, gateway_report(gw, doc, capsys))
    assert_self_contained(page, [v["variant"] for v in doc["variants"]])
    code, changes = run_loadtest(capsys, "compare", str(out / "result.json"), str(out / "result.json"))
    assert code == 0 and "(all)" in changes and "+0.0 pts" in changes
    assert main(["loadtest", "compare", str(out / "result.json"), str(out / "requests.jsonl")]) == 1


# --- task success, streamed tool calls ---------------------------------------------------------------------------


def one_way_tool(n: int) -> dict[str, Any]:
    """A tool that admits exactly one valid call (every argument is a one-value enum)."""
    properties = {
        "account_id": {"type": "string", "enum": [f"ACC-{n:05d}"]},
        "amount": {"type": "number", "enum": [100 * n]},
        "stage": {"type": "string", "enum": ["won"]},
    }
    parameters = {"type": "object", "properties": properties, "required": sorted(properties)}
    return {"type": "function", "function": {"name": "update_crm", "parameters": parameters}}


def one_way_golden(path: Path, rows: int) -> Path:
    """Golden rows whose one valid call is the expected one: the simulated engine answers it unless it spoils
    the answer, so a task succeeds exactly when the call is valid."""
    lines = []
    for n in range(rows):
        expected = {"account_id": f"ACC-{n:05d}", "amount": 100 * n, "stage": "won"}
        row = {
            "id": f"g{n}",
            "messages": [{"role": "user", "content": f"deal {n}"}],
            "tools": [one_way_tool(n)],
            "expected": {"name": "update_crm", "arguments": expected},
        }
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_task_success_is_judged_argument_by_argument_on_streamed_calls(
    make_gateway: GatewayFactory, engine_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapters = tmp_path / "adapters"
    for version in ("1", "2", "3"):
        make_adapter(adapters, version=version, seed=int(version))
    policy = (SCENARIOS / "policies" / "crm-assistant.toml").read_text()
    policy = policy.replace('"policies/kb/crm"', json.dumps(str(ROOT / "policies" / "kb" / "crm")))
    gw = make_gateway({"crm-assistant.toml": policy}, engines={"default": engine_url}, adapters_dir=adapters)
    golden = one_way_golden(tmp_path / "golden.jsonl", 40)
    scenario = tmp_path / "success.toml"
    scenario.write_text(
        f'name = "success"\n[target]\nurl = "{gw.url}"\nroute = "crm-assistant"\n'
        f'[requests]\ngolden = "{golden.name}"\nstream = true\n'
        '[load]\narrival = "concurrent"\nconcurrency = 4\n'
        '[compare]\nmode = "paired"\nvariants = ["baseline", "formatter-3"]\n'
    )
    out = tmp_path / "out"
    code, _ = run_loadtest(capsys, str(scenario), "--out", str(out))
    assert code == 0
    doc, _, rows = read_outputs(out)
    assert len(rows) == 80
    for r in rows:
        assert r["success"] == (r["verdict"] == "valid"), r
        assert r["ttft_s"] is not None and r["ttft_s"] <= r["e2e_s"]
    by_variant = {v["variant"]: v for v in doc["variants"]}
    assert by_variant["formatter-3"]["invalid"]["count"] > 0  # the spoiled version does spoil some answers
    for v in by_variant.values():
        assert v["success"]["count"] == v["verdicts"]["valid"] and v["success"]["n"] == 40
    (pair,) = doc["paired"]
    s = pair["success"]
    assert s["n"] == 40 and s["both"] + s["reference_only"] + s["candidate_only"] + s["neither"] == 40
    assert s["difference"] == pytest.approx((s["candidate_only"] - s["reference_only"]) / 40)
    low, high = s["difference_ci"]
    assert low <= s["difference"] <= high


# --- open loop: a target slower than the asked rate --------------------------------------------------------------


def test_open_loop_sends_every_request_and_counts_late_starts(
    engine_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Straight at the engine, whose `slow40` answers take at least 40 ms, with one request in flight at most
    and one due every 10 ms: every start after the first waits for the one before, so it is late by
    construction (the wait is a lower bound, not a guess about the machine's speed); none is dropped."""
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    scenario = tmp_path / "slow.toml"
    scenario.write_text(
        f'name = "slow"\n[target]\nurl = "{engine_url}"\nroute = "slow40"\n[requests]\ngolden = "{golden.name}"\n'
        '[load]\narrival = "fixed"\nrate = 100\nrequests = 8\nmax_inflight = 1\nlate_after_ms = 10\n'
    )
    code, printed = run_loadtest(capsys, str(scenario), "--out", str(tmp_path / "out"))
    assert code == 0
    doc, _, rows = read_outputs(tmp_path / "out")
    assert [r["seq"] for r in rows] == list(range(8))
    assert all(r["outcome"] == "ok" for r in rows)
    assert all(r["late_s"] >= 0.03 for r in rows[1:])  # the first may be late too on a busy machine
    assert doc["load"]["late"] == sum(1 for r in rows if r["late_s"] > 0.010) >= 7
    assert doc["variants"][0]["variant"] == "-" and doc["variants"][0]["verdicts"]["unknown"] == 8
    assert f"{doc['load']['late']} started late" in printed


def test_without_out_a_run_goes_where_the_console_looks(
    engine_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    scenario = tmp_path / "here.toml"
    scenario.write_text(
        f'name = "here"\n[target]\nurl = "{engine_url}"\nroute = "crm-base"\n[requests]\ngolden = "{golden.name}"\n'
        '[load]\narrival = "concurrent"\nconcurrency = 1\nrequests = 2\n'
    )
    runs = tmp_path / "runs"
    monkeypatch.setenv("GATEWAY_LOADTEST_DIR", str(runs))
    code, _ = run_loadtest(capsys, str(scenario))
    assert code == 0
    (run,) = runs.iterdir()
    assert run.name.startswith("here-") and (run / "report.html").is_file()
