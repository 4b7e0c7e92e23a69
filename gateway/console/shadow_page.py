"""The console's shadow page, as markup from data: each route's `[shadow]` as the live policy has it, its copies
in flight here, and the paired comparison of the shadow variant with what users were served over the window
(`shadow.pairs`: invalid-call rates with 95 % intervals, the paired difference with McNemar's test, errors,
latency percentiles and their ratio, cost per 1,000 requests, drops), and the operators' runtime overrides. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.console.figures import WINDOWS
from gateway.console.html import Html, filters, h, join, money, ms, rate_ci, select, table, when
from gateway.policy import ShadowSpec
from gateway.shadow.pairs import ShadowSummary, difference_text


@dataclass(frozen=True, slots=True)
class ShadowData:
    window: str
    specs: Mapping[str, ShadowSpec | None]  # route → its [shadow]
    in_flight: Mapping[str, int]
    summaries: Sequence[ShadowSummary]
    overrides: Sequence[Mapping[str, Any]] = ()  # operators' runtime overrides (`shadow.overrides.status`)


def shadow_controls(window: str) -> Html:
    return filters("/console/shadow", [select("window", "Window", WINDOWS, window)])


def shadow_live(data: ShadowData) -> Html:
    configured = [
        [route, spec.variant, f"{spec.share:g} %", spec.max_in_flight, data.in_flight.get(route, 0)]
        for route, spec in sorted(data.specs.items())
        if spec is not None
    ]
    parts = [
        table(
            ["route", "shadow variant", "share copied", "max in flight", "in flight here"],
            configured,
            caption="Shadow traffic in the live policy",
        )
    ]
    if data.overrides:
        parts.append(_overrides(data.overrides))
    if not data.summaries:
        parts.append(Html(f'<p class="meta">No shadow copies in the last {h(data.window)}.</p>'))
    parts += [_summary(s) for s in data.summaries]
    return join(parts)


def _overrides(found: Sequence[Mapping[str, Any]]) -> Html:
    rows = [
        [
            o["route"],
            o["mode"],
            o["variant"],
            "policy's" if o["share"] is None else f"{o['share']:g} %",
            o["actor"],
            o["reason"],
            when(o["at"]),
            f"stale: {o['problem']}" if o["stale"] else "applied",
        ]
        for o in found
    ]
    return table(
        ["route", "override", "variant", "share", "by", "reason", "since", "state"],
        rows,
        caption="Operators' overrides (gateway shadow start|stop; clear gives the policy's [shadow] back)",
    )


def _summary(s: ShadowSummary) -> Html:
    served_by = ", ".join(f"{v} {n}" for v, n in sorted(s.served_by.items())) or "none"
    drops = ", ".join(f"{r} {n}" for r, n in sorted(s.drops.items())) or "none"
    rows: list[Sequence[object]] = [
        [
            "invalid calls (95 % CI)",
            rate_ci(s.served.invalid, s.checked_pairs, s.served.invalid_rate, s.served.invalid_ci),
            rate_ci(s.shadow.invalid, s.checked_pairs, s.shadow.invalid_rate, s.shadow.invalid_ci),
            "",
        ],
        ["errors", s.served.errors, s.shadow.errors, ""],
        *(
            [f"e2e {q}", ms(s.served.e2e[q]), ms(s.shadow.e2e[q]), _times(s.latency_ratio[q])]
            for q in s.served.e2e
        ),
        ["cost per 1,000 requests", money(s.served.cost_per_1k), money(s.shadow.cost_per_1k), ""],
    ]
    return Html(
        f'<section class="shadow" data-route="{h(s.route)}"><h2>{h(s.route)}: {h(s.variant)} in shadow</h2>'
        f'<p class="meta">{s.pairs} pairs ({s.copies} copies, {s.unpaired} unpaired); served by {h(served_by)}; '
        f"dropped: {h(drops)}.</p>"
        + table(
            ["", "served", f"shadow ({s.variant})", "shadow ÷ served"],
            rows,
            caption=f"Shadow pairs of {s.route}",
        )
        + f'<p class="meta">{h(difference_text(s))}</p></section>'
    )


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"
