"""Load-test results for a terminal: the per-variant table, the paired comparisons, and what changed between two
runs (`gateway loadtest compare A.json B.json`). Pure: result dicts (`loadtest.results.summarize`) in, text out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final


def pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def rate_ci(figure: Mapping[str, Any]) -> str:
    if not figure["n"]:
        return "-"
    low, high = figure["ci"]
    return f"{figure['count']}/{figure['n']} {pct(figure['rate'])} [{pct(low)}, {pct(high)}]"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def money(by_currency: Mapping[str, float], digits: int = 4) -> str:
    if not by_currency:
        return "-"
    return "; ".join(f"{amount:.{digits}g} {currency}" for currency, amount in sorted(by_currency.items()))


def latency(figure: Mapping[str, Any]) -> str:
    return "/".join(ms(figure[q]) for q in ("p50", "p90", "p99"))


_HEADERS: Final = (
    "variant",
    "requests",
    "errors",
    "invalid (95% CI)",
    "success (95% CI)",
    "e2e p50/90/99 ms",
    "ttft p50/90/99 ms",
    "tpot p50/90/99 ms",
    "tokens in/out",
    "cost/1k req",
)


def _row(v: Mapping[str, Any]) -> tuple[str, ...]:
    return (
        v["variant"],
        str(v["requests"]),
        f"{v['errors']['count']} ({pct(v['errors']['rate'])})",
        rate_ci(v["invalid"]),
        rate_ci(v["success"]),
        latency(v["e2e_ms"]),
        latency(v["ttft_ms"]),
        latency(v["tpot_ms"]),
        f"{v['input_tokens']}/{v['output_tokens']}",
        money(v["cost_per_1k_requests"]),
    )


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_result(doc: Mapping[str, Any]) -> str:
    s, load = doc["scenario"], doc["load"]
    pace = f"{s['rate']:g}/s {s['arrival']}" if s["rate"] else f"{s['concurrency']} concurrent"
    lines = [
        f"{s['name']}: {s['mode']} on route {s['route']} at {s['url']} ({pace}, "
        f"{'stream' if s['stream'] else 'non-stream'})",
        f"{load['requests']} requests in {load['elapsed_s']:.1f}s = {load['achieved_rate'] or 0:,.1f}/s"
        + (
            f"; {load['late']} started late (> {load['late_after_ms']:g} ms)"
            if load["late_after_ms"] is not None
            else ""
        ),
        "",
        table([_HEADERS, *(_row(v) for v in doc["variants"])]),
    ]
    lines += _bands(doc["variants"])
    if doc["paired"]:
        lines += ["", "paired (candidate − reference, 95% CI, McNemar p):"]
        lines += [_paired_line(p) for p in doc["paired"]]
    return "\n".join(lines) + "\n"


def _bands(variants: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    for v in variants:
        for name, b in v["bands"].items():
            verdict = "in band" if b["inside"] else "OUT OF BAND"
            sure = "" if b["settled"] else " (not settled by the 95% interval)"
            out.append(
                f"  {v['variant']}: {name} {pct(b['rate'])} vs [{pct(b['band'][0])}, {pct(b['band'][1])}]: {verdict}{sure}"
            )
    return ["", "bands:", *out] if out else []


def _paired_line(p: Mapping[str, Any]) -> str:
    parts = []
    for what in ("success", "invalid"):
        f = p[what]
        if not f["n"]:
            parts.append(f"{what}: no pairs")
            continue
        low, high = f["difference_ci"]
        parts.append(
            f"{what} {pct(f['candidate_rate'])} vs {pct(f['reference_rate'])}: {f['difference']:+.1%} "
            f"[{low:+.1%}, {high:+.1%}] p={f['p_value']:.3g} ({f['test']}, {f['n']} pairs, "
            f"{f['reference_only']}/{f['candidate_only']} discordant)"
        )
    return f"  {p['candidate']} vs {p['reference']}: " + "; ".join(parts)


# --- compare two runs -----------------------------------------------------------------------------------------

_Figure = Callable[[Mapping[str, Any]], float | None]
_COMPARED: Final[tuple[tuple[str, _Figure, str], ...]] = (
    ("requests", lambda v: v["requests"], "n"),
    ("error rate", lambda v: v["errors"]["rate"], "rate"),
    ("invalid rate", lambda v: v["invalid"]["rate"], "rate"),
    ("success rate", lambda v: v["success"]["rate"], "rate"),
    ("e2e p50 ms", lambda v: v["e2e_ms"]["p50"], "ms"),
    ("e2e p99 ms", lambda v: v["e2e_ms"]["p99"], "ms"),
    ("ttft p50 ms", lambda v: v["ttft_ms"]["p50"], "ms"),
    ("tpot p50 ms", lambda v: v["tpot_ms"]["p50"], "ms"),
    ("output tokens/req", lambda v: v["output_tokens"] / v["requests"] if v["requests"] else None, "n"),
)


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """What changed from run A to run B: all requests together, then each variant present in either (rates with
    whether their 95 % intervals still overlap)."""
    va = {a["overall"]["variant"]: a["overall"]} | {v["variant"]: v for v in a["variants"]}
    vb = {b["overall"]["variant"]: b["overall"]} | {v["variant"]: v for v in b["variants"]}
    lines = [
        f"A: {a['scenario']['name']} {a['window']['started']} ({a['load']['requests']} requests)",
        f"B: {b['scenario']['name']} {b['window']['started']} ({b['load']['requests']} requests)",
    ]
    rows: list[tuple[str, ...]] = [("variant", "figure", "A", "B", "change")]
    for name in [*va, *(n for n in vb if n not in va)]:
        if name not in va or name not in vb:
            rows.append((name, "(only in " + ("A" if name in va else "B") + ")", "", "", ""))
            continue
        rows += [
            (name, label, *_change(get(va[name]), get(vb[name]), kind)) for label, get, kind in _COMPARED
        ]
        rows += _cost_rows(name, va[name], vb[name])
        rows += _overlap_rows(name, va[name], vb[name])
    return "\n".join([*lines, "", table(rows)]) + "\n"


def _change(x: float | None, y: float | None, kind: str) -> tuple[str, str, str]:
    show = pct if kind == "rate" else ms if kind == "ms" else (lambda v: "-" if v is None else f"{v:g}")
    if x is None or y is None:
        return show(x), show(y), ""
    if kind == "rate":
        return show(x), show(y), f"{(y - x) * 100:+.1f} pts"
    relative = f"{(y - x) / x:+.1%}" if x else ""
    return show(x), show(y), f"{y - x:+.1f} ms ({relative})" if kind == "ms" and x else relative


def _cost_rows(name: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for currency in sorted(set(a["cost_per_request"]) | set(b["cost_per_request"])):
        x, y = a["cost_per_request"].get(currency), b["cost_per_request"].get(currency)
        change = f"{(y - x) / x:+.1%}" if x and y is not None else ""
        rows.append(
            (
                name,
                f"cost/req {currency}",
                money({currency: x} if x is not None else {}, 3),
                money({currency: y} if y is not None else {}, 3),
                change,
            )
        )
    return rows


def _overlap_rows(name: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for what in ("invalid", "success"):
        fa, fb = a[what], b[what]
        if fa["n"] and fb["n"] and (fa["ci"][1] < fb["ci"][0] or fb["ci"][1] < fa["ci"][0]):
            rows.append((name, f"{what}: 95% intervals do not overlap", rate_ci(fa), rate_ci(fb), "changed"))
    return rows
