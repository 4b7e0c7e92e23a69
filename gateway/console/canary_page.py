"""The console's canary page, as markup from data: per route with a canary, its steps and state, the operators'
buttons (pause, resume, promote, abort), the current look (each guardrail's statistic against its bound, each
arm's counts with 95 % intervals), a chart per guardrail of its statistic over time against its bound, and the
history of decisions with the evidence each was made on. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.canary.analysis import RATES
from gateway.canary.machine import operations
from gateway.console.charts import Line, line_chart
from gateway.console.html import Chrome, Html, Row, action_form, h, join, number, pct, table, when
from gateway.console.trajectory import Trajectory
from gateway.store.api import AuditEntry


@dataclass(frozen=True, slots=True)
class CanaryData:
    route: str
    status: Mapping[str, Any]  # `CanaryController.status()[route]`
    trajectories: Sequence[Trajectory]
    history: Sequence[AuditEntry]  # newest first
    until: float


def canaries_live(chrome: Chrome, canaries: Sequence[CanaryData]) -> Html:
    if not canaries:
        return Html('<p class="meta">No route declares a canary.</p>')
    return join(_canary(chrome, c) for c in canaries)


def _canary(chrome: Chrome, c: CanaryData) -> Html:
    s = c.status
    state = s.get("state")
    steps = " → ".join(f"{x:g}" for x in s["steps"]) + " %"
    where = "not started yet (it starts at the next look)"
    if state is not None and state["status"] == "shadow":
        where = (
            f"shadow phase before step 1 since {when(state['step_started_at'])}: the candidate answers copies "
            "and serves nobody"
        )
    elif state is not None:
        share = s["steps"][state["step"]]
        where = (
            f"{state['status']}, step {state['step'] + 1} of {len(s['steps'])} ({share:g} %) since "
            f"{when(state['step_started_at'])}"
        )
    buttons = join(
        action_form(
            chrome,
            f"/console/actions/canary/{op}",
            {"route": c.route},
            label=op.capitalize(),
            does=f"{op.capitalize()} the canary of {c.route}",
            danger=op in ("abort", "promote"),
        )
        for op in (operations(state["status"]) if state is not None else ())
    )
    return Html(
        f'<section class="canary" data-route="{h(c.route)}">'
        f"<h2>{h(c.route)}: {h(s['candidate'])} against {h(s['baseline'])}</h2>"
        f'<p class="meta">Steps {h(steps)}; unit {h(s["unit"])}; on failure {h(s["on_fail"])}.</p>'
        f'<p class="state" data-status="{h(state["status"] if state else "")}">{h(where)}</p>'
        f'<div class="buttons">{buttons}</div>' + _look(c) + _charts(c, state) + _history(c) + "</section>"
    )


def _look(c: CanaryData) -> Html:
    look = c.status.get("look")
    if look is None:
        return Html('<p class="meta">No look: the canary is not running.</p>')
    minimums = look["minimums"]
    shadow = look.get("phase") == "shadow"
    if shadow:
        pairs = look["pairs"]
        progress = (
            f"Shadow phase: pairs {minimums['pairs'][0]} of {minimums['pairs'][1]} ({pairs['waiting']} copies or "
            f"requests waiting for their other side, {pairs['unpaired']} copies unpaired); requests routed to "
            f"the candidate {look['users_served']}. Candidate = its copies, baseline = what users got."
        )
    else:
        progress = (
            f"Step minimums: candidate requests {minimums['candidate_requests'][0]} of "
            f"{minimums['candidate_requests'][1]}, minutes {minimums['minutes'][0]:.1f} of "
            f"{minimums['minutes'][1]:g}."
        )
    head = (
        f'<h3>Now: <span class="outcome" data-outcome="{h(look["outcome"])}">{h(look["outcome"])}</span></h3>'
        f'<p class="meta">{h(progress)}</p>'
    )
    rows = [_paired_row(check) if shadow else _check_row(check) for check in look["checks"]]
    guardrails = table(
        ["guardrail", "statistic", "bound", "verdict", "candidate", "baseline", "P(candidate worse)"],
        rows,
        caption=f"Guardrails of {c.route}",
    )
    arms = table(
        [
            "arm (this step)",
            "requests",
            "invalid (95 % CI)",
            "errors (95 % CI)",
            "s per token, median",
            "cost, median",
        ],
        [_arm_row(name, {**_NO_MEDIANS, **look[name]}) for name in ("candidate", "baseline")],
        caption=f"Arms of {c.route}",
    )
    return Html(head + guardrails + arms)


def _check_row(check: Mapping[str, Any]) -> Row:
    if check["guardrail"] in RATES:
        cand = f"{check['candidate_events']} of {check['candidate_requests']}"
        base = f"{check['baseline_events']} of {check['baseline_requests']}"
    else:
        cand = f"median {number(check.get('candidate_median'))} ({check['candidate_samples']} samples)"
        base = f"median {number(check.get('baseline_median'))} ({check['baseline_samples']} samples)"
    return _row(check, cand, base, pct(check.get("p_candidate_worse")))


def _paired_row(check: Mapping[str, Any]) -> Row:
    """A guardrail of the shadow phase: the discordant pairs of a rate, or the median of the per-pair ratios."""
    statistic = check["statistic"]
    if check["guardrail"] in RATES:
        cand = f"{check['candidate_only']} pairs only the candidate's"
        base = f"{check['baseline_only']} pairs only the baseline's"
    else:
        cand = f"median ratio {number(statistic)} over {check['pairs']} pairs"
        low, high = check.get("ratio_low"), check.get("ratio_high")
        base = "" if low is None else f"95 % interval {number(low)} to {number(high)}"
    return _row(check, cand, base, "")


def _row(check: Mapping[str, Any], cand: str, base: str, worse: str) -> Row:
    """A guardrail's row: its statistic against its bound and verdict, each arm's counts, P(candidate worse)."""
    statistic = check["statistic"]
    cells = [check["guardrail"], _stat(statistic), f"{check['bound']:g}", check["verdict"], cand, base, worse]
    attrs = {
        "data-guardrail": check["guardrail"],
        "data-statistic": str(statistic),
        "data-bound": str(check["bound"]),
    }
    return Row(cells, attrs)


_NO_MEDIANS: Mapping[str, Any] = {"latency_per_token_median": None, "cost_median": None}  # the pairs' arms


def _arm_row(name: str, arm: Mapping[str, Any]) -> list[object]:
    def ci(x: int, rate: float | None, bounds: Sequence[float]) -> str:
        return "n/a" if rate is None else f"{x} {rate:.1%} [{bounds[0]:.1%}, {bounds[1]:.1%}]"

    return [
        name,
        arm["requests"],
        ci(arm["invalid"], arm["invalid_rate"], arm["invalid_ci"]),
        ci(arm["errors"], arm["error_rate"], arm["error_ci"]),
        number(arm["latency_per_token_median"]),
        number(arm["cost_median"]),
    ]


def _charts(c: CanaryData, state: Mapping[str, Any] | None) -> Html:
    if state is None:
        return Html("")
    since = state["epoch"]
    charts = [
        line_chart(
            f"{t.guardrail} of {c.route}: statistic against its bound",
            [Line("statistic", t.points)],
            since=since,
            until=max(c.until, since + 1),
            fmt=number,
            bound=t.bound,
            log=t.guardrail in RATES,
        )
        for t in c.trajectories
    ]
    return Html(
        "<h3>Guardrails over time</h3>"
        '<p class="meta">Rate tests over the whole canary (logarithmic; it fails when the statistic reaches '
        "1/α); ratios of medians over the current step.</p>"
        + join(Html(f'<div class="chart-box">{chart}</div>') for chart in charts)
    )


def _history(c: CanaryData) -> Html:
    rows = [[when(e.at), e.action, e.actor, e.reason or "", _evidence(e.id, e.detail)] for e in c.history]
    return Html(
        "<h3>Decisions</h3>"
        + table(
            ["time", "action", "actor", "reason", "evidence"], rows, caption=f"Canary decisions of {c.route}"
        )
    )


def _evidence(key: int, detail: Mapping[str, Any] | None) -> Html:
    if not detail or "checks" not in detail:
        return Html("")
    lines = join(
        Html(
            f"<li>{h(ch['guardrail'])}: {h(_stat(ch['statistic']))} against {h(number(ch['bound']))}, {h(ch['verdict'])}</li>"
        )
        for ch in detail["checks"]
    )
    step = detail.get("step")
    where = f"step {step + 1 if isinstance(step, int) else '?'}"
    if detail.get("phase") == "shadow":
        where = f"shadow phase, {detail.get('users_served', '?')} requests served by the candidate"
    summary = f"{where}, {detail.get('outcome', '')}"
    return Html(f'<details data-key="c{key}"><summary>{h(summary)}</summary><ul>{lines}</ul></details>')


def _stat(value: Any) -> str:
    return "∞" if value == "inf" else number(value)
