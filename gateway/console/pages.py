"""The console's two main pages, as markup from data. Routes: each route's variants with their weights,
configured, effective and live shares, kill switches with their buttons, the policy version, and the replicas with
whether they agree. Figures: one route's variants over a window, each beside the route's baseline (requests,
invalid-call rate with its 95 % interval, error rate, latency percentiles, cost per 1,000 requests) and their time
series. Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.console.charts import Line, line_chart, share_bar
from gateway.console.figures import LIVE_S, WINDOWS, Figures, Point, Series
from gateway.console.html import (
    Chrome,
    Html,
    Row,
    action_form,
    filters,
    h,
    join,
    money,
    ms,
    pct,
    rate_ci,
    select,
    table,
    when,
)
from gateway.policy import Route, View


@dataclass(frozen=True, slots=True)
class RoutesData:
    view: View
    shares: Mapping[str, Mapping[str, float]]  # live: route → variant → share of served requests
    counts: Mapping[str, int]  # live: served requests per route
    replicas: Sequence[Mapping[str, Any]]  # `admin.routes.replicas_json`
    answered_by: str
    canaries: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # route → its state, brief


def routes_live(chrome: Chrome, data: RoutesData) -> Html:
    view = data.view
    parts: list[Html] = []
    if view.switches.global_kill:
        parts.append(Html('<p class="error" role="alert">Every route is killed (kill-all).</p>'))
    parts += [_route(chrome, data, name) for name in sorted(view.policy.routes)]
    parts.append(_replicas(data))
    return join(parts)


def _route(chrome: Chrome, data: RoutesData, name: str) -> Html:
    view = data.view
    route = view.policy.routes[name]
    killed = view.switches.route_down(name)
    shares = data.shares.get(name, {})
    flip = "revive" if killed else "kill"
    button = action_form(
        chrome,
        f"/console/actions/{flip}",
        {"route": name},
        label=f"{flip.capitalize()} route",
        does=f"{flip.capitalize()} route {name}",
        danger=not killed,
    )
    bar = share_bar(f"Live share of {name}", [(v.name, shares.get(v.name, 0.0)) for v in route.variants])
    return Html(
        f'<section class="route" data-route="{h(name)}" data-killed="{str(killed).lower()}">'
        f"<h2>{h(name)}{' <span class=badge-killed>killed</span>' if killed else ''}</h2>"
        f'<p class="meta">{_meta(route, view, data)}</p>{button}'
        f'<p class="meta">Live share, last {LIVE_S / 60:.0f} min ({data.counts.get(name, 0)} requests):</p>{bar}'
        + _variants(chrome, view, route, shares)
        + "</section>"
    )


def _meta(route: Route, view: View, data: RoutesData) -> Html:
    bits = [
        f"policy {view.policy.version}",
        f"tool calls {route.tool_calls}",
        f"fallback {', '.join(route.fallback) or 'none'}",
    ]
    canary = data.canaries.get(route.name)
    if canary is not None:
        bits.append(f"canary {canary.get('status', 'starting')} (step {canary.get('step', 0) + 1})")
    if route.shadow is not None:
        bits.append(f"shadow {route.shadow.variant} at {route.shadow.share:g} %")
    return join(" · ".join(bits))


def _variants(chrome: Chrome, view: View, route: Route, shares: Mapping[str, float]) -> Html:
    plan = view.plans[route.name]
    total = sum(v.weight for v in route.variants) or 1.0
    rows = []
    for v in route.variants:
        killed = view.switches.variant_killed(route.name, v.name)
        flip = "revive" if killed else "kill"
        button = action_form(
            chrome,
            f"/console/actions/{flip}",
            {"route": route.name, "variant": v.name},
            label=flip.capitalize(),
            does=f"{flip.capitalize()} {route.name}/{v.name}",
            danger=not killed,
        )
        live = shares.get(v.name, 0.0)
        cells = [
            v.name,
            Html(f"{'killed' if killed else 'live'} {button}"),
            Html(f'<span class="live-share" data-share="{live:.4f}">{pct(live)}</span>'),
            pct(plan.shares.get(v.name, 0.0)),
            pct(v.weight / total),
            f"{v.weight:g}",
            v.adapter or v.model,
        ]
        rows.append(Row(cells, {"data-variant": v.name, "data-state": "killed" if killed else "live"}))
    headers = ["variant", "switch", "live share", "effective", "configured", "weight", "serves"]
    return table(headers, rows, caption=f"Variants of {route.name}")


def _replicas(data: RoutesData) -> Html:
    agree = all(r["in_step"] for r in data.replicas)
    verdict = "they agree" if agree else "they DISAGREE (a replica serves another policy or other switches)"
    rows = [
        Row(
            [
                r["id"] + (" (this page)" if r["id"] == data.answered_by else ""),
                r["host"],
                r["pid"],
                r["policy_version"],
                r["switches"],
                when(r["last_seen"]),
                "yes" if r["in_step"] else "NO",
            ],
            {"data-in-step": str(r["in_step"]).lower()},
        )
        for r in data.replicas
    ]
    headers = ["replica", "host", "pid", "policy", "switches", "last heard", "in step"]
    return Html(
        f'<section class="replicas"><h2>Replicas</h2><p class="meta">{len(data.replicas)} live; {h(verdict)}.</p>'
        + table(headers, rows, caption="Replicas")
        + "</section>"
    )


# --- figures -------------------------------------------------------------------------------------------------


def figures_controls(routes: Sequence[str], route: str, window: str) -> Html:
    return filters(
        "/console/figures",
        [select("route", "Route", routes, route), select("window", "Window", WINDOWS, window)],
    )


@dataclass(frozen=True, slots=True)
class FiguresData:
    route: Route
    baseline: str
    window: str
    since: float
    until: float
    figures: Mapping[str, Figures]
    series: Sequence[Series]


def figures_live(data: FiguresData) -> Html:
    names = [data.baseline] + [v.name for v in data.route.variants if v.name != data.baseline]
    names += sorted(set(data.figures) - set(names))  # variants served in the window that the policy lost
    headers = ["", *(f"{n} (baseline)" if n == data.baseline else n for n in names)]
    rows = [[label, *(cell(data.figures.get(n)) for n in names)] for label, cell in _FIGURE_ROWS]
    charts = [
        _series_chart(data, "Requests per minute", lambda s: s.requests, lambda v: f"{v:.3g}"),
        _series_chart(data, "Invalid-call rate", lambda s: s.invalid_rate, lambda v: f"{v:.0%}"),
        _series_chart(data, "End to end p50", lambda s: s.e2e_p50, lambda v: f"{v * 1000:.0f} ms"),
    ]
    return Html(
        table(headers, rows, caption=f"{data.route.name}, last {data.window}")
        + f'<p class="meta">From {h(when(data.since))} to {h(when(data.until))}; served traffic only '
        "(shadow copies are on the Shadow page). Invalid-call rate: invalid ÷ calls checked, 95 % Wilson "
        "interval.</p>" + join(Html(f'<div class="chart-box">{c}</div>') for c in charts)
    )


def _series_chart(
    data: FiguresData, title: str, pick: Callable[[Series], list[Point]], fmt: Callable[[float], str]
) -> Html:
    lines = [Line(s.variant, pick(s)) for s in data.series]
    return line_chart(f"{title}, {data.route.name}", lines, since=data.since, until=data.until, fmt=fmt)


Cell = Callable[[Figures | None], str]


def _cell(fn: Callable[[Figures], object]) -> Cell:
    def cell(f: Figures | None) -> str:
        return "—" if f is None else str(fn(f))

    return cell


_FIGURE_ROWS: Sequence[tuple[str, Cell]] = (
    ("requests", _cell(lambda f: f.summary.requests)),
    (
        "invalid calls (95 % CI)",
        _cell(
            lambda f: rate_ci(
                f.summary.invalid, f.summary.tool_checked, f.summary.invalid_rate, f.summary.invalid_ci
            )
        ),
    ),
    ("errors", _cell(lambda f: f"{f.summary.errors} ({pct(f.summary.error_rate)})")),
    ("e2e p50 / p90 / p99", _cell(lambda f: " / ".join(ms(f.e2e[q]) for q in ("p50", "p90", "p99")))),
    ("ttft p50 / p90 / p99", _cell(lambda f: " / ".join(ms(f.ttft[q]) for q in ("p50", "p90", "p99")))),
    ("cost per 1,000 requests", _cell(lambda f: money(f.cost_per_1k))),
    ("fallbacks from it", _cell(lambda f: f.summary.fallbacks)),
)
