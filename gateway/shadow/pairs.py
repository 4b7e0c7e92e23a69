"""The shadow comparison: each shadow copy's record paired with the record of the request it copied, and what the
pairs say, per route and shadow variant; for `/admin/shadow/{route}` and `gateway report`. Pure: the caller reads
the records (`store.request_log.read_records`) and writes the output.

A pair is a shadow record that was answered (not `shadow_dropped`) and the served record its `primary_id` names
(the one closest in time, should a caller have reused a request id). Both arms are measured on the same requests,
so their comparison is paired, as in the load tests' paired mode (`loadtest.results`):

- Invalid calls: over the pairs where both verdicts were checked (valid or invalid), each arm's rate with its 95 %
  Wilson interval, and the difference shadow − served with Newcombe's interval for paired proportions and
  McNemar's test on the discordant pairs (`stats`: exact below 25 discordant pairs). The served arm is what the
  user got, whichever variant answered it (`served_by` counts them).
- Errors: `report.ERROR_OUTCOMES`, per arm over all pairs.
- Latency: end-to-end percentiles (p50, p95, p99, linear interpolation) over the pairs both arms answered `ok`,
  side by side, and their ratio shadow ÷ served.
- Cost per 1,000 requests, per currency, over each arm's priced pairs.
- Drops: copies not sent, by reason (`shadow.copies`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from gateway.records import SHADOW_DROPPED, Record
from gateway.report import ERROR_OUTCOMES, NO_SAMPLES, amount
from gateway.stats import Paired, mcnemar, paired_difference_ci, percentile, wilson

PERCENTILES: Final = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class ArmFigures:
    """One arm (served or shadow) over a route's pairs. Latencies in seconds."""

    errors: int
    invalid: int  # over the pairs whose two verdicts were checked
    invalid_rate: float | None
    invalid_ci: tuple[float, float]  # 95 % Wilson score interval
    e2e: dict[str, float | None]  # "p50", "p95", "p99", over the pairs both arms answered ok
    cost_per_1k: dict[str, float]  # by currency, over this arm's priced pairs


@dataclass(frozen=True, slots=True)
class ShadowSummary:
    """A route's shadow variant against what the route's users were served, over the records summarized."""

    route: str
    variant: str  # the shadow variant
    copies: int  # shadow records that were sent (answered or failed)
    pairs: int  # copies whose primary record was found
    unpaired: int  # copies whose primary is not among the records (e.g. just before the window)
    drops: dict[str, int]  # copies not sent, by reason
    served_by: dict[str, int]  # the variants that answered the paired primaries
    served: ArmFigures
    shadow: ArmFigures
    checked_pairs: int  # pairs whose two verdicts were checked: the invalid-call comparison's sample
    table: dict[str, int]  # n11 both invalid, n10 only served, n01 only shadow, n00 neither
    difference: float | None  # shadow − served invalid rate
    difference_ci: tuple[float, float]  # Newcombe's 95 % interval for paired proportions
    mcnemar_p: float
    mcnemar_method: str  # exact | chi2-cc | none
    latency_ratio: dict[str, float | None]  # shadow ÷ served, per percentile
    latency_pairs: int  # pairs both arms answered ok: the latency comparison's sample


@dataclass(slots=True)
class _Route:
    copies: list[Record] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)


def summarize(records: Iterable[Record]) -> list[ShadowSummary]:
    """One summary per (route, shadow variant) with shadow records, sorted by route then variant."""
    primaries: dict[str, list[Record]] = defaultdict(list)
    shadows: dict[tuple[str, str], _Route] = defaultdict(_Route)
    for rec in records:
        if not rec.shadow:
            primaries[rec.request_id].append(rec)
            continue
        group = shadows[rec.route or "", rec.variant or ""]
        if rec.outcome == SHADOW_DROPPED:
            group.drops[rec.error_code or "unknown"] += 1
        else:
            group.copies.append(rec)
    out = []
    for (route, variant), group in sorted(shadows.items()):
        pairs = [
            (primary, copy)
            for copy in group.copies
            if (primary := _primary(primaries, copy, route)) is not None
        ]
        out.append(_summary(route, variant, group, pairs))
    return out


def _primary(primaries: dict[str, list[Record]], copy: Record, route: str) -> Record | None:
    found = [p for p in primaries.get(copy.primary_id or "", ()) if p.route == route]
    return min(found, key=lambda p: abs(p.ts - copy.ts)) if found else None


def _summary(route: str, variant: str, group: _Route, pairs: list[tuple[Record, Record]]) -> ShadowSummary:
    checked = [(p, s) for p, s in pairs if _checked(p) and _checked(s)]
    n11 = sum(_invalid(p) and _invalid(s) for p, s in checked)
    n10 = sum(_invalid(p) and not _invalid(s) for p, s in checked)
    n01 = sum(not _invalid(p) and _invalid(s) for p, s in checked)
    table = Paired(n11, n10, n01, len(checked) - n11 - n10 - n01)
    test = mcnemar(n10, n01)
    timed = [(p.e2e_s, s.e2e_s) for p, s in pairs if _timed(p) and _timed(s)]
    served_e2e = [p for p, _ in timed if p is not None]
    shadow_e2e = [s for _, s in timed if s is not None]
    served = _arm([p for p, _ in pairs], n11 + n10, len(checked), served_e2e)
    shadow = _arm([s for _, s in pairs], n11 + n01, len(checked), shadow_e2e)
    return ShadowSummary(
        route=route,
        variant=variant,
        copies=len(group.copies),
        pairs=len(pairs),
        unpaired=len(group.copies) - len(pairs),
        drops=dict(sorted(group.drops.items())),
        served_by=dict(sorted(Counter(p.variant or "" for p, _ in pairs).items())),
        served=served,
        shadow=shadow,
        checked_pairs=len(checked),
        table={"n11": table.n11, "n10": table.n10, "n01": table.n01, "n00": table.n00},
        difference=table.difference,
        difference_ci=paired_difference_ci(table),
        mcnemar_p=test.p_value,
        mcnemar_method=test.method,
        latency_ratio={k: _ratio(shadow.e2e[k], served.e2e[k]) for k in served.e2e},
        latency_pairs=len(timed),
    )


def _checked(rec: Record) -> bool:
    return rec.tool_verdict in ("valid", "invalid")


def _invalid(rec: Record) -> bool:
    return rec.tool_verdict == "invalid"


def _timed(rec: Record) -> bool:
    return rec.outcome == "ok" and rec.e2e_s is not None


def _arm(records: Sequence[Record], invalid: int, checked: int, e2e: Sequence[float]) -> ArmFigures:
    cost: defaultdict[str, float] = defaultdict(float)
    priced: Counter[str] = Counter()
    for rec in records:
        if rec.cost is not None and rec.currency:
            cost[rec.currency] += rec.cost
            priced[rec.currency] += 1
    return ArmFigures(
        errors=sum(rec.outcome in ERROR_OUTCOMES for rec in records),
        invalid=invalid,
        invalid_rate=invalid / checked if checked else None,
        invalid_ci=wilson(invalid, checked),
        e2e={f"p{q}": percentile(e2e, q) for q in PERCENTILES},
        cost_per_1k={c: total / priced[c] * 1000 for c, total in sorted(cost.items())},
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def as_dict(summary: ShadowSummary) -> dict[str, Any]:
    """A summary as plain JSON-ready data (tuples become lists)."""
    data: dict[str, Any] = orjson.loads(orjson.dumps(summary))
    return data


def to_json(summaries: Iterable[ShadowSummary]) -> bytes:
    return orjson.dumps(list(summaries), option=orjson.OPT_INDENT_2)


# --- text ---------------------------------------------------------------------------------------------------


def format_text(summaries: Sequence[ShadowSummary]) -> str:
    """One block per shadowed route for a terminal ('' when there is none)."""
    return "".join(_block(s) for s in summaries)


def _block(s: ShadowSummary) -> str:
    served_by = ", ".join(f"{name} {n}" for name, n in s.served_by.items()) or "none"
    drops = ", ".join(f"{reason} {n}" for reason, n in s.drops.items()) or "none"
    rows = [
        ("", "served", f"shadow ({s.variant})", "shadow ÷ served"),
        (
            "invalid (95% CI)",
            _invalid_cell(s.served, s.checked_pairs),
            _invalid_cell(s.shadow, s.checked_pairs),
            "",
        ),
        ("errors", str(s.served.errors), str(s.shadow.errors), ""),
        *(
            (f"e2e {q} ms", _ms(s.served.e2e[q]), _ms(s.shadow.e2e[q]), _times(s.latency_ratio[q]))
            for q in s.served.e2e
        ),
        ("cost/1k req", _money(s.served.cost_per_1k), _money(s.shadow.cost_per_1k), ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"shadow {s.route}: {s.variant}, {s.pairs} pairs ({s.copies} copies, {s.unpaired} unpaired; served by"
        f" {served_by}); dropped: {drops}",
        *("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows),
        "  " + difference_text(s),
    ]
    return "\n".join(lines) + "\n"


def _invalid_cell(arm: ArmFigures, checked: int) -> str:
    if arm.invalid_rate is None:
        return NO_SAMPLES
    low, high = arm.invalid_ci
    return f"{arm.invalid}/{checked} {arm.invalid_rate:.1%} [{low:.1%}, {high:.1%}]"


def difference_text(s: ShadowSummary) -> str:
    """The paired difference of invalid-call rates with its interval and McNemar's test, in words."""
    if s.difference is None:
        return "paired difference (shadow − served): n/a (no pair with both tool calls checked)"
    low, high = s.difference_ci
    return (
        f"paired difference (shadow − served): {s.difference * 100:+.1f} points [{low * 100:+.1f}, {high * 100:+.1f}],"
        f" McNemar p = {s.mcnemar_p:.2g} ({s.mcnemar_method}; {s.table['n10']} pairs invalid only served,"
        f" {s.table['n01']} only shadow)"
    )


def _ms(value: float | None) -> str:
    return NO_SAMPLES if value is None else f"{value * 1000:.0f}"


def _times(value: float | None) -> str:
    return NO_SAMPLES if value is None else f"{value:.2f}×"


def _money(by_currency: dict[str, float]) -> str:
    if not by_currency:
        return NO_SAMPLES
    return "; ".join(f"{amount(v)} {c}" for c, v in by_currency.items())
