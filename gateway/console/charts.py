"""The console's charts: SVG drawn on the server, no script. Time series (lines broken where a bucket has no
sample, an optional bound drawn dashed, a linear or logarithmic axis) and a stacked bar of shares. Colours come
from the stylesheet (`s0`…`s7` classes), so the SVG carries no inline style. Pure: data in, markup out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.console.html import Html, h

WIDTH: Final = 640
HEIGHT: Final = 200
LEFT, RIGHT, TOP, BOTTOM = 60, 12, 40, 22
COLOURS: Final = 8  # classes s0..s7
LOG_FLOOR: Final = 1e-2  # the smallest value a logarithmic axis shows


@dataclass(frozen=True, slots=True)
class Line:
    label: str
    points: Sequence[tuple[float, float | None]]  # (time, value); None: no sample there


def colour(i: int) -> str:
    return f"s{i % COLOURS}"


def line_chart(
    title: str,
    lines: Sequence[Line],
    *,
    since: float,
    until: float,
    fmt: Callable[[float], str],
    bound: float | None = None,
    log: bool = False,
) -> Html:
    values = [v for line in lines for _, v in line.points if v is not None]
    if bound is not None:
        values.append(bound)
    low, high = _range(values, log)
    scale = _Scale(since, until, low, high, log)
    paths = [
        f'<path class="line {colour(i)}" d="{_path(line.points, scale)}"><title>{h(line.label)}</title></path>'
        + _dots(line.points, scale, colour(i))
        for i, line in enumerate(lines)
    ]
    return Html(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{h(title)}">'
        f"<title>{h(title)}</title>"
        f'<text class="chart-title" x="4" y="14">{h(title)}</text>'
        + (_legend(lines) if len(lines) > 1 else "")
        + _axes(scale, fmt)
        + (_bound(bound, scale, fmt) if bound is not None else "")
        + "".join(paths)
        + ("" if values else f'<text class="muted" x="{LEFT + 8}" y="{TOP + 30}">no samples yet</text>')
        + "</svg>"
    )


def _range(values: Sequence[float], log: bool) -> tuple[float, float]:
    if log:
        positive = [max(v, LOG_FLOOR) for v in values] or [1.0]
        return min(min(positive), 1.0), max(max(positive) * 2, 10.0)
    return 0.0, max(max(values, default=0.0) * 1.15, 1e-9)


class _Scale:
    def __init__(self, since: float, until: float, low: float, high: float, log: bool) -> None:
        self.since, self.until, self.low, self.high, self.log = since, until, low, high, log

    def x(self, t: float) -> float:
        span = max(self.until - self.since, 1e-9)
        return LEFT + (WIDTH - LEFT - RIGHT) * min(1.0, max(0.0, (t - self.since) / span))

    def y(self, v: float) -> float:
        if self.log:
            lo, hi, v = math.log10(self.low), math.log10(self.high), math.log10(max(v, LOG_FLOOR))
        else:
            lo, hi = self.low, self.high
        return HEIGHT - BOTTOM - (HEIGHT - TOP - BOTTOM) * (v - lo) / (hi - lo)


def _path(points: Sequence[tuple[float, float | None]], scale: _Scale) -> str:
    parts: list[str] = []
    pen_up = True
    for t, v in points:
        if v is None:
            pen_up = True
            continue
        parts.append(f"{'M' if pen_up else 'L'}{scale.x(t):.1f},{scale.y(v):.1f}")
        pen_up = False
    return " ".join(parts)


def _dots(points: Sequence[tuple[float, float | None]], scale: _Scale, klass: str) -> str:
    """A dot per sample: a bucket alone between empty ones has no line to be seen on."""
    return "".join(
        f'<circle class="swatch {klass}" cx="{scale.x(t):.1f}" cy="{scale.y(v):.1f}" r="2"/>'
        for t, v in points
        if v is not None
    )


def _axes(scale: _Scale, fmt: Callable[[float], str]) -> str:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    span = scale.until - scale.since  # the ends' labels must tell them apart: seconds, or the date
    clock = "%H:%M:%S" if span < 3600 else "%H:%M" if span < 86_400 else "%m-%d %H:%M"
    return (
        f'<path class="axis" d="M{LEFT},{TOP} L{LEFT},{bottom} L{right},{bottom}"/>'
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{h(fmt(scale.high))}</text>'
        f'<text class="tick" x="{LEFT - 4}" y="{bottom}" text-anchor="end">{h(fmt(scale.low))}</text>'
        f'<text class="tick" x="{LEFT}" y="{HEIGHT - 4}">{_clock(scale.since, clock)}</text>'
        f'<text class="tick" x="{right}" y="{HEIGHT - 4}" text-anchor="end">{_clock(scale.until, clock)} UTC</text>'
    )


def _bound(bound: float, scale: _Scale, fmt: Callable[[float], str]) -> str:
    y = scale.y(bound)
    return (
        f'<path class="bound" d="M{LEFT},{y:.1f} L{WIDTH - RIGHT},{y:.1f}"><title>bound {h(fmt(bound))}</title></path>'
        f'<text class="tick" x="{WIDTH - RIGHT - 2}" y="{y - 3:.1f}" text-anchor="end">bound {h(fmt(bound))}</text>'
    )


def _legend(lines: Sequence[Line]) -> str:
    items = []
    x = LEFT
    for i, line in enumerate(lines):
        items.append(
            f'<rect class="swatch {colour(i)}" x="{x}" y="20" width="10" height="10"/>'
            f'<text class="tick" x="{x + 14}" y="29">{h(line.label)}</text>'
        )
        x += 24 + 7 * len(line.label)
    return "".join(items)


def _clock(t: float, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(t))


def share_bar(label: str, shares: Sequence[tuple[str, float]]) -> Html:
    """A horizontal bar split by share (each 0..1), in the order given."""
    x = 0.0
    parts = []
    for i, (name, share) in enumerate(shares):
        width = 100 * max(0.0, share)
        parts.append(
            f'<rect class="swatch {colour(i)}" x="{x:.2f}" y="0" width="{width:.2f}" height="10">'
            f"<title>{h(name)} {share:.1%}</title></rect>"
        )
        x += width
    return Html(
        f'<svg class="share" viewBox="0 0 100 10" preserveAspectRatio="none" role="img" aria-label="{h(label)}">'
        + "".join(parts)
        + "</svg>"
    )
