"""The canary part of `gateway report`: every decided step of every canary, and the drills, from the audit log;
then each active canary's step in progress, looked at from the request log as a gateway process would now.

Each automatic decision's audit entry holds the step's counts, its rates with 95 % Wilson intervals, each
guardrail's statistic and bound (`canary.analysis.describe`), so the report needs nothing but the state database,
read-only (it works while the gateway is down). `rows` is pure; `read_entries`, `read_states` and `running_entries` read the two databases.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from gateway.canary.controller import current_look
from gateway.canary.machine import ACTIVE, CanaryState, canary_key
from gateway.policy import Route
from gateway.store.api import AuditQuery
from gateway.store.request_log import Where
from gateway.store.state import TableStore, open_postgres, open_sqlite

DECISIONS: Final = ("canary_advance", "canary_promote", "canary_kill", "canary_hold")
RUNNING: Final = "canary_running"  # not an audit action: the step in progress, computed when the report runs
WITH_NUMBERS: Final = (*DECISIONS, RUNNING)
_HEADERS: Final = (
    "route",
    "at (UTC)",
    "action",
    "step",
    "candidate invalid (95% CI)",
    "baseline invalid (95% CI)",
    "errors cand/base",
    "invalid M/bound",
    "error M/bound",
    "latency ratio",
    "cost ratio",
    "actor: reason",
)


def read_entries(
    state_db: Where, route: str | None = None, since: float | None = None
) -> list[dict[str, Any]]:
    """Canary and drill audit entries, oldest first ([] when there is no state database)."""
    if isinstance(state_db, Path) and not state_db.exists():
        return []
    with _reading(state_db) as store:
        query = AuditQuery(None, route, since or 0.0, ("canary_%", "drill"), oldest_first=True)
        found = store.audit(query)
    keys = ("at", "actor", "action", "route", "variant", "reason")
    return [{**{k: getattr(e, k) for k in keys}, "detail": e.detail or {}} for e in found]


def read_states(state_db: Where) -> dict[str, CanaryState]:
    """The canaries' state rows, read-only ({} without a state database or before any canary started)."""
    if isinstance(state_db, Path) and not state_db.exists():
        return {}
    with _reading(state_db) as store:
        return store.canary_states()


@contextmanager
def _reading(state_db: Where) -> Iterator[TableStore]:
    """The state store read-only: SQLite's file, or the Postgres database (without migrating it)."""
    store = (
        open_sqlite(state_db, readonly=True)
        if isinstance(state_db, Path)
        else open_postgres(state_db, readonly=True)
    )
    try:
        yield store
    finally:
        store.close()


def running_entries(
    routes: Mapping[str, Route], states: Mapping[str, CanaryState], records: Where, now: float
) -> list[dict[str, Any]]:
    """One entry per active canary of `routes` for its step in progress (no decision yet), shaped like a decision's
    audit entry so that it prints as one more row: the numbers a gateway process would decide on now."""
    out: list[dict[str, Any]] = []
    for name, route in sorted(routes.items()):
        state, spec = states.get(name), route.canary
        if spec is None or state is None or state.status not in ACTIVE or state.key != canary_key(route):
            continue
        since = dt.datetime.fromtimestamp(state.step_started_at, dt.UTC).strftime("%H:%M:%S")
        what = "shadow phase" if state.status == "shadow" else "step"
        out.append(
            {
                "at": now,
                "actor": "canary",
                "action": RUNNING,
                "route": name,
                "variant": spec.candidate,
                "reason": f"{state.status}, {what} in progress since {since}: no decision yet",
                "detail": current_look(records, route, spec, state, now),
            }
        )
    return out


def rows(entries: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [_row(e) for e in entries]


def _row(e: dict[str, Any]) -> tuple[str, ...]:
    d = e["detail"]
    when = dt.datetime.fromtimestamp(e["at"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    action = str(e["action"]).removeprefix("canary_")
    if e["action"] == "drill":
        ms = d.get("time_to_baseline_ms")
        return (e["route"] or "-", when, "drill", "-", f"{e['variant']} killed: back on baseline in {ms:.0f} ms",
                "", "", "", "", "", "", f"{e['actor']}: {e['reason'] or ''}")  # fmt: skip
    if e["action"] not in WITH_NUMBERS:  # start and operators' actions: the reason says what happened
        return (e["route"] or "-", when, action, _step(d.get("to", d)), "", "", "", "", "", "", "",
                f"{e['actor']}: {e['reason'] or ''}")  # fmt: skip
    checks = {c["guardrail"]: c for c in d.get("checks", [])}
    cand, base = d.get("candidate", {}), d.get("baseline", {})
    return (
        e["route"] or "-",
        when,
        action,
        _step(d),
        _rate(cand),
        _rate(base),
        f"{cand.get('errors', 0)}/{base.get('errors', 0)}",
        _test(checks.get("invalid_call_rate")),
        _test(checks.get("error_rate")),
        _ratio(checks.get("latency_per_output_token")),
        _ratio(checks.get("cost_per_request")),
        f"{e['actor']}: {e['reason'] or ''}",
    )


def _step(d: dict[str, Any]) -> str:
    if d.get("phase") == "shadow":
        return "shadow"
    step, share = d.get("step"), d.get("share")
    if step is None:
        return "-"
    return f"{step + 1} ({share:.0%})" if isinstance(share, int | float) else str(step + 1)


def _rate(arm: dict[str, Any]) -> str:
    n = arm.get("checked", arm.get("requests"))  # the shadow phase: pairs whose two verdicts were checked
    if not n:
        return "-"
    low, high = arm["invalid_ci"]
    return f"{arm['invalid']}/{n} {arm['invalid_rate']:.1%} [{low:.1%}, {high:.1%}]"


def _test(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    stat = check["statistic"]
    shown = stat if isinstance(stat, str) else f"{stat:.3g}"
    return f"{shown}/{check['bound']:.3g} {check['verdict']}"


def _ratio(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    stat = check["statistic"]
    shown = "n/a" if stat is None else (stat if isinstance(stat, str) else f"{stat:.2f}")
    return f"{shown}≤{check['bound']:g} {check['verdict']}"


def format_table(entries: list[dict[str, Any]]) -> str:
    """One line per canary decision, operator action and drill, oldest first (and the steps in progress last)."""
    if not entries:
        return ""
    table = [_HEADERS, *rows(entries)]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (
        "canaries and drills (from the audit log; `running`: the step in progress, looked at now):\n"
        + "\n".join(lines)
        + "\n"
    )
