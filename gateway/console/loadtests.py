"""The load-test runs the console lists: one directory per run under `GATEWAY_LOADTEST_DIR` (where `gateway
loadtest` writes `result.json` and `report.html`), their page, and the only way from a run's name to its report's
file. A name is a single path segment of letters, digits, `.`, `_` and `-` not starting with a dot, and the file
must resolve to `<dir>/<name>/report.html` itself (a symbolic link leading elsewhere is refused), so no request
reaches a file outside a run's directory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import orjson

from gateway.console.html import Html, h, table, when

NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
RESULT: Final = "result.json"
REPORT: Final = "report.html"


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    scenario: str
    route: str
    mode: str
    started_at: float | None
    requests: int | None
    variants: tuple[str, ...]
    has_report: bool


def runs(root: Path) -> list[Run]:
    """Every run directory under `root`, newest first (a directory without a readable result is listed by
    name)."""
    if not root.is_dir():
        return []
    found = [_run(d) for d in root.iterdir() if NAME.fullmatch(d.name) and d.is_dir()]
    return sorted(found, key=lambda r: (r.started_at or 0.0, r.name), reverse=True)


def _run(path: Path) -> Run:
    doc: dict[str, Any] = {}
    try:
        loaded = orjson.loads((path / RESULT).read_bytes())
        doc = loaded if isinstance(loaded, dict) else {}
    except (OSError, orjson.JSONDecodeError):
        pass
    scenario = doc.get("scenario") or {}
    window = doc.get("window") or {}
    overall = doc.get("overall") or {}
    return Run(
        name=path.name,
        scenario=str(scenario.get("name", "")),
        route=str(scenario.get("route", "")),
        mode=str(scenario.get("mode", "")),
        started_at=window.get("started_at"),
        requests=overall.get("requests"),
        variants=tuple(str(v.get("variant")) for v in doc.get("variants") or () if isinstance(v, dict)),
        has_report=(path / REPORT).is_file(),
    )


def report_path(root: Path, name: str) -> Path | None:
    """The report of run `name`, or None when there is none (or the name could lead anywhere else)."""
    if not NAME.fullmatch(name):
        return None
    base = root.resolve()
    run = (base / name).resolve()
    if run.parent != base:
        return None
    report = (run / REPORT).resolve()
    if report.parent != run or not report.is_file():
        return None
    return report


def loadtests_live(root: Path, found: Sequence[Run]) -> Html:
    if not found:
        return Html(f'<p class="meta">No load-test runs in {h(str(root))}.</p>')
    rows = [
        [
            _link(r),
            r.scenario,
            r.route,
            r.mode,
            when(r.started_at),
            "" if r.requests is None else r.requests,
            ", ".join(r.variants),
        ]
        for r in found
    ]
    return table(
        ["run", "scenario", "route", "mode", "started", "requests", "variants"],
        rows,
        caption=f"Load-test runs in {root}",
    )


def _link(r: Run) -> Html:
    if not r.has_report:
        return h(r.name)
    return Html(f'<a href="/console/loadtests/{quote(r.name)}/report.html">{h(r.name)}</a>')
