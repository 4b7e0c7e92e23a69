"""The load test's HTML report: one self-contained page (inline CSS and SVG, no script, nothing fetched), readable
offline and fit to hand on. Pure: a result dict (`loadtest.results.summarize`) in, a string out.

Sections: what was run (target, mode, arrival, window, what was sent and how late), the per-variant table, the
expected bands, the paired comparisons, then the plots (`loadtest.svg`): latency distributions per variant
(end to end, time to first token, time per output token, from the 101 quantiles the result keeps), invalid-call
and task-success rates with their 95 % intervals and bands, the paired differences around zero, and cost per
1,000 requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from gateway.loadtest.svg import Bar, Interval, Series, bar_chart, cdf_chart, esc, interval_chart
from gateway.loadtest.text import latency, money, ms, pct, rate_ci

COLOURS: Final = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_CSS: Final = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1150px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .6em;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f6f6f6}.muted{color:#777}.bad{color:#b00;font-weight:600}
.good{color:#070}svg{display:block;margin:.8em 0}svg text{font:12px sans-serif;fill:#333}
"""
_LATENCIES: Final = (
    ("e2e_ms", "End to end"),
    ("ttft_ms", "Time to first token (streams)"),
    ("tpot_ms", "Time per output token after the first (streams)"),
)


def render(doc: Mapping[str, Any]) -> str:
    s, variants = doc["scenario"], doc["variants"]
    colour = {v["variant"]: COLOURS[i % len(COLOURS)] for i, v in enumerate(variants)}
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(s['name'])}: load test</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{esc(s['name'])}</h1><p class=muted>{esc(s['description'])}</p>",
        _summary(doc),
        "<h2>Per variant</h2>",
        _variant_table(variants),
        _bands(variants),
        _paired(doc["paired"], colour),
        "<h2>Latency distributions</h2><p class=muted>Share of requests answered within each time, to p99.</p>",
        *(_cdf(variants, key, title, colour) for key, title in _LATENCIES),
        "<h2>Rates</h2><p class=muted>Dot: measured; whiskers: 95% Wilson interval; green: expected band.</p>",
        _rates(variants, "invalid", "Invalid tool calls (of calls checked)", "invalid_rate", colour),
        _rates(
            variants,
            "success",
            "Task success (the expected call, every argument right)",
            "success_rate",
            colour,
        ),
        "<h2>Cost</h2>",
        _cost(variants, colour),
        _fields(variants),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _summary(doc: Mapping[str, Any]) -> str:
    s, load, window = doc["scenario"], doc["load"], doc["window"]
    pace = (
        f"{s['rate']:g} requests/s, {s['arrival']}" if s["rate"] else f"{s['concurrency']} concurrent clients"
    )
    late = ""
    if load["late_after_ms"] is not None:
        late = f"; {load['late']} started over {load['late_after_ms']:g} ms late (max {ms(load['lateness_ms']['max'])} ms)"
    reference = f", reference {s['reference']}" if s["mode"] == "paired" else ""
    rows = [
        ("target", f"{s['url']}, route {s['route']}"),
        ("mode", f"{s['mode']}{reference}"),
        (
            "request set",
            f"{s['golden']} ({s['golden_rows']} rows), {'stream' if s['stream'] else 'non-stream'}",
        ),
        ("arrival", pace),
        ("window", f"{window['started']} to {window['ended']} (request ids {window['request_id_prefix']}-*)"),
        (
            "sent",
            f"{load['requests']} requests in {load['elapsed_s']:.1f} s = {load['achieved_rate'] or 0:,.1f}/s{late}",
        ),
    ]
    return _table(None, rows)


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    out = ["<table>"]
    if head is not None:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def _variant_table(variants: Sequence[Mapping[str, Any]]) -> str:
    head = ("variant", "requests", "errors", "invalid calls (95% CI)", "task success (95% CI)",
            "valid/invalid/none/truncated", "e2e p50/90/99 ms", "TTFT p50/90/99 ms", "per token p50/90/99 ms",
            "tokens in/out", "cost/request", "cost/1k requests")  # fmt: skip
    rows = [
        (
            v["variant"],
            v["requests"],
            f"{v['errors']['count']} ({pct(v['errors']['rate'])})",
            rate_ci(v["invalid"]),
            rate_ci(v["success"]),
            "/".join(str(v["verdicts"][k]) for k in ("valid", "invalid", "none", "truncated")),
            latency(v["e2e_ms"]),
            latency(v["ttft_ms"]),
            latency(v["tpot_ms"]),
            f"{v['input_tokens']}/{v['output_tokens']}",
            money(v["cost_per_request"]),
            money(v["cost_per_1k_requests"]),
        )
        for v in variants
    ]
    return _table(head, rows)


def _bands(variants: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for v in variants:
        for name, b in v["bands"].items():
            word = ("in band" if b["inside"] else "OUT OF BAND") + (
                "" if b["settled"] else " (the interval crosses an edge)"
            )
            rows.append(
                f"<tr><td>{esc(v['variant'])}</td><td>{esc(name)}</td><td>{pct(b['rate'])}</td>"
                f"<td>[{pct(b['band'][0])}, {pct(b['band'][1])}]</td>"
                f"<td class={'good' if b['inside'] else 'bad'}>{esc(word)}</td></tr>"
            )
    if not rows:
        return ""
    head = "<tr><th>variant</th><th>figure</th><th>measured</th><th>expected</th><th></th></tr>"
    return "<h2>Expected bands</h2><table>" + head + "".join(rows) + "</table>"


def _paired(paired: Sequence[Mapping[str, Any]], colour: Mapping[str, str]) -> str:
    if not paired:
        return ""
    head = ("candidate vs reference", "figure", "pairs", "candidate", "reference", "difference (95% CI)",
            "only reference / only candidate", "McNemar p")  # fmt: skip
    rows = []
    for p in paired:
        for what in ("success", "invalid"):
            f = p[what]
            low, high = f["difference_ci"]
            diff = "-" if f["difference"] is None else f"{f['difference']:+.1%} [{low:+.1%}, {high:+.1%}]"
            rows.append(
                (
                    f"{p['candidate']} vs {p['reference']}",
                    what,
                    f["n"],
                    pct(f["candidate_rate"]),
                    pct(f["reference_rate"]),
                    diff,
                    f"{f['reference_only']} / {f['candidate_only']}",
                    f"{f['p_value']:.3g} ({f['test']})",
                )
            )
    plots = "".join(_difference(paired, what, colour) for what in ("success", "invalid"))
    note = "<p class=muted>Each golden request answered by both variants; rerouted answers are left out.</p>"
    return "<h2>Paired comparisons</h2>" + note + _table(head, rows) + plots


def _difference(paired: Sequence[Mapping[str, Any]], what: str, colour: Mapping[str, str]) -> str:
    rows = [
        Interval(
            p["candidate"],
            colour.get(p["candidate"], "#333"),
            p[what]["difference"],
            low=p[what]["difference_ci"][0],
            high=p[what]["difference_ci"][1],
            text=f"{p[what]['difference']:+.1%} (p={p[what]['p_value']:.2g})",
        )
        for p in paired
        if p[what]["n"]
    ]
    if not rows:
        return ""
    reach = max(0.05, *(max(abs(r.low), abs(r.high)) for r in rows)) * 1.1
    title = f"{what} rate: candidate − {paired[0]['reference']} (paired, 95% interval)"
    return interval_chart(title, rows, -reach, reach, lambda t: f"{t:+.0%}" if reach > 0.1 else f"{t:+.1%}")


def _cdf(variants: Sequence[Mapping[str, Any]], key: str, title: str, colour: Mapping[str, str]) -> str:
    series = [
        Series(v["variant"], colour[v["variant"]], v[key]["quantiles"])
        for v in variants
        if v[key]["quantiles"]
    ]
    return cdf_chart(f"{title} (ms)", series, ms) if series else ""


def _rates(
    variants: Sequence[Mapping[str, Any]], key: str, title: str, band_key: str, colour: Mapping[str, str]
) -> str:
    rows = [
        Interval(
            v["variant"],
            colour[v["variant"]],
            v[key]["rate"],
            low=v[key]["ci"][0],
            high=v[key]["ci"][1],
            text=f"{pct(v[key]['rate'])} [{pct(v[key]['ci'][0])}, {pct(v[key]['ci'][1])}] n={v[key]['n']}",
            band=_band(v["bands"].get(band_key)),
        )
        for v in variants
        if v[key]["n"]
    ]
    if not rows:
        return ""
    edges = [r.high for r in rows] + [r.band[1] for r in rows if r.band is not None]
    hi = min(1.0, max(edges) * 1.1) or 0.05
    return interval_chart(title, rows, 0.0, hi, lambda t: f"{t:.0%}" if hi > 0.1 else f"{t:.1%}")


def _band(declared: Mapping[str, Any] | None) -> tuple[float, float] | None:
    return None if declared is None else (declared["band"][0], declared["band"][1])


def _cost(variants: Sequence[Mapping[str, Any]], colour: Mapping[str, str]) -> str:
    currencies = sorted({c for v in variants for c in v["cost_per_1k_requests"]})
    if not currencies:
        return "<p class=muted>No cost: the scenario names no price table (target.prices).</p>"
    charts = []
    for currency in currencies:
        bars = [
            Bar(
                v["variant"],
                colour[v["variant"]],
                amount,
                f"{amount:.4g} {currency} ({v['requests']} requests)",
            )
            for v in variants
            if (amount := v["cost_per_1k_requests"].get(currency)) is not None
        ]
        charts.append(
            bar_chart(f"Cost per 1,000 requests ({currency}), from usage × price", bars, lambda t: f"{t:.3g}")
        )
    return "".join(charts)


def _fields(variants: Sequence[Mapping[str, Any]]) -> str:
    names = sorted({f for v in variants for f in v["field_accuracy"]})
    if not names:
        return ""
    rows = [
        (v["variant"], *(pct(v["field_accuracy"].get(f)) for f in names))
        for v in variants
        if v["field_accuracy"]
    ]
    return "<h2>Arguments right, per field</h2>" + _table(("variant", *names), rows)
