"""What the console's pages show of the request log, computed from records: the window a page looks at, each
variant's figures beside its route's baseline, time series for the charts, and the live share of each variant.
Pure: the caller reads the records. Counts, rates with their Wilson intervals and costs are `report.summarize`'s;
percentiles are `stats.percentile` over the same records (e2e over every record timed, time to first token over
streams), at p50, p90 and p99.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.errors import BadRequest
from gateway.policy import Route
from gateway.records import Record
from gateway.report import VariantSummary, summarize
from gateway.stats import percentile

WINDOWS: Final = {"5m": 300.0, "15m": 900.0, "1h": 3600.0, "6h": 21_600.0, "24h": 86_400.0, "7d": 604_800.0}
DEFAULT_WINDOW: Final = "1h"
LIVE_S: Final = 300.0  # the live share is over the last five minutes
QUANTILES: Final = (50, 90, 99)
BUCKETS: Final = 30  # points per time series


def window_seconds(raw: str | None) -> tuple[str, float]:
    """The `window` query parameter (one of `WINDOWS`; default one hour) and its length in seconds."""
    name = raw or DEFAULT_WINDOW
    if name not in WINDOWS:
        raise BadRequest(
            f"'window' must be one of {', '.join(WINDOWS)}, not {name!r}.",
            param="window",
            code="invalid_value",
        )
    return name, WINDOWS[name]


def baseline_of(route: Route) -> str:
    """What a route's variants are compared with: its canary's baseline, else its first fallback, else its first
    variant."""
    if route.canary is not None:
        return route.canary.baseline
    return route.fallback[0] if route.fallback else route.variants[0].name


@dataclass(frozen=True, slots=True)
class Figures:
    """One variant over a window. Latencies in seconds, keyed "p50", "p90", "p99"."""

    summary: VariantSummary
    e2e: dict[str, float | None]
    ttft: dict[str, float | None]

    @property
    def cost_per_1k(self) -> dict[str, float]:
        return {currency: 1000 * c for currency, c in self.summary.cost_per_request.items()}


def variant_figures(records: Sequence[Record]) -> dict[str, Figures]:
    """Each variant of served traffic in `records` (one route's) by name."""
    e2e: defaultdict[str, list[float]] = defaultdict(list)
    ttft: defaultdict[str, list[float]] = defaultdict(list)
    for r in _served(records):
        if r.e2e_s is not None:
            e2e[r.variant or ""].append(r.e2e_s)
        if r.stream and r.ttft_s is not None:
            ttft[r.variant or ""].append(r.ttft_s)
    return {
        s.variant: Figures(s, _quantiles(e2e[s.variant]), _quantiles(ttft[s.variant]))
        for s in summarize(records)
        if s.variant is not None
    }


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in QUANTILES}


def _served(records: Iterable[Record]) -> Iterable[Record]:
    return (r for r in records if not r.shadow and r.variant is not None)


Point = tuple[float, float | None]  # (bucket start, value or None when the bucket has no sample)


@dataclass(frozen=True, slots=True)
class Series:
    """One variant's figures per time bucket over a window."""

    variant: str
    requests: list[Point]  # requests per minute
    invalid_rate: list[Point]  # invalid ÷ checked
    e2e_p50: list[Point]  # seconds


def series(records: Iterable[Record], since: float, until: float, buckets: int = BUCKETS) -> list[Series]:
    """Per variant of served traffic, sorted by name."""
    width = (until - since) / buckets
    grouped: defaultdict[str, list[list[Record]]] = defaultdict(lambda: [[] for _ in range(buckets)])
    for r in _served(records):
        i = int((r.ts - since) // width)
        if 0 <= i < buckets:
            grouped[r.variant or ""][i].append(r)
    starts = [since + i * width for i in range(buckets)]
    return [_series(name, starts, grouped[name], width) for name in sorted(grouped)]


def _series(name: str, starts: list[float], cells: list[list[Record]], width: float) -> Series:
    requests: list[Point] = []
    invalid: list[Point] = []
    e2e: list[Point] = []
    for start, cell in zip(starts, cells, strict=True):
        verdicts = Counter(r.tool_verdict for r in cell)
        checked = verdicts["valid"] + verdicts["invalid"]
        requests.append((start, len(cell) * 60.0 / width))
        invalid.append((start, verdicts["invalid"] / checked if checked else None))
        e2e.append((start, percentile([r.e2e_s for r in cell if r.e2e_s is not None], 50)))
    return Series(name, requests, invalid, e2e)


def live_shares(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, float]]:
    """Route → variant → the variant's share of the route's served requests, from (route, variant) counts
    (`store.request_log.served_counts`)."""
    totals = live_counts(counts)
    shares: defaultdict[str, dict[str, float]] = defaultdict(dict)
    for (route, variant), n in counts.items():
        shares[route][variant] = n / totals[route]
    return dict(shares)


def live_counts(counts: Mapping[tuple[str, str], int]) -> Counter[str]:
    """Served requests per route."""
    totals: Counter[str] = Counter()
    for (route, _), n in counts.items():
        totals[route] += n
    return totals


def refresh_s(base: float, span_s: float) -> float:
    """How often a page over `span_s` seconds of records refreshes: every `base` seconds, or every 1/120 of the
    span when that is longer (a chart of 30 buckets over a day does not change every few seconds, and reading a
    day's records costs about a second per 100,000 of them)."""
    return max(base, span_s / 120)
