"""Per-variant summaries of the request log, for `gateway report` and load-test comparisons.

Owns the arithmetic that turns records into a comparison of variants: request and error counts, the
invalid-tool-call rate with its 95 % Wilson score interval, latency percentiles (both formulas from `stats`),
tokens and cost, and the two renderings (a fixed-width table for people, JSON for scripts). Everything here is
pure: the caller reads the records (`records.read_records`) and writes the output.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson

from gateway.records import Record
from gateway.stats import percentile, wilson

# Outcomes that count against the variant. client_error (the caller's fault), client_disconnected (the caller
# left) and server_shutdown (cut at the drain deadline of a gateway shutting down) are counted separately: they
# say nothing about the variant's health.
ERROR_OUTCOMES: Final = frozenset(
    {
        "engine_error",
        "engine_timeout",
        "stream_error",
        "gateway_error",
        "invalid_tool_call",
        "no_live_variant",
    }
)


@dataclass(frozen=True, slots=True)
class VariantSummary:
    """What one variant of one route did over the records summarized. Latencies are in seconds."""

    route: str | None
    variant: str | None
    requests: int
    errors: int
    error_rate: float
    client_errors: int
    client_disconnects: int
    shutdown_cuts: int  # requests still running at a shutting-down gateway's drain deadline, ended by it
    tool_checked: int  # requests whose tool-call verdict was valid or invalid: the invalid rate's denominator
    invalid: int
    invalid_rate: float | None
    invalid_ci: tuple[float, float]  # 95 % Wilson score interval for invalid_rate
    truncated: int
    e2e_p50: float | None
    e2e_p95: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    input_tokens: int
    output_tokens: int
    cost_total: dict[str, float] = field(default_factory=dict)  # by currency
    cost_per_request: dict[str, float] = field(default_factory=dict)  # by currency, over priced requests
    # Requests first sent to this variant that another variant answered: it failed before its first byte, or
    # (enforce mode) its tool call was invalid. They are counted in the answering variant's `requests`.
    fallbacks: int = 0


@dataclass(slots=True)
class _Group:
    """Accumulates one (route, variant) while the records stream past."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    client_disconnects: int = 0
    shutdown_cuts: int = 0
    valid: int = 0
    invalid: int = 0
    truncated: int = 0
    e2e: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    priced: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    fallbacks: int = 0

    def add(self, record: Record) -> None:
        self.requests += 1
        self.errors += record.outcome in ERROR_OUTCOMES
        self.client_errors += record.outcome == "client_error"
        self.client_disconnects += record.outcome == "client_disconnected"
        self.shutdown_cuts += record.outcome == "server_shutdown"
        self.valid += record.tool_verdict == "valid"
        self.invalid += record.tool_verdict == "invalid"
        self.truncated += record.tool_verdict == "truncated"
        if record.e2e_s is not None:
            self.e2e.append(record.e2e_s)
        if record.stream and record.ttft_s is not None:
            self.ttft.append(record.ttft_s)
        self.input_tokens += record.input_tokens or 0
        self.output_tokens += record.output_tokens or 0
        if record.cost is not None and record.currency:
            self.cost[record.currency] += record.cost
            self.priced[record.currency] += 1

    def summary(self, route: str | None, variant: str | None) -> VariantSummary:
        checked = self.valid + self.invalid
        return VariantSummary(
            route=route,
            variant=variant,
            requests=self.requests,
            errors=self.errors,
            error_rate=self.errors / self.requests if self.requests else 0.0,
            client_errors=self.client_errors,
            client_disconnects=self.client_disconnects,
            shutdown_cuts=self.shutdown_cuts,
            tool_checked=checked,
            invalid=self.invalid,
            invalid_rate=self.invalid / checked if checked else None,
            invalid_ci=wilson(self.invalid, checked),
            truncated=self.truncated,
            e2e_p50=percentile(self.e2e, 50),
            e2e_p95=percentile(self.e2e, 95),
            ttft_p50=percentile(self.ttft, 50),
            ttft_p95=percentile(self.ttft, 95),
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_total=dict(self.cost),
            cost_per_request={c: total / self.priced[c] for c, total in self.cost.items()},
            fallbacks=self.fallbacks,
        )


def summarize(records: Iterable[Record]) -> list[VariantSummary]:
    """One summary per (route, variant) of served traffic, sorted by route then variant (records with none sort
    first). Shadow copies' records are left out: they were answered to nobody.

    - errors: outcomes in `ERROR_OUTCOMES`; client_error and client_disconnected are counted apart and are
      not errors. error_rate = errors / requests.
    - invalid_rate = invalid / (valid + invalid): only requests whose tool calls were checked (verdict valid or
      invalid) are in the denominator; requests without tool calls (`none`) and those cut off before the
      calls were complete (`truncated`, counted apart) are not. None when no request was checked.
    - e2e percentiles over every record with an e2e time; TTFT percentiles over streams only.
    - fallbacks: requests first sent to the variant that another variant answered (`fallback_from`).
    - cost_per_request = cost_total / requests that had a cost, per currency (unpriced requests, such as
      errors without usage, would otherwise pull the figure down).
    """
    groups: dict[tuple[str | None, str | None], _Group] = defaultdict(_Group)
    for record in records:
        if record.shadow:  # a shadow copy served nobody (`shadow.pairs` reads them)
            continue
        groups[record.route, record.variant].add(record)
        if record.fallback_from is not None:
            groups[record.route, record.fallback_from].fallbacks += 1
    ordered = sorted(groups, key=lambda key: (key[0] or "", key[1] or ""))
    return [groups[key].summary(*key) for key in ordered]


def to_json(summaries: Iterable[VariantSummary]) -> bytes:
    """The summaries as a JSON array of objects, one per (route, variant), fields as in `VariantSummary`."""
    return orjson.dumps(list(summaries), option=orjson.OPT_INDENT_2)


# --- table --------------------------------------------------------------------------------------------------

_HEADERS: Final = (
    "route",
    "variant",
    "requests",
    "errors",
    "client 4xx",
    "disconnects",
    "shutdown cuts",
    "invalid (95% CI)",
    "trunc",
    "fallback",
    "e2e p50/p95 ms",
    "ttft p50/p95 ms",
    "tokens in/out",
    "cost/1k req",
    "cost total",
)
_LEFT: Final = 2  # the first two columns are names, left-aligned; the rest are numbers
NONE: Final = "(none)"  # a record without a route or variant: answered before one was chosen
NO_SAMPLES: Final = "n/a"
_LEGEND: Final = {
    NONE: f"{NONE}: answered before a route or variant was chosen (a bad key or body, an unknown route, no live"
    " variant)",
    NO_SAMPLES: f"{NO_SAMPLES}: no samples (ttft: streams only; invalid: no tool call checked; cost: no priced"
    " request)",
}


def format_table(summaries: Iterable[VariantSummary]) -> str:
    """A fixed-width table, one row per (route, variant), for a terminal, then a line explaining each of the
    placeholders `(none)` and `n/a` that the table shows.

    Costs are fixed-point (never an exponent) with three significant digits, per 1,000 requests and in total;
    `to_json` keeps the exact figures."""
    body = [_row(s) for s in summaries]
    rows = [_HEADERS, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = [_line(row, widths) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    shown = {cell for row in body for cell in row}
    lines += [text for placeholder, text in _LEGEND.items() if placeholder in shown]
    return "\n".join(lines) + "\n"


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = (
        c.ljust(w) if i < _LEFT else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "  ".join(padded).rstrip()


def _row(s: VariantSummary) -> tuple[str, ...]:
    return (
        s.route or NONE,
        s.variant or NONE,
        str(s.requests),
        f"{s.errors} ({s.error_rate:.1%})",
        str(s.client_errors),
        str(s.client_disconnects),
        str(s.shutdown_cuts),
        _invalid(s),
        str(s.truncated),
        str(s.fallbacks),
        _ms_pair(s.e2e_p50, s.e2e_p95),
        _ms_pair(s.ttft_p50, s.ttft_p95),
        f"{s.input_tokens}/{s.output_tokens}",
        _money({currency: per_request * 1000 for currency, per_request in s.cost_per_request.items()}),
        _money(s.cost_total),
    )


def _invalid(s: VariantSummary) -> str:
    if s.invalid_rate is None:
        return NO_SAMPLES
    low, high = s.invalid_ci
    return f"{s.invalid}/{s.tool_checked} {s.invalid_rate:.1%} [{low:.1%}, {high:.1%}]"


def _ms_pair(p50: float | None, p95: float | None) -> str:
    if p50 is None or p95 is None:
        return NO_SAMPLES
    return f"{p50 * 1000:.0f}/{p95 * 1000:.0f}"


def _money(by_currency: dict[str, float]) -> str:
    if not by_currency:
        return NO_SAMPLES
    return "; ".join(f"{amount(value)} {currency}" for currency, value in sorted(by_currency.items()))


def amount(value: float) -> str:
    """Fixed-point with three significant digits and at least two decimals, never an exponent: a request's cost
    is a few millionths of a euro, which `%g` prints as 4.91143e-05 (here 0.0000491)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:.2f}"
    decimals = min(12, max(2, 2 - math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"
