"""Telemetry: the instruments a reader sees, and the Prometheus text rendered without prometheus_client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.records import Record
from gateway.telemetry import LATENCY_BUCKETS_S, TOKEN_BUCKETS, Telemetry, metric_name

STREAM = Record(
    ts=0.0, request_id="r1", route="crm", variant="ft", engine_model="crm-ft", stream=True, status=200,
    e2e_s=1.5, ttft_s=0.2, tpot_s=0.03, engine_first_byte_s=0.1, input_tokens=120, output_tokens=40,
    cost=0.0012, currency="USD", tool_verdict="invalid", tool_reason="schema",
)  # fmt: skip
FAILED = Record(
    ts=0.0, request_id="r2", route="crm", variant="base", engine_model="base-model", status=502,
    outcome="engine_error", e2e_s=0.05,
)  # fmt: skip


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def telemetry(reader: InMemoryMetricReader) -> Iterator[Telemetry]:
    t = Telemetry(readers=[reader])
    yield t
    t.shutdown()


def metrics(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    if data is None:  # nothing measured yet
        return {}
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def points(metric: Metric) -> list[Any]:
    assert isinstance(metric.data, Histogram | Sum)
    return list(metric.data.data_points)


def by_attrs(metric: Metric) -> dict[frozenset[tuple[str, Any]], Any]:
    return {frozenset((p.attributes or {}).items()): p for p in points(metric)}


def test_duration_histogram_has_genai_and_config_attributes(
    telemetry: Telemetry, reader: InMemoryMetricReader
) -> None:
    telemetry.observe(STREAM)
    telemetry.observe(FAILED)
    duration = metrics(reader)["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    found = {p.attributes["variant"]: p for p in points(duration)}
    ok: HistogramDataPoint = found["ft"]
    assert dict(ok.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "crm",
        "route": "crm",
        "variant": "ft",
        "model": "crm-ft",
        "outcome": "ok",
    }
    assert (ok.count, ok.sum) == (1, 1.5)
    assert tuple(ok.explicit_bounds) == LATENCY_BUCKETS_S
    assert found["base"].attributes["error.type"] == "engine_error"


def test_token_usage_is_split_by_token_type(telemetry: Telemetry, reader: InMemoryMetricReader) -> None:
    telemetry.observe(STREAM)
    usage = metrics(reader)["gen_ai.client.token.usage"]
    sums = {p.attributes["gen_ai.token.type"]: p.sum for p in points(usage)}
    assert sums == {"input": 120, "output": 40}
    assert tuple(points(usage)[0].explicit_bounds) == TOKEN_BUCKETS


def test_stream_timings_are_recorded_only_when_present(
    telemetry: Telemetry, reader: InMemoryMetricReader
) -> None:
    telemetry.observe(FAILED)  # no ttft, tpot, first byte or tokens
    seen = metrics(reader)
    assert points(seen["gen_ai.client.operation.duration"])
    for name in ("gen_ai.client.operation.time_to_first_chunk", "gateway.time_per_output_token"):
        assert name not in seen or points(seen[name]) == []
    telemetry.observe(STREAM)
    seen = metrics(reader)
    ttft = points(seen["gen_ai.client.operation.time_to_first_chunk"])
    assert [(p.count, p.sum) for p in ttft] == [(1, 0.2)]
    tpot = points(seen["gateway.time_per_output_token"])
    assert dict(tpot[0].attributes) == {"route": "crm", "variant": "ft", "model": "crm-ft"}
    assert [p.sum for p in points(seen["gateway.engine.time_to_first_byte"])] == [0.1]


def test_counters_count_requests_invalid_calls_and_cost(
    telemetry: Telemetry, reader: InMemoryMetricReader
) -> None:
    for _ in range(3):
        telemetry.observe(STREAM)
    telemetry.observe(FAILED)
    seen = metrics(reader)
    requests = seen["gateway.requests"]
    assert isinstance(requests.data, Sum) and requests.data.is_monotonic
    counts = {(p.attributes["variant"], p.attributes["outcome"], p.attributes["verdict"]): p.value
              for p in points(requests)}  # fmt: skip
    assert counts == {("ft", "ok", "invalid"): 3, ("base", "engine_error", "none"): 1}
    invalid: list[NumberDataPoint] = points(seen["gateway.tool_calls.invalid"])
    assert [(dict(p.attributes or {}), p.value) for p in invalid] == [
        ({"route": "crm", "variant": "ft", "reason": "schema"}, 3)
    ]
    cost: list[NumberDataPoint] = points(seen["gateway.cost"])
    assert [dict(p.attributes or {}) for p in cost] == [{"route": "crm", "variant": "ft", "currency": "USD"}]
    assert cost[0].value == pytest.approx(3 * 0.0012)


def test_counters_are_cumulative_across_collections(
    telemetry: Telemetry, reader: InMemoryMetricReader
) -> None:
    telemetry.observe(FAILED)
    metrics(reader)
    telemetry.observe(FAILED)
    assert [p.value for p in points(metrics(reader)["gateway.requests"])] == [2]


def test_missing_config_fields_become_none_labels(telemetry: Telemetry, reader: InMemoryMetricReader) -> None:
    telemetry.observe(Record(ts=0.0, request_id="r", status=404, outcome="client_error", e2e_s=0.001))
    (point,) = points(metrics(reader)["gateway.requests"])
    assert point.attributes == {
        "route": "none", "variant": "none", "model": "none", "outcome": "client_error", "verdict": "none"
    }  # fmt: skip


def test_each_telemetry_has_its_own_provider() -> None:
    first_reader, second_reader = InMemoryMetricReader(), InMemoryMetricReader()
    first, second = Telemetry(readers=[first_reader]), Telemetry(readers=[second_reader])
    first.observe(STREAM)
    assert points(metrics(first_reader)["gateway.requests"])
    assert metrics(second_reader) == {}
    first.shutdown()
    second.shutdown()


def test_shutdown_is_idempotent() -> None:
    telemetry = Telemetry()
    telemetry.shutdown()
    telemetry.shutdown()
    assert telemetry.prometheus_text() == b""


# --- Prometheus text ----------------------------------------------------------------------------------------


def families(telemetry: Telemetry) -> dict[str, Any]:
    text = telemetry.prometheus_text().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_prometheus_text_parses_with_names_units_and_types(telemetry: Telemetry) -> None:
    telemetry.observe(STREAM)
    telemetry.observe(FAILED)
    found = families(telemetry)
    assert found["gen_ai_client_operation_duration_seconds"].type == "histogram"
    assert found["gen_ai_client_token_usage"].type == "histogram"
    assert found["gen_ai_client_operation_time_to_first_chunk_seconds"].type == "histogram"
    assert found["gateway_time_per_output_token_seconds"].type == "histogram"
    assert found["gateway_engine_time_to_first_byte_seconds"].type == "histogram"
    for counter in ("gateway_requests", "gateway_tool_calls_invalid", "gateway_cost"):
        assert found[counter].type == "counter"
        assert {s.name for s in found[counter].samples} == {counter + "_total"}


def test_prometheus_histogram_buckets_are_cumulative(telemetry: Telemetry) -> None:
    for e2e in (0.003, 0.3, 0.3, 200.0):
        telemetry.observe(
            Record(ts=0.0, request_id="r", route="crm", variant="ft", engine_model="m", e2e_s=e2e)
        )
    samples = families(telemetry)["gen_ai_client_operation_duration_seconds"].samples
    buckets = {s.labels["le"]: s.value for s in samples if s.name.endswith("_bucket")}
    assert buckets["0.005"] == 1
    assert buckets["0.25"] == 1
    assert buckets["0.5"] == 3
    assert buckets["120.0"] == 3
    assert buckets["+Inf"] == 4
    assert list(buckets.values()) == sorted(buckets.values())
    values = {s.name: s.value for s in samples if not s.name.endswith("_bucket")}
    assert values["gen_ai_client_operation_duration_seconds_count"] == 4
    assert values["gen_ai_client_operation_duration_seconds_sum"] == pytest.approx(200.603)
    labels = next(s.labels for s in samples if s.name.endswith("_count"))
    assert labels["gen_ai_operation_name"] == "chat"
    assert labels["gen_ai_request_model"] == "crm"


def test_prometheus_label_values_are_escaped(telemetry: Telemetry) -> None:
    awkward = 'we"ird\\route\nname'
    telemetry.observe(Record(ts=0.0, request_id="r", route=awkward, variant="v", e2e_s=0.1))
    requests = families(telemetry)["gateway_requests"]
    assert [s.labels["route"] for s in requests.samples] == [awkward]


def test_prometheus_text_is_empty_before_any_request() -> None:
    telemetry = Telemetry()
    text = telemetry.prometheus_text().decode()
    assert [s for f in text_string_to_metric_families(text) for s in f.samples] == []
    telemetry.shutdown()


@pytest.mark.parametrize(
    ("name", "unit", "counter", "expected"),
    [
        ("gen_ai.client.operation.duration", "s", False, "gen_ai_client_operation_duration_seconds"),
        ("gen_ai.client.token.usage", "{token}", False, "gen_ai_client_token_usage"),
        ("gateway.requests", "{request}", True, "gateway_requests_total"),
        ("gateway.cost", "{currency}", True, "gateway_cost_total"),
        ("already_seconds", "s", False, "already_seconds"),
        ("gateway.ratio", "1", False, "gateway_ratio"),
        ("x-y", "By", False, "x_y_bytes"),
    ],
)
def test_metric_name_translation(name: str, unit: str, counter: bool, expected: str) -> None:
    assert metric_name(name, unit, counter=counter) == expected


def test_otlp_endpoint_adds_an_exporter_and_survives_an_unreachable_collector() -> None:
    # Shutting down sends one last batch, which fails (logged, not raised) against a closed port.
    telemetry = Telemetry(
        otlp_endpoint="http://127.0.0.1:9/v1/metrics", export_interval_s=3600, export_timeout_s=0.2
    )
    telemetry.observe(STREAM)
    assert b"gateway_requests_total" in telemetry.prometheus_text()
    telemetry.shutdown()
