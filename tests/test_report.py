"""Per-variant summaries: grouping, the figures and the two renderings (the formulas: tests/test_stats.py)."""

from __future__ import annotations

import re

import orjson
import pytest

from gateway.records import Record
from gateway.report import amount, format_table, summarize, to_json
from gateway.stats import wilson

# --- summarize ----------------------------------------------------------------------------------------------


def rec(route: str | None, variant: str | None, **fields: object) -> Record:
    return Record(ts=0.0, request_id="r", route=route, variant=variant, **fields)  # type: ignore[arg-type]


RECORDS = [
    rec("crm", "base", e2e_s=0.1, input_tokens=100, output_tokens=10, cost=0.001, currency="USD",
        tool_verdict="valid"),
    rec("crm", "base", e2e_s=0.3, input_tokens=100, output_tokens=30, cost=0.003, currency="USD",
        tool_verdict="invalid"),
    rec("crm", "base", e2e_s=0.2, outcome="engine_error"),
    rec("crm", "base", e2e_s=0.01, outcome="client_error", status=400),
    rec("crm", "base", outcome="client_disconnected"),
    rec("crm", "ft", stream=True, e2e_s=1.0, ttft_s=0.05, input_tokens=50, output_tokens=5, cost=2.0,
        currency="EUR", tool_verdict="truncated"),
    rec("crm", "ft", stream=False, e2e_s=0.5, ttft_s=0.9, tool_verdict="none", outcome="invalid_tool_call"),
    rec("search", "base", e2e_s=0.4, outcome="engine_timeout"),
    rec(None, None, outcome="client_error", status=404),
]  # fmt: skip


def test_summarize_groups_by_route_and_variant_in_order() -> None:
    keys = [(s.route, s.variant) for s in summarize(RECORDS)]
    assert keys == [(None, None), ("crm", "base"), ("crm", "ft"), ("search", "base")]


def test_summarize_leaves_shadow_copies_out() -> None:
    copies = [
        rec("crm", "ft", shadow=True, primary_id="r", tool_verdict="invalid", cost=1.0, currency="USD"),
        rec("crm", "base", shadow=True, primary_id="r", outcome="shadow_dropped", error_code="budget"),
        rec("crm", "shadow-only", shadow=True, primary_id="r", e2e_s=0.1),
    ]
    assert summarize(RECORDS + copies) == summarize(RECORDS)


def test_summarize_counts_errors_apart_from_client_outcomes() -> None:
    base = {(s.route, s.variant): s for s in summarize(RECORDS)}["crm", "base"]
    assert base.requests == 5
    assert base.errors == 1
    assert base.error_rate == pytest.approx(0.2)
    assert base.client_errors == 1
    assert base.client_disconnects == 1


def test_summarize_invalid_rate_counts_only_checked_requests() -> None:
    by_key = {(s.route, s.variant): s for s in summarize(RECORDS)}
    base, ft = by_key["crm", "base"], by_key["crm", "ft"]
    assert (base.tool_checked, base.invalid, base.invalid_rate) == (2, 1, 0.5)
    assert base.invalid_ci == pytest.approx(wilson(1, 2))
    assert (ft.tool_checked, ft.invalid_rate, ft.truncated) == (0, None, 1)
    assert ft.invalid_ci == (0.0, 1.0)
    assert ft.errors == 1  # invalid_tool_call (enforced) is an error outcome


def test_summarize_latency_tokens_and_cost() -> None:
    by_key = {(s.route, s.variant): s for s in summarize(RECORDS)}
    base, ft = by_key["crm", "base"], by_key["crm", "ft"]
    assert base.e2e_p50 == pytest.approx(0.15)  # of 0.01, 0.1, 0.2, 0.3
    assert base.ttft_p50 is None
    assert ft.ttft_p50 == 0.05  # the non-stream record's ttft is ignored
    assert (base.input_tokens, base.output_tokens) == (200, 40)
    assert base.cost_total == pytest.approx({"USD": 0.004})
    assert base.cost_per_request == pytest.approx({"USD": 0.002})  # over the two priced requests
    assert ft.cost_total == {"EUR": 2.0}


def test_summarize_nothing() -> None:
    assert summarize([]) == []


# --- rendering ----------------------------------------------------------------------------------------------


def test_format_table_has_a_header_and_one_aligned_row_per_variant() -> None:
    table = format_table(summarize(RECORDS))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["route", "variant", "requests"]
    assert set(lines[1]) <= {"-", " "}
    rows = lines[2:6]
    assert "1/2 50.0% [9.5%, 90.5%]" in table
    assert rows[0].split()[:2] == ["(none)", "(none)"]  # the record without a route
    assert len({len(line) for line in lines[:6]}) == 1  # fixed width: the last column is right-aligned


def columns(table: str, route: str, variant: str) -> dict[str, str]:
    """The table's row for (route, variant) as {header: cell} (cells are separated by two spaces or more)."""
    lines = table.splitlines()
    header = re.split(r" {2,}", lines[0])
    rows = (re.split(r" {2,}", line) for line in lines[2:])
    return dict(zip(header, next(r for r in rows if r[:2] == [route, variant]), strict=True))


def test_requests_cut_at_a_shutdowns_drain_deadline_are_counted_apart_from_errors() -> None:
    records = [rec("crm", "base", outcome="server_shutdown", status=503), rec("crm", "base", e2e_s=0.1)]
    (base,) = summarize(records)
    assert (base.requests, base.errors, base.shutdown_cuts, base.client_disconnects) == (2, 0, 1, 0)
    assert columns(format_table([base]), "crm", "base")["shutdown cuts"] == "1"


def test_format_table_shows_client_errors_and_disconnects_apart() -> None:
    base = columns(format_table(summarize(RECORDS)), "crm", "base")  # one client_error, one disconnect
    assert (base["errors"], base["client 4xx"], base["disconnects"]) == ("1 (20.0%)", "1", "1")


def test_format_table_prints_costs_without_exponents_per_1k_requests() -> None:
    tiny = [rec("crm", "base", e2e_s=0.1, cost=4.91143e-05, currency="EUR") for _ in range(3)]
    row = columns(format_table(summarize(tiny)), "crm", "base")
    assert (row["cost/1k req"], row["cost total"]) == ("0.0491 EUR", "0.000147 EUR")  # was 4.91143e-05 EUR
    assert orjson.loads(to_json(summarize(tiny)))[0]["cost_per_request"]["EUR"] == pytest.approx(4.91143e-05)


@pytest.mark.parametrize(
    ("value", "text"),
    [(4.91143e-05, "0.0000491"), (0.0491143, "0.0491"), (0.138, "0.138"), (2.0, "2.00"), (1234.5, "1234.50"),
     (0.0, "0.00")],
)  # fmt: skip
def test_amount_is_fixed_point_with_three_significant_digits(value: float, text: str) -> None:
    assert amount(value) == text


def test_format_table_explains_its_placeholders_under_the_table() -> None:
    lines = format_table(summarize(RECORDS)).splitlines()
    legend = lines[6:]
    assert any(line.startswith("(none): answered before a route") for line in legend)
    assert any(line.startswith("n/a: no samples") for line in legend)
    only_streams = [rec("crm", "ft", stream=True, e2e_s=1.0, ttft_s=0.05, tool_verdict="valid", cost=0.01,
                        currency="EUR")]  # fmt: skip
    assert len(format_table(summarize(only_streams)).splitlines()) == 3  # nothing to explain


def test_to_json_round_trips_every_field() -> None:
    summaries = summarize(RECORDS)
    data = orjson.loads(to_json(summaries))
    assert [(d["route"], d["variant"]) for d in data] == [(s.route, s.variant) for s in summaries]
    base = data[1]
    assert base["invalid_ci"] == pytest.approx(list(wilson(1, 2)))
    assert base["cost_total"] == pytest.approx({"USD": 0.004})
    assert set(base) >= {
        "requests",
        "errors",
        "error_rate",
        "invalid_rate",
        "e2e_p95",
        "ttft_p95",
        "truncated",
    }


def test_a_fallback_counts_against_the_variant_chosen_first() -> None:
    served = Record(
        ts=1.0,
        request_id="a",
        route="r",
        variant="base",
        fallback_from="canary",
        fallback_reason="engine_timeout",
    )
    (base, canary) = summarize([served, Record(ts=2.0, request_id="b", route="r", variant="canary")])
    assert (base.variant, base.requests, base.fallbacks) == ("base", 1, 0)
    assert (canary.variant, canary.requests, canary.fallbacks) == ("canary", 1, 1)
    assert "fallback" in format_table([base, canary])
