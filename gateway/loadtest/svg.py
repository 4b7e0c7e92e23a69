"""Three small SVG charts for the load-test report, drawn by hand so the page needs nothing from the network: an
empirical CDF (lines), intervals (a dot and a whisker per row, an optional shaded band, an optional zero line)
and bars. Pure: data in, SVG text out; every label is HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

W, LEFT, RIGHT, TOP, BOTTOM, ROW = 680, 110, 230, 34, 34, 26
Format = Callable[[float], str]


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    colour: str
    quantiles: Sequence[float]  # values at 0, 1, ..., 100 %


@dataclass(frozen=True, slots=True)
class Interval:
    name: str
    colour: str
    point: float
    low: float
    high: float
    text: str  # printed at the right
    band: tuple[float, float] | None = None  # shaded: where the value is expected


@dataclass(frozen=True, slots=True)
class Bar:
    name: str
    colour: str
    value: float
    text: str


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k."""
    span = hi - lo
    if span <= 0 or not math.isfinite(span):
        return [lo]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _scale(lo: float, hi: float, a: float, b: float) -> Callable[[float], float]:
    span = (hi - lo) or 1.0
    return lambda v: a + (min(max(v, lo), hi) - lo) / span * (b - a)


def _frame(title: str, height: int, body: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" role="img" '
        f'aria-label="{esc(title)}"><text x="4" y="16" style="font-weight:600">{esc(title)}</text>{body}</svg>'
    )


def _x_axis(lo: float, hi: float, x: Callable[[float], float], fmt: Format, y0: float) -> str:
    out = [f'<line x1="{LEFT}" y1="{y0}" x2="{W - RIGHT}" y2="{y0}" stroke="#999"/>']
    out.extend(
        f'<line x1="{x(t):.1f}" y1="{y0}" x2="{x(t):.1f}" y2="{y0 + 4}" stroke="#999"/>'
        f'<text x="{x(t):.1f}" y="{y0 + 16}" text-anchor="middle">{esc(fmt(t))}</text>'
        for t in nice_ticks(lo, hi)
    )
    return "".join(out)


def cdf_chart(title: str, series: Sequence[Series], fmt: Format, height: int = 240) -> str:
    """Share of requests at or under each value, one line per series, cut at the largest p99 (the last 1 % of a
    tail would squash the rest of the plot)."""
    hi = max((s.quantiles[99] for s in series), default=1.0) or 1.0
    lo = min((s.quantiles[0] for s in series), default=0.0)
    # Start at 0 unless every value sits far from it (a 150 ms engine): then at a round value below the fastest.
    lo = 0.0 if lo < 0.3 * hi else nice_ticks(0, lo, 4)[-1]
    x, y = _scale(lo, hi, LEFT, W - RIGHT), _scale(0, 1, height - BOTTOM, TOP)
    grid = "".join(
        f'<line x1="{LEFT}" y1="{y(f):.1f}" x2="{W - RIGHT}" y2="{y(f):.1f}" stroke="#eee"/>'
        f'<text x="{LEFT - 6}" y="{y(f) + 4:.1f}" text-anchor="end">{f:.0%}</text>'
        for f in (0, 0.5, 0.9, 0.99)
    )
    lines = "".join(
        f'<polyline fill="none" stroke="{s.colour}" stroke-width="1.8" points="'
        + " ".join(f"{x(q):.1f},{y(i / 100):.1f}" for i, q in enumerate(s.quantiles[:100]))
        + '"/>'
        for s in series
    )
    legend = "".join(
        f'<rect x="{W - RIGHT + 12}" y="{TOP + 16 * i}" width="10" height="10" fill="{s.colour}"/>'
        f'<text x="{W - RIGHT + 26}" y="{TOP + 9 + 16 * i}">{esc(s.name)}</text>'
        for i, s in enumerate(series)
    )
    return _frame(title, height, grid + _x_axis(lo, hi, x, fmt, height - BOTTOM) + lines + legend)


def interval_chart(title: str, rows: Sequence[Interval], lo: float, hi: float, fmt: Format) -> str:
    height = TOP + ROW * len(rows) + BOTTOM
    x = _scale(lo, hi, LEFT, W - RIGHT)
    out = []
    if lo < 0 < hi:
        out.append(
            f'<line x1="{x(0):.1f}" y1="{TOP - 8}" x2="{x(0):.1f}" y2="{height - BOTTOM}" stroke="#999" stroke-dasharray="3,3"/>'
        )
    for i, r in enumerate(rows):
        cy = TOP + ROW // 2 + ROW * i
        if r.band is not None:
            width = max(1.5, x(r.band[1]) - x(r.band[0]))
            out.append(
                f'<rect x="{x(r.band[0]):.1f}" y="{cy - 9}" width="{width:.1f}" height="18" fill="#2ca02c" opacity=".18"/>'
            )
        out.append(
            f'<text x="{LEFT - 8}" y="{cy + 4}" text-anchor="end">{esc(r.name)}</text>'
            f'<line x1="{x(r.low):.1f}" y1="{cy}" x2="{x(r.high):.1f}" y2="{cy}" stroke="{r.colour}" stroke-width="2"/>'
            f'<line x1="{x(r.low):.1f}" y1="{cy - 5}" x2="{x(r.low):.1f}" y2="{cy + 5}" stroke="{r.colour}"/>'
            f'<line x1="{x(r.high):.1f}" y1="{cy - 5}" x2="{x(r.high):.1f}" y2="{cy + 5}" stroke="{r.colour}"/>'
            f'<circle cx="{x(r.point):.1f}" cy="{cy}" r="4" fill="{r.colour}"/>'
            f'<text x="{W - RIGHT + 12}" y="{cy + 4}">{esc(r.text)}</text>'
        )
    return _frame(title, height, "".join(out) + _x_axis(lo, hi, x, fmt, height - BOTTOM))


def bar_chart(title: str, rows: Sequence[Bar], fmt: Format) -> str:
    height = TOP + ROW * len(rows) + BOTTOM
    hi = max((r.value for r in rows), default=1.0) * 1.1 or 1.0
    x = _scale(0, hi, LEFT, W - RIGHT)
    out = [
        f'<text x="{LEFT - 8}" y="{TOP + ROW // 2 + ROW * i + 4}" text-anchor="end">{esc(r.name)}</text>'
        f'<rect x="{LEFT}" y="{TOP + ROW // 2 + ROW * i - 8}" width="{x(r.value) - LEFT:.1f}" height="16" fill="{r.colour}"/>'
        f'<text x="{W - RIGHT + 12}" y="{TOP + ROW // 2 + ROW * i + 4}">{esc(r.text)}</text>'
        for i, r in enumerate(rows)
    ]
    return _frame(title, height, "".join(out) + _x_axis(0, hi, x, fmt, height - BOTTOM))
