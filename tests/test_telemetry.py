"""Telemetry: what collect() and OTLP export see, and the Prometheus text rendered without prometheus_client."""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
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
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.shutdown()


def names(data: MetricsData) -> dict[str, Metric]:
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def metrics(telemetry: Telemetry) -> dict[str, Metric]:
    return names(telemetry.collect())


def points(metric: Metric) -> list[Any]:
    assert isinstance(metric.data, Histogram | Sum)
    return list(metric.data.data_points)


def by_attrs(metric: Metric) -> dict[frozenset[tuple[str, Any]], Any]:
    return {frozenset((p.attributes or {}).items()): p for p in points(metric)}


def test_duration_histogram_has_genai_and_config_attributes(telemetry: Telemetry) -> None:
    telemetry.observe(STREAM)
    telemetry.observe(FAILED)
    duration = metrics(telemetry)["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    found = {p.attributes["variant"]: p for p in points(duration)}
    ok: HistogramDataPoint = found["ft"]
    assert dict(ok.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "crm",
        "route": "crm",
        "variant": "ft",
        "model": "crm-ft",
        "shadow": "false",
        "outcome": "ok",
    }
    assert (ok.count, ok.sum) == (1, 1.5)
    assert tuple(ok.explicit_bounds) == LATENCY_BUCKETS_S
    assert found["base"].attributes["error.type"] == "engine_error"


def test_token_usage_is_split_by_token_type(telemetry: Telemetry) -> None:
    telemetry.observe(STREAM)
    usage = metrics(telemetry)["gen_ai.client.token.usage"]
    sums = {p.attributes["gen_ai.token.type"]: p.sum for p in points(usage)}
    assert sums == {"input": 120, "output": 40}
    assert tuple(points(usage)[0].explicit_bounds) == TOKEN_BUCKETS


def test_stream_timings_are_recorded_only_when_present(telemetry: Telemetry) -> None:
    telemetry.observe(FAILED)  # no ttft, tpot, first byte or tokens
    seen = metrics(telemetry)
    assert points(seen["gen_ai.client.operation.duration"])
    for name in ("gen_ai.client.operation.time_to_first_chunk", "gateway.time_per_output_token"):
        assert name not in seen or points(seen[name]) == []
    telemetry.observe(STREAM)
    seen = metrics(telemetry)
    ttft = points(seen["gen_ai.client.operation.time_to_first_chunk"])
    assert [(p.count, p.sum) for p in ttft] == [(1, 0.2)]
    tpot = points(seen["gateway.time_per_output_token"])
    assert dict(tpot[0].attributes) == {"route": "crm", "variant": "ft", "model": "crm-ft", "shadow": "false"}
    assert [p.sum for p in points(seen["gateway.engine.time_to_first_byte"])] == [0.1]


def test_counters_count_requests_invalid_calls_and_cost(telemetry: Telemetry) -> None:
    for _ in range(3):
        telemetry.observe(STREAM)
    telemetry.observe(FAILED)
    seen = metrics(telemetry)
    requests = seen["gateway.requests"]
    assert isinstance(requests.data, Sum) and requests.data.is_monotonic
    counts = {(p.attributes["variant"], p.attributes["outcome"], p.attributes["verdict"]): p.value
              for p in points(requests)}  # fmt: skip
    assert counts == {("ft", "ok", "invalid"): 3, ("base", "engine_error", "none"): 1}
    invalid: list[NumberDataPoint] = points(seen["gateway.tool_calls.invalid"])
    assert [(dict(p.attributes or {}), p.value) for p in invalid] == [
        ({"route": "crm", "variant": "ft", "reason": "schema", "shadow": "false"}, 3)
    ]
    cost: list[NumberDataPoint] = points(seen["gateway.cost"])
    assert [dict(p.attributes or {}) for p in cost] == [
        {"route": "crm", "variant": "ft", "currency": "USD", "shadow": "false"}
    ]
    assert cost[0].value == pytest.approx(3 * 0.0012)


def test_a_shadow_copy_has_series_of_its_own_and_drops_are_counted_by_reason(telemetry: Telemetry) -> None:
    telemetry.observe(STREAM)
    telemetry.observe(dataclasses.replace(STREAM, request_id="s-shadow", shadow=True, primary_id="s"))
    telemetry.shadow_dropped("crm", "ft", "in_flight_limit")
    telemetry.shadow_dropped("crm", "ft", "in_flight_limit")
    telemetry.shadow_dropped("crm", "ft", "killed")
    seen = metrics(telemetry)
    requests = {p.attributes["shadow"]: p.value for p in points(seen["gateway.requests"])}
    assert requests == {"false": 1, "true": 1}  # served totals (shadow="false") leave the copy out
    cost = {p.attributes["shadow"]: p.value for p in points(seen["gateway.cost"])}
    assert cost == {"false": pytest.approx(0.0012), "true": pytest.approx(0.0012)}
    durations = {p.attributes["shadow"]: p.count for p in points(seen["gen_ai.client.operation.duration"])}
    assert durations == {"false": 1, "true": 1}
    dropped = {p.attributes["reason"]: p.value for p in points(seen["gateway.shadow.dropped"])}
    assert dropped == {"in_flight_limit": 2, "killed": 1}
    assert b"gateway_shadow_dropped_total" in telemetry.prometheus_text()


def test_counters_are_cumulative_across_collections(telemetry: Telemetry) -> None:
    telemetry.observe(FAILED)
    metrics(telemetry)
    telemetry.observe(FAILED)
    assert [p.value for p in points(metrics(telemetry)["gateway.requests"])] == [2]


def test_missing_config_fields_become_none_labels(telemetry: Telemetry) -> None:
    telemetry.observe(Record(ts=0.0, request_id="r", status=404, outcome="client_error", e2e_s=0.001))
    (point,) = points(metrics(telemetry)["gateway.requests"])
    assert point.attributes == {
        "route": "none", "variant": "none", "model": "none", "outcome": "client_error", "verdict": "none",
        "shadow": "false",
    }  # fmt: skip


def test_each_telemetry_has_its_own_state() -> None:
    first, second = Telemetry(), Telemetry()
    first.observe(STREAM)
    assert points(metrics(first)["gateway.requests"])
    assert metrics(second) == {}
    assert second.collect().resource_metrics == []
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


# --- collect(), OTLP export, concurrency --------------------------------------------------------------------


class FakeExporter:
    """Stands in for OTLPMetricExporter: keeps what it was given."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[MetricsData] = []
        self.shut_down = 0
        self.fail = fail

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000) -> None:
        self.batches.append(metrics_data)
        if self.fail:
            raise ConnectionError("collector unreachable")

    def shutdown(self, timeout_millis: float = 30_000) -> None:
        self.shut_down += 1


def test_collect_is_cumulative_from_creation_with_resource_and_scope() -> None:
    before = time.time_ns()
    telemetry = Telemetry(service_name="gw-test")
    telemetry.observe(STREAM)
    telemetry.observe(
        Record(ts=0.0, request_id="r", route="crm", variant="ft", engine_model="crm-ft", e2e_s=0.4)
    )
    data = telemetry.collect()
    (resource_metrics,) = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "gw-test"
    (scope_metrics,) = resource_metrics.scope_metrics
    assert scope_metrics.scope.name == "gateway"
    duration = names(data)["gen_ai.client.operation.duration"]
    assert isinstance(duration.data, Histogram)
    assert duration.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    (point,) = duration.data.data_points
    assert (point.count, point.min, point.max) == (2, 0.4, 1.5)
    assert point.bucket_counts[LATENCY_BUCKETS_S.index(0.5)] == 1  # 0.4 is in (0.25, 0.5]
    assert point.bucket_counts[LATENCY_BUCKETS_S.index(2.5)] == 1  # 1.5 is in (1.0, 2.5]
    assert sum(point.bucket_counts) == 2 and len(point.bucket_counts) == len(LATENCY_BUCKETS_S) + 1
    assert before <= point.start_time_unix_nano <= point.time_unix_nano
    later = names(telemetry.collect())["gen_ai.client.operation.duration"]
    assert [p.start_time_unix_nano for p in points(later)] == [point.start_time_unix_nano]
    telemetry.shutdown()


def test_a_value_on_a_bucket_boundary_falls_in_that_bucket(telemetry: Telemetry) -> None:
    # Explicit-bucket histograms (OTel and Prometheus alike) count a value in the bucket whose upper bound it equals.
    telemetry.observe(Record(ts=0.0, request_id="r", route="crm", e2e_s=0.5, input_tokens=4))
    (duration,) = points(metrics(telemetry)["gen_ai.client.operation.duration"])
    assert duration.bucket_counts[LATENCY_BUCKETS_S.index(0.5)] == 1
    (usage,) = points(metrics(telemetry)["gen_ai.client.token.usage"])
    assert usage.bucket_counts[TOKEN_BUCKETS.index(4)] == 1


def test_label_sets_past_the_limit_go_to_one_overflow_point(telemetry: Telemetry) -> None:
    for i in range(2100):
        telemetry.observe(Record(ts=0.0, request_id="r", route=f"route-{i}", e2e_s=0.1))
    requests = points(metrics(telemetry)["gateway.requests"])
    assert len(requests) == 2001
    assert sum(p.value for p in requests) == 2100
    overflow = [p for p in requests if p.attributes == {"otel.metric.overflow": True}]
    assert [p.value for p in overflow] == [100]
    duration = points(metrics(telemetry)["gen_ai.client.operation.duration"])
    assert len(duration) == 2001
    assert sum(p.count for p in duration) == 2100


def test_otlp_export_runs_periodically_and_once_more_on_shutdown() -> None:
    exporter = FakeExporter()
    telemetry = Telemetry(exporter=exporter, export_interval_s=0.01)
    assert telemetry.collect().resource_metrics == []
    time.sleep(0.05)
    assert exporter.batches == []  # nothing measured yet, so nothing sent
    telemetry.observe(STREAM)
    deadline = time.monotonic() + 5
    while not exporter.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exporter.batches, "no periodic export"
    telemetry.observe(FAILED)
    telemetry.shutdown()
    telemetry.shutdown()
    assert exporter.shut_down == 1
    last = names(exporter.batches[-1])  # the one made by shutdown(), after both requests
    assert set(last) >= {"gen_ai.client.operation.duration", "gateway.requests", "gateway.cost"}
    assert sum(p.value for p in points(last["gateway.requests"])) == 2
    sent = len(exporter.batches)
    time.sleep(0.05)
    assert len(exporter.batches) == sent  # the loop has stopped


def test_shutdown_exports_the_last_totals_even_with_no_periodic_export() -> None:
    with pytest.raises(ValueError, match="positive"):
        Telemetry(exporter=FakeExporter(), export_interval_s=0)
    exporter = FakeExporter()
    telemetry = Telemetry(exporter=exporter, export_interval_s=math.inf)  # as the SDK: only on shutdown
    telemetry.observe(STREAM)
    telemetry.shutdown()
    assert len(exporter.batches) == 1
    assert points(names(exporter.batches[0])["gateway.tool_calls.invalid"])[0].value == 1


def test_a_failing_exporter_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    exporter = FakeExporter(fail=True)
    telemetry = Telemetry(exporter=exporter, export_interval_s=3600)
    telemetry.observe(STREAM)
    telemetry.shutdown()
    assert exporter.batches and exporter.shut_down == 1
    assert "exporting metrics failed" in caplog.text


def test_collected_data_encodes_as_an_otlp_request(telemetry: Telemetry) -> None:
    telemetry.observe(STREAM)
    telemetry.observe(FAILED)
    request = encode_metrics(telemetry.collect())
    (resource_metrics,) = request.resource_metrics
    encoded = {m.name: m for sm in resource_metrics.scope_metrics for m in sm.metrics}
    assert set(encoded) == {
        "gen_ai.client.operation.duration", "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk", "gateway.time_per_output_token",
        "gateway.engine.time_to_first_byte", "gateway.requests", "gateway.tool_calls.invalid", "gateway.cost",
    }  # fmt: skip
    duration = encoded["gen_ai.client.operation.duration"].histogram
    assert sorted(p.count for p in duration.data_points) == [1, 1]
    assert list(duration.data_points[0].explicit_bounds) == list(LATENCY_BUCKETS_S)
    assert encoded["gateway.requests"].sum.is_monotonic


def test_collecting_while_another_thread_observes_never_raises_and_ends_exact() -> None:
    telemetry = Telemetry()
    n, routes = 20_000, 50  # new label sets keep appearing while collections copy the state
    done = threading.Event()

    def observe_all() -> None:
        for i in range(n):
            telemetry.observe(
                Record(
                    ts=0.0, request_id="r", route=f"r{i % routes}", variant="v", e2e_s=0.01, output_tokens=3
                )
            )
        done.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to interleave with observe()
    try:
        writer = threading.Thread(target=observe_all)
        writer.start()
        seen = 0
        while not done.is_set():
            found = metrics(telemetry)
            total = sum(p.value for p in points(found["gateway.requests"])) if found else 0
            assert total >= seen  # cumulative: never goes back
            seen = total
            for p in points(found["gen_ai.client.operation.duration"]) if found else []:
                assert sum(p.bucket_counts) == p.count
        writer.join()
    finally:
        sys.setswitchinterval(old_interval)
    found = metrics(telemetry)
    assert sum(p.value for p in points(found["gateway.requests"])) == n
    duration = points(found["gen_ai.client.operation.duration"])
    assert len(duration) == routes
    assert sum(p.count for p in duration) == n
    assert sum(p.sum for p in duration) == pytest.approx(n * 0.01)
    assert sum(p.sum for p in points(found["gen_ai.client.token.usage"])) == 3 * n
