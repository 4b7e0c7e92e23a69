"""The console's pages of what changed, as markup from data: the audit log with its filters, and the adapter
catalog with one route's lineage over a window (which variants, adapter versions and policy versions served it,
and every change made to it). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.console.figures import WINDOWS
from gateway.console.html import Html, filters, h, join, select, table, text_input, when
from gateway.store.api import AuditEntry


@dataclass(frozen=True, slots=True)
class AuditFilters:
    route: str
    action: str  # a LIKE pattern (`canary_%`), or "" for any
    actor: str  # exact, or "" for any
    window: str


def audit_controls(routes: Sequence[str], f: AuditFilters) -> Html:
    return filters(
        "/console/audit",
        [
            select("route", "Route", routes, f.route, blank="any"),
            text_input("action", "Action (% matches any text)", f.action),
            text_input("actor", "Actor", f.actor),
            select("window", "Window", WINDOWS, f.window),
        ],
    )


def audit_live(entries: Sequence[AuditEntry]) -> Html:
    return changes_table(entries, caption="Audit log, newest first")


def changes_table(entries: Sequence[AuditEntry], *, caption: str) -> Html:
    rows = [
        [
            when(e.at),
            e.actor,
            e.action,
            _target(e),
            e.reason or "",
            e.policy_version or "",
            _detail(e.id, e.detail),
        ]
        for e in entries
    ]
    headers = ["time", "actor", "action", "target", "reason", "policy", "detail"]
    if not rows:
        return Html(f'<p class="meta">{h(caption)}: no entries.</p>')
    return table(headers, rows, caption=caption)


def _target(e: AuditEntry) -> str:
    if e.route and e.variant:
        return f"{e.route}/{e.variant}"
    return e.route or ("all routes" if e.action in ("kill_all", "revive_all") else "")


def _detail(key: int, detail: Mapping[str, Any] | None) -> Html:
    if not detail:
        return Html("")
    text = orjson.dumps(detail, option=orjson.OPT_INDENT_2).decode()
    return Html(f'<details data-key="a{key}"><summary>detail</summary><pre>{h(text)}</pre></details>')


@dataclass(frozen=True, slots=True)
class AdaptersData:
    versions: Sequence[Mapping[str, Any]]  # `AdapterVersion.summary()` with `referenced_by`
    route: str
    window: str
    served: Sequence[Mapping[str, Any]]  # `admin.adapters.served_versions`
    changes: Sequence[AuditEntry]


def adapters_controls(routes: Sequence[str], route: str, window: str) -> Html:
    return filters(
        "/console/adapters",
        [select("route", "Lineage of route", routes, route), select("window", "Window", WINDOWS, window)],
    )


def adapters_live(data: AdaptersData) -> Html:
    catalog = table(
        [
            "version",
            "base model",
            "dataset",
            "created",
            "approvers",
            "golden-set invalid rate",
            "problem",
            "used by",
        ],
        [_version_row(v) for v in data.versions],
        caption="Adapter catalog",
    )
    served = table(
        ["variant", "adapter", "policy", "requests", "first", "last"],
        [
            [
                r["variant"] or "",
                r["adapter"] or "",
                r["policy_version"] or "",
                r["requests"],
                when(r["first"]),
                when(r["last"]),
            ]
            for r in data.served
        ],
        caption=f"What served {data.route}, last {data.window}",
    )
    changes = changes_table(data.changes, caption=f"Changes to {data.route}, last {data.window}")
    return join(
        [Html("<h2>Catalog</h2>"), catalog, Html(f"<h2>Lineage of {h(data.route)}</h2>"), served, changes]
    )


def _version_row(v: Mapping[str, Any]) -> list[object]:
    lineage = v.get("lineage") or {}
    evaluation = lineage.get("evaluation") or {}
    rate = evaluation.get("invalid_call_rate")
    return [
        v["ref"],
        lineage.get("base_model", ""),
        f"{lineage.get('dataset_rows', '')} rows, {str(lineage.get('dataset_sha256', ''))[:12]}"
        if lineage
        else "",
        lineage.get("created", ""),
        ", ".join(lineage.get("approvers", [])),
        "" if rate is None else f"{rate:.1%} of {evaluation.get('n')}",
        v.get("problem") or "",
        ", ".join(v.get("referenced_by", [])),
    ]
