"""The gateway's metrics: the only module that wires the OpenTelemetry SDK and its exporters.

Owns `Telemetry`, which builds a private `MeterProvider` (never the global one, so several apps can live in
one process), creates every instrument once, turns each finished request's `Record` into measurements
(`observe`), and renders the Prometheus text exposition format (0.0.4) for `/metrics` from an in-process
reader, without `prometheus_client` and its global registry. An OTLP/HTTP exporter is added when an endpoint
is configured. Metric labels come only from configuration and known enums (route, variant, model, outcome,
verdict, reason, currency), never from request content.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Metric,
    MetricReader,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.util.types import Attributes, AttributeValue

from gateway.records import Record

# LLM latencies span a cache-hit reply (a few ms) to a long generation (minutes): 5 ms … 120 s.
LATENCY_BUCKETS_S: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0,
)  # fmt: skip
# Per-token decode time: around 10–100 ms on a loaded GPU, longer on the CPU build used in CI.
TPOT_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# The GenAI semantic conventions' advice for gen_ai.client.token.usage (powers of 4), cut at ~1M tokens.
TOKEN_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)

_BUCKETS: Final[dict[str, tuple[float, ...]]] = {
    "gen_ai.client.operation.duration": LATENCY_BUCKETS_S,
    "gen_ai.client.operation.time_to_first_chunk": LATENCY_BUCKETS_S,
    "gateway.engine.time_to_first_byte": LATENCY_BUCKETS_S,
    "gateway.time_per_output_token": TPOT_BUCKETS_S,
    "gen_ai.client.token.usage": TOKEN_BUCKETS,
}
# Labels come from configuration, so the set of label combinations is small; the bound only protects memory
# if a caller ever passes something unexpected.
_CACHE_MAX: Final = 4096
_MISSING: Final = "none"  # label value for a field the record does not have (e.g. no variant was chosen)
_REQUEST_LABELS: Final = ("route", "variant", "model", "outcome", "verdict")


class _Labels:
    """Histogram attribute dicts for one (route, variant, model, outcome), built once and reused."""

    __slots__ = ("done", "op", "short", "tokens_in", "tokens_out")

    def __init__(self, route: str, variant: str, model: str, outcome: str) -> None:
        op: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": route,
            "route": route,
            "variant": variant,
            "model": model,
        }
        self.op = op
        self.done: dict[str, AttributeValue] = {**op, "outcome": outcome}
        if outcome != "ok":  # GenAI semconv: error.type is required when the operation failed
            self.done["error.type"] = outcome
        self.tokens_in: dict[str, AttributeValue] = {**op, "gen_ai.token.type": "input"}
        self.tokens_out: dict[str, AttributeValue] = {**op, "gen_ai.token.type": "output"}
        # gateway.* histograms have no semantic convention to follow, so they skip the two gen_ai.* keys:
        # the SDK's per-measurement cost grows with each attribute, and so does every exported series.
        self.short: dict[str, AttributeValue] = {"route": route, "variant": variant, "model": model}


class _Totals:
    """Cumulative sums per label set, reported through an observable counter when a reader collects.

    Why not a synchronous SDK counter: in SDK 1.45 each `add()` costs about 10–20 µs (the attributes are
    cleaned, copied and hashed per measurement and per reader), while a dict update under a lock costs well
    under a microsecond. The totals are never reset (cumulative), so no count is lost between collections.
    """

    __slots__ = ("_lock", "_names", "_totals")

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._lock = threading.Lock()  # observe() and a collecting reader may run on different threads
        self._totals: dict[tuple[str, ...], float] = {}

    def add(self, key: tuple[str, ...], amount: float) -> None:
        with self._lock:
            self._totals[key] = self._totals.get(key, 0) + amount

    def observations(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._totals.items())
        return [Observation(value, dict(zip(self._names, key, strict=True))) for key, value in items]


class Telemetry:
    """Instruments for every request, a Prometheus text renderer, and optional OTLP export.

    `readers` are extra `MetricReader`s (tests pass an `InMemoryMetricReader`). `otlp_endpoint` is the full
    OTLP/HTTP metrics URL (e.g. `http://collector:4318/v1/metrics`).
    """

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        readers: Sequence[MetricReader] = (),
        service_name: str = "canary-gateway",
        export_interval_s: float = 15.0,
        export_timeout_s: float = 10.0,
    ) -> None:
        self._scrape = InMemoryMetricReader()
        all_readers: list[MetricReader] = [self._scrape, *readers]
        if otlp_endpoint:
            exporter = OTLPMetricExporter(endpoint=otlp_endpoint, timeout=export_timeout_s)
            all_readers.append(
                PeriodicExportingMetricReader(exporter, export_interval_millis=export_interval_s * 1000)
            )
        self._provider = MeterProvider(
            metric_readers=all_readers,
            # Resource() rather than Resource.create(): settings.py is the only reader of the environment.
            resource=Resource({"service.name": service_name}),
            # No traces to link to; the default trace-based filter still costs time per measurement.
            exemplar_filter=AlwaysOffExemplarFilter(),
            # Closed by the app's lifespan; an atexit hook would keep every test's provider alive.
            shutdown_on_exit=False,
            views=[
                View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
                for name, bounds in _BUCKETS.items()
            ],
        )
        self._closed = False
        self._labels: dict[tuple[str, str, str, str], _Labels] = {}
        self._requests = _Totals(_REQUEST_LABELS)
        self._invalid = _Totals(("route", "variant", "reason"))
        self._cost = _Totals(("route", "variant", "currency"))
        self._create_instruments()

    def _create_instruments(self) -> None:
        meter = self._provider.get_meter("gateway")
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="End-to-end duration of a request"
        )
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per request"
        )
        self._ttft = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Streams: time to first token",
        )
        self._tpot = meter.create_histogram(
            "gateway.time_per_output_token", unit="s", description="Streams: mean time per output token"
        )
        self._ttfb = meter.create_histogram(
            "gateway.engine.time_to_first_byte", unit="s", description="Time to the engine's first byte"
        )
        meter.create_observable_counter(
            "gateway.requests", [self._requests.observations], unit="{request}", description="Requests"
        )
        meter.create_observable_counter(
            "gateway.tool_calls.invalid",
            [self._invalid.observations],
            unit="{request}",
            description="Requests with an invalid tool call, by the first reason",
        )
        meter.create_observable_counter(
            "gateway.cost", [self._cost.observations], unit="{currency}", description="Cost of requests"
        )

    def observe(self, record: Record) -> None:
        """Record one finished request.

        On the hot path, so attribute dicts are cached and counters are plain sums (`_Totals`). Each histogram
        measurement still goes through the SDK, about 15–20 µs apiece on the 2-core dev box: about 25 µs
        for a failed request, 90–140 µs for a stream with every timing (measured, CPU time).
        """
        route, variant = record.route or _MISSING, record.variant or _MISSING
        model = record.engine_model or _MISSING
        labels = self._labels_for(route, variant, model, record.outcome)
        if record.e2e_s is not None:
            self._duration.record(record.e2e_s, labels.done)
        if record.input_tokens is not None:
            self._tokens.record(record.input_tokens, labels.tokens_in)
        if record.output_tokens is not None:
            self._tokens.record(record.output_tokens, labels.tokens_out)
        if record.ttft_s is not None:
            self._ttft.record(record.ttft_s, labels.op)
        if record.tpot_s is not None:
            self._tpot.record(record.tpot_s, labels.short)
        if record.engine_first_byte_s is not None:
            self._ttfb.record(record.engine_first_byte_s, labels.short)
        self._requests.add((route, variant, model, record.outcome, record.tool_verdict), 1)
        if record.tool_verdict == "invalid":
            self._invalid.add((route, variant, record.tool_reason or _MISSING), 1)
        if record.cost is not None and record.currency and record.cost >= 0:  # NaN fails >= 0
            self._cost.add((route, variant, record.currency), record.cost)

    def _labels_for(self, route: str, variant: str, model: str, outcome: str) -> _Labels:
        key = (route, variant, model, outcome)
        labels = self._labels.get(key)
        if labels is None:
            if len(self._labels) >= _CACHE_MAX:
                self._labels.clear()
            labels = self._labels[key] = _Labels(*key)
        return labels

    def prometheus_text(self) -> bytes:
        """The current metrics in the Prometheus text exposition format, version 0.0.4."""
        if self._closed:
            return b""
        data = self._scrape.get_metrics_data()
        if data is None:
            return b""
        lines: list[str] = []
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    lines.extend(_render(metric))
        return ("\n".join(lines) + "\n").encode() if lines else b""

    def shutdown(self) -> None:
        """Flush exporters and stop the provider. Idempotent."""
        if not self._closed:
            self._closed = True
            self._provider.shutdown()


# --- Prometheus text format ---------------------------------------------------------------------------------
# Name translation follows the OpenTelemetry "Prometheus and OpenMetrics compatibility" spec: invalid
# characters become "_", the unit becomes a suffix (annotations in braces are dropped), counters get "_total".

PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_UNIT_SUFFIX: Final = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": ""}
_INVALID_NAME: Final = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL: Final = re.compile(r"[^a-zA-Z0-9_]+")
_BRACES: Final = re.compile(r"\{[^}]*\}")


def _render(metric: Metric) -> Iterator[str]:
    data = metric.data
    if isinstance(data, Histogram):
        kind, name = "histogram", metric_name(metric.name, metric.unit)
        samples = _histogram_samples(name, data)
    elif isinstance(data, Sum) and data.is_monotonic:
        kind, name = "counter", metric_name(metric.name, metric.unit, counter=True)
        samples = (f"{name}{_labels(p.attributes)} {_number(p.value)}" for p in data.data_points)
    elif isinstance(data, Sum | Gauge):
        kind, name = "gauge", metric_name(metric.name, metric.unit)
        samples = (f"{name}{_labels(p.attributes)} {_number(p.value)}" for p in data.data_points)
    else:  # exponential histograms: none are configured, and 0.0.4 has no way to express them
        return
    if metric.description:
        yield f"# HELP {name} {_escape_help(metric.description)}"
    yield f"# TYPE {name} {kind}"
    yield from samples


def metric_name(name: str, unit: str | None, *, counter: bool = False) -> str:
    """The Prometheus name for an OTel instrument: `gen_ai.client.operation.duration`, `s` →
    `gen_ai_client_operation_duration_seconds`."""
    base = _INVALID_NAME.sub("_", name)
    suffix = _UNIT_SUFFIX.get(unit or "", None)
    if suffix is None:
        suffix = _INVALID_NAME.sub("_", _BRACES.sub("", unit or "")).strip("_")
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    if counter and not base.endswith("_total"):
        base += "_total"
    return "_" + base if base[0].isdigit() else base


def _histogram_samples(name: str, data: Histogram) -> Iterator[str]:
    for point in data.data_points:
        attrs = dict(point.attributes or {})
        cumulative = 0
        for bound, count in zip(point.explicit_bounds, point.bucket_counts, strict=False):
            cumulative += count
            yield f"{name}_bucket{_labels(attrs, le=_number(float(bound)))} {cumulative}"
        yield f"{name}_bucket{_labels(attrs, le='+Inf')} {point.count}"
        yield f"{name}_sum{_labels(attrs)} {_number(point.sum)}"
        yield f"{name}_count{_labels(attrs)} {point.count}"


def _labels(attributes: Attributes | Mapping[str, object], le: str | None = None) -> str:
    parts = [f'{_label_name(k)}="{_escape_value(str(v))}"' for k, v in (attributes or {}).items()]
    if le is not None:
        parts.append(f'le="{le}"')
    return "{" + ",".join(parts) + "}" if parts else ""


def _label_name(key: str) -> str:
    name = _INVALID_LABEL.sub("_", key)
    return "_" + name if name[:1].isdigit() else name


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
