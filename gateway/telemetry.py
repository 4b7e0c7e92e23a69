"""The gateway's metrics: the only module that wires OpenTelemetry and its exporters.

Owns `Telemetry`, which aggregates each finished request's `Record` in the process (`observe`), hands out the
cumulative totals in the OpenTelemetry SDK's data model (`collect`), renders them in the Prometheus text
exposition format (0.0.4) for `/metrics` without `prometheus_client` and its global registry, and, when an
OTLP endpoint is configured, exports them from a background thread. Metric labels come only from
configuration and known enums (route, variant, model, outcome, verdict, reason, currency, shadow), never from
request content. Every per-request series carries `shadow` ("true" for a shadow copy's answer, `shadow.copies`;
"false" for served traffic), so served-traffic totals are the `shadow="false"` series; copies dropped are counted
by reason in `gateway.shadow.dropped`.

Why no SDK instruments (a deliberate deviation from "use the OTel SDK", by measurement): in SDK 1.45 each
synchronous `histogram.record()` costs about 16–20 µs of CPU (the attributes are cleaned, copied and hashed
per measurement and per reader), and a stream makes six of them, so `observe()` cost 64–95 µs per request
and 111–143 µs per stream in the overhead benchmark, against ~650 µs of CPU for a whole proxied request.
Aggregating here into fixed buckets (the same boundaries, the same cumulative semantics as the SDK's
explicit-bucket histogram) costs about 3–5 µs per stream. The SDK still provides what it is good at: the
data model `collect()` returns, and the OTLP encoding and transport.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Final, Protocol

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import Attributes, AttributeValue

from gateway.records import Record

_log = logging.getLogger(__name__)

# LLM latencies span a cache-hit reply (a few ms) to a long generation (minutes): 5 ms … 120 s.
LATENCY_BUCKETS_S: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0,
)  # fmt: skip
# Per-token decode time: around 10–100 ms on a loaded GPU, longer on the CPU build used in CI.
TPOT_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# The GenAI semantic conventions' advice for gen_ai.client.token.usage (powers of 4), cut at ~1M tokens.
TOKEN_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)

# Labels come from configuration, so the set of label combinations is small; the bounds only protect memory
# if a caller ever passes something unexpected. Past _MAX_POINTS label sets an instrument records into one
# overflow point, as the SDK does (its default cardinality limit is 2000, attribute otel.metric.overflow).
_CACHE_MAX: Final = 4096
_MAX_POINTS: Final = 2000
_OVERFLOW_KEY: Final[tuple[()]] = ()
_OVERFLOW_ATTRIBUTES: Final[Mapping[str, AttributeValue]] = {"otel.metric.overflow": True}
_MISSING: Final = "none"  # label value for a field the record does not have (e.g. no variant was chosen)
_REQUEST_LABELS: Final = ("route", "variant", "model", "outcome", "verdict", "shadow")
_SHADOW: Final = {False: "false", True: "true"}  # the `shadow` label's values
_SNAPSHOT_TRIES: Final = 10
_CUMULATIVE: Final = AggregationTemporality.CUMULATIVE

_LabelKey = tuple[tuple[str, AttributeValue], ...]
# attributes, bucket counts, sum, min, max: one histogram point as copied by a collection
_PointCopy = tuple[Mapping[str, AttributeValue], list[int], float, float, float]
_TotalsCopy = list[tuple[tuple[str, ...], float]]  # one counter's (label values, total) as copied


class _HistogramPoint:
    """The cumulative aggregate of one histogram label set: the SDK's explicit-bucket aggregation, unlocked.

    Written only by `Telemetry.observe()` (see `Telemetry._snapshot` for why no lock is needed).
    """

    __slots__ = ("attributes", "bounds", "counts", "max", "min", "sum")

    def __init__(self, bounds: tuple[float, ...], attributes: Mapping[str, AttributeValue]) -> None:
        self.bounds = bounds
        self.attributes = attributes
        self.counts = [0] * (len(bounds) + 1)
        self.sum: float = 0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        # As in the SDK: bucket i holds (bounds[i-1], bounds[i]], the last one everything above.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value


class _Histogram:
    """One histogram instrument: a cumulative point per label set."""

    __slots__ = ("bounds", "description", "name", "points", "unit")

    def __init__(self, name: str, unit: str, description: str, bounds: tuple[float, ...]) -> None:
        self.name, self.unit, self.description, self.bounds = name, unit, description, bounds
        self.points: dict[_LabelKey, _HistogramPoint] = {}

    def point(self, attributes: Mapping[str, AttributeValue]) -> _HistogramPoint:
        """The point for a label set, created on first use (off the hot path: `_Series` caches it)."""
        key: _LabelKey = tuple(attributes.items())
        if key not in self.points and len(self.points) >= _MAX_POINTS:
            key, attributes = _OVERFLOW_KEY, _OVERFLOW_ATTRIBUTES
        point = self.points.get(key)
        if point is None:
            point = self.points[key] = _HistogramPoint(self.bounds, attributes)
        return point

    def copy(self) -> list[_PointCopy]:
        return [(p.attributes, p.counts[:], p.sum, p.min, p.max) for p in list(self.points.values())]

    def metric(self, points: list[_PointCopy], start_ns: int, now_ns: int) -> Metric | None:
        data_points = []
        for attributes, counts, total, low, high in points:
            count = sum(counts)
            if count:  # a point exists as soon as its label set is first seen, maybe before any value
                data_points.append(
                    HistogramDataPoint(
                        attributes=dict(attributes),
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns,
                        count=count,
                        sum=total,
                        bucket_counts=tuple(counts),
                        explicit_bounds=self.bounds,
                        min=low,
                        max=high,
                    )
                )
        if not data_points:
            return None
        data = Histogram(data_points=data_points, aggregation_temporality=_CUMULATIVE)
        return Metric(name=self.name, description=self.description, unit=self.unit, data=data)


class _Counter:
    """One monotonic counter: a cumulative sum per tuple of label values, never reset."""

    __slots__ = ("description", "label_names", "name", "totals", "unit")

    def __init__(self, name: str, unit: str, description: str, label_names: tuple[str, ...]) -> None:
        self.name, self.unit, self.description, self.label_names = name, unit, description, label_names
        self.totals: dict[tuple[str, ...], float] = {}

    def add(self, key: tuple[str, ...], amount: float) -> None:
        totals = self.totals
        total = totals.get(key)
        if total is None and len(totals) >= _MAX_POINTS:
            key = _OVERFLOW_KEY
            total = totals.get(key)
        totals[key] = amount if total is None else total + amount

    def copy(self) -> _TotalsCopy:
        return list(self.totals.items())

    def metric(self, totals: _TotalsCopy, start_ns: int, now_ns: int) -> Metric | None:
        if not totals:
            return None
        data_points = [
            NumberDataPoint(
                attributes=self._attributes(key),
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                value=value,
            )
            for key, value in totals
        ]
        data = Sum(data_points=data_points, aggregation_temporality=_CUMULATIVE, is_monotonic=True)
        return Metric(name=self.name, description=self.description, unit=self.unit, data=data)

    def _attributes(self, key: tuple[str, ...]) -> dict[str, AttributeValue]:
        if key == _OVERFLOW_KEY:
            return dict(_OVERFLOW_ATTRIBUTES)
        return dict(zip(self.label_names, key, strict=True))


class _Series:
    """The histogram points one (route, variant, model, outcome, shadow) records into, looked up once and reused."""

    __slots__ = ("duration", "tokens_in", "tokens_out", "tpot", "ttfb", "ttft")

    def __init__(self, t: Telemetry, route: str, variant: str, model: str, outcome: str, shadow: str) -> None:
        op: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": route,
            "route": route,
            "variant": variant,
            "model": model,
            "shadow": shadow,
        }
        done: dict[str, AttributeValue] = {**op, "outcome": outcome}
        if outcome != "ok":  # GenAI semconv: error.type is required when the operation failed
            done["error.type"] = outcome
        # gateway.* histograms have no semantic convention to follow, so they skip the two gen_ai.* keys:
        # every attribute multiplies the exported series.
        short: dict[str, AttributeValue] = {
            "route": route,
            "variant": variant,
            "model": model,
            "shadow": shadow,
        }
        self.duration = t._duration.point(done)
        self.tokens_in = t._tokens.point({**op, "gen_ai.token.type": "input"})
        self.tokens_out = t._tokens.point({**op, "gen_ai.token.type": "output"})
        self.ttft = t._ttft.point(op)
        self.tpot = t._tpot.point(short)
        self.ttfb = t._ttfb.point(short)


class MetricsExporter(Protocol):
    """What `Telemetry` needs of an exporter: `OTLPMetricExporter` fits, and so does a test's fake."""

    def export(self, metrics_data: MetricsData, timeout_millis: float = ...) -> object: ...

    def shutdown(self, timeout_millis: float = ...) -> None: ...


class _ExportLoop:
    """Exports `collect()`'s data every interval from a daemon thread, and once more when closed.

    What the SDK's `PeriodicExportingMetricReader` does, for an exporter fed from `Telemetry.collect()`.
    Exports never overlap (the OTel spec forbids concurrent `export()` calls on one exporter).
    """

    def __init__(
        self,
        collect: Callable[[], MetricsData],
        exporter: MetricsExporter,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        if not interval_s > 0:  # as the SDK's reader; math.inf means: export only on shutdown
            raise ValueError(f"export interval must be positive, not {interval_s!r}")
        self._collect, self._exporter = collect, exporter
        self._interval_s = None if math.isinf(interval_s) else interval_s  # Event.wait() overflows on inf
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gateway-metrics-export", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.export()

    def export(self) -> None:
        data = self._collect()
        if not data.resource_metrics:
            return
        # The exporter's own HTTP calls must not be instrumented, in case something instruments `requests`.
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            with self._lock:
                self._exporter.export(data, timeout_millis=self._timeout_s * 1000)
        except Exception:  # a collector being down must never reach the request path or the shutdown
            _log.exception("exporting metrics failed")
        finally:
            detach(token)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self._timeout_s + 1)  # it may be half-way through an export
        self.export()
        try:
            self._exporter.shutdown(timeout_millis=self._timeout_s * 1000)
        except Exception:
            _log.exception("shutting down the metrics exporter failed")


class Telemetry:
    """Per-request metrics, aggregated in the process; a Prometheus text renderer; optional OTLP export.

    `otlp_endpoint` is the full OTLP/HTTP metrics URL (e.g. `http://collector:4318/v1/metrics`); `exporter`
    replaces the OTLP/HTTP exporter built from it (tests pass a fake). Either way, the cumulative totals are
    exported every `export_interval_s` and once more on `shutdown()`. `collect()` returns them at any time.
    """

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        exporter: MetricsExporter | None = None,
        service_name: str = "canary-gateway",
        export_interval_s: float = 15.0,
        export_timeout_s: float = 10.0,
    ) -> None:
        if otlp_endpoint and exporter is None:
            exporter = OTLPMetricExporter(endpoint=otlp_endpoint, timeout=export_timeout_s)
        self._start_ns = time.time_ns()
        # Resource() rather than Resource.create(): settings.py is the only reader of the environment.
        self._resource = Resource({"service.name": service_name})
        self._scope = InstrumentationScope("gateway")
        self._create_instruments()
        self._series: dict[tuple[str, str, str, str, str], _Series] = {}
        self._seq = 0  # odd while observe() is updating the aggregates: see _snapshot()
        self._closed = False
        self._export: _ExportLoop | None = None
        if exporter is not None:
            self._export = _ExportLoop(self.collect, exporter, export_interval_s, export_timeout_s)

    def _create_instruments(self) -> None:
        self._duration = _Histogram(
            "gen_ai.client.operation.duration", "s", "End-to-end duration of a request", LATENCY_BUCKETS_S
        )
        self._tokens = _Histogram(
            "gen_ai.client.token.usage", "{token}", "Tokens used per request", TOKEN_BUCKETS
        )
        self._ttft = _Histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            "s",
            "Streams: time to first token",
            LATENCY_BUCKETS_S,
        )
        self._tpot = _Histogram(
            "gateway.time_per_output_token", "s", "Streams: mean time per output token", TPOT_BUCKETS_S
        )
        self._ttfb = _Histogram(
            "gateway.engine.time_to_first_byte", "s", "Time to the engine's first byte", LATENCY_BUCKETS_S
        )
        self._requests = _Counter("gateway.requests", "{request}", "Requests", _REQUEST_LABELS)
        self._invalid = _Counter(
            "gateway.tool_calls.invalid",
            "{request}",
            "Requests with an invalid tool call, by the first reason",
            ("route", "variant", "reason", "shadow"),
        )
        self._cost = _Counter(
            "gateway.cost", "{currency}", "Cost of requests", ("route", "variant", "currency", "shadow")
        )
        self._dropped = _Counter(
            "gateway.shadow.dropped",
            "{request}",
            "Shadow copies not sent, by reason (in_flight_limit, budget, killed)",
            ("route", "variant", "reason"),
        )
        self._histograms = (self._duration, self._tokens, self._ttft, self._tpot, self._ttfb)
        self._counters = (self._requests, self._invalid, self._cost, self._dropped)

    def observe(self, record: Record) -> None:
        """Record one finished request. Call it from one thread only (the event loop's): see `_snapshot`.

        On the hot path: about 3–5 µs for a stream with every timing (see the module docstring).
        """
        self._seq += 1
        try:
            route, variant = record.route or _MISSING, record.variant or _MISSING
            model, outcome, shadow = record.engine_model or _MISSING, record.outcome, _SHADOW[record.shadow]
            series = self._series.get((route, variant, model, outcome, shadow))
            if series is None:
                series = self._new_series(route, variant, model, outcome, shadow)
            if (e2e := record.e2e_s) is not None:
                series.duration.add(e2e)
            if (tokens_in := record.input_tokens) is not None:
                series.tokens_in.add(tokens_in)
            if (tokens_out := record.output_tokens) is not None:
                series.tokens_out.add(tokens_out)
            if (ttft := record.ttft_s) is not None:
                series.ttft.add(ttft)
            if (tpot := record.tpot_s) is not None:
                series.tpot.add(tpot)
            if (ttfb := record.engine_first_byte_s) is not None:
                series.ttfb.add(ttfb)
            self._requests.add((route, variant, model, outcome, record.tool_verdict, shadow), 1)
            if record.tool_verdict == "invalid":
                self._invalid.add((route, variant, record.tool_reason or _MISSING, shadow), 1)
            if record.cost is not None and record.currency and record.cost >= 0:  # NaN fails >= 0
                self._cost.add((route, variant, record.currency, shadow), record.cost)
        finally:
            self._seq += 1

    def shadow_dropped(self, route: str, variant: str, reason: str) -> None:
        """Count one shadow copy not sent (`reason`: in_flight_limit, budget, killed). Event-loop thread only."""
        self._seq += 1
        try:
            self._dropped.add((route, variant, reason), 1)
        finally:
            self._seq += 1

    def _new_series(self, route: str, variant: str, model: str, outcome: str, shadow: str) -> _Series:
        if len(self._series) >= _CACHE_MAX:  # only the cache: the points stay in their instruments
            self._series.clear()
        series = _Series(self, route, variant, model, outcome, shadow)
        self._series[route, variant, model, outcome, shadow] = series
        return series

    def collect(self) -> MetricsData:
        """The cumulative totals since this `Telemetry` was created, in the OTel SDK's data model.

        Only instruments with at least one measurement appear; with none at all, `resource_metrics` is empty.
        Safe to call from any thread, while `observe()` runs.
        """
        histograms, counters = self._snapshot()
        start_ns, now_ns = self._start_ns, time.time_ns()
        metrics = [h.metric(p, start_ns, now_ns) for h, p in zip(self._histograms, histograms, strict=True)]
        metrics += [c.metric(t, start_ns, now_ns) for c, t in zip(self._counters, counters, strict=True)]
        present = [m for m in metrics if m is not None]
        if not present:
            return MetricsData(resource_metrics=[])
        scope = ScopeMetrics(scope=self._scope, metrics=present, schema_url="")
        resource = ResourceMetrics(
            resource=self._resource, scope_metrics=[scope], schema_url=self._resource.schema_url
        )
        return MetricsData(resource_metrics=[resource])

    def _snapshot(self) -> tuple[list[list[_PointCopy]], list[_TotalsCopy]]:
        """A copy of every aggregate, consistent at request granularity, taken without a lock on the hot path.

        `observe()` is the only writer and runs on one thread (the event loop's), so no update can be lost
        without a lock, and an uncontended lock there would be the only synchronisation cost per request. A
        collector may run on another thread (the OTLP export loop) and could copy the aggregates half-way
        through one `observe()`; so `observe()` bumps `_seq` before and after its updates (odd while it
        writes), seqlock style: a copy taken while `_seq` was even and unchanged is exact, otherwise it is
        taken again (a few times, then used as it is: off by at most the one request in flight, and each
        histogram point still self-consistent since its count is the sum of its buckets). The copy itself is
        safe under the GIL: `list(dict.values())`, `dict.items()` into a list and `list[:]` run in C without
        releasing it, so a new label set appearing mid-copy cannot raise. A collection on the event-loop
        thread (`/metrics`) never overlaps an `observe()`, so it is always exact at the first try.
        """
        for _ in range(_SNAPSHOT_TRIES):
            seq = self._seq
            copies = ([h.copy() for h in self._histograms], [c.copy() for c in self._counters])
            if seq % 2 == 0 and self._seq == seq:
                break
            time.sleep(0)  # let the writer finish its observe()
        return copies

    def prometheus_text(self) -> bytes:
        """The current metrics in the Prometheus text exposition format, version 0.0.4."""
        if self._closed:
            return b""
        lines: list[str] = []
        for resource_metrics in self.collect().resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    lines.extend(_render(metric))
        return ("\n".join(lines) + "\n").encode() if lines else b""

    def shutdown(self) -> None:
        """Export once more and stop the export loop. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._export is not None:
                self._export.close()


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
        # The label pairs are escaped once per point, not once per bucket line: a scrape runs on the event loop.
        parts = _label_parts(point.attributes)
        labels = "{" + ",".join(parts) + "}" if parts else ""
        bucket = f"{name}_bucket{{{''.join(p + ',' for p in parts)}le="
        cumulative = 0
        for bound, count in zip(point.explicit_bounds, point.bucket_counts, strict=False):
            cumulative += count
            yield f'{bucket}"{_number(float(bound))}"}} {cumulative}'
        yield f'{bucket}"+Inf"}} {point.count}'
        yield f"{name}_sum{labels} {_number(point.sum)}"
        yield f"{name}_count{labels} {point.count}"


def _labels(attributes: Attributes | Mapping[str, object]) -> str:
    parts = _label_parts(attributes)
    return "{" + ",".join(parts) + "}" if parts else ""


def _label_parts(attributes: Attributes | Mapping[str, object]) -> list[str]:
    return [f'{_label_name(k)}="{_escape_value(str(v))}"' for k, v in (attributes or {}).items()]


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
