"""What each console page reads, gathered into the pages' data: the live view, the request log (every replica's
records, on either backend), the state store (replicas, the audit log, canary rows) and the adapter catalog.
Blocking: the routes call these in a worker thread. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gateway.admin.adapters import served_versions
from gateway.admin.http import AdminContext
from gateway.admin.routes import adapter_versions, replicas_json
from gateway.admin.shadow import overrides_json
from gateway.console.canary_page import CanaryData
from gateway.console.figures import LIVE_S, baseline_of, live_counts, live_shares, series, variant_figures
from gateway.console.history_pages import AdaptersData, AuditFilters
from gateway.console.pages import FiguresData, RoutesData
from gateway.console.shadow_page import ShadowData
from gateway.console.trajectory import trajectories
from gateway.errors import NotFound
from gateway.policy import Route
from gateway.records import Record
from gateway.shadow import pairs
from gateway.store.api import AuditEntry, AuditQuery
from gateway.store.request_log import Where, read_records, served_counts

AUDIT_LIMIT = 500  # entries on one page


def records(
    where: Where, *, route: str | None = None, since: float | None = None, until: float | None = None
) -> list[Record]:
    return read_records(where, route=route, since=since, until=until) if _written(where) else []


def _written(where: Where) -> bool:
    """False for a SQLite request log no request has been written to yet (reading it would fail)."""
    return not isinstance(where, Path) or where.exists()


def route_of(ctx: AdminContext, name: str) -> Route:
    route = ctx.ops.live.view.policy.routes.get(name)
    if route is None:
        raise NotFound(f"No route {name!r}.", param="route")
    return route


def routes_data(ctx: AdminContext, now: float) -> RoutesData:
    view = ctx.ops.live.view
    recent = served_counts(ctx.records, since=now - LIVE_S) if _written(ctx.records) else {}
    replicas = ctx.ops.store.replicas(now - ctx.replica_window_s)
    states = ctx.ops.store.canary_states()
    canaries = {
        name: {"status": s.status, "step": s.step}
        for name, s in states.items()
        if name in view.policy.routes and view.policy.routes[name].canary is not None
    }
    return RoutesData(
        view=view,
        shares=live_shares(recent),
        counts=live_counts(recent),
        replicas=replicas_json(replicas),
        answered_by=ctx.replica_id,
        canaries=canaries,
    )


def figures_data(ctx: AdminContext, route_name: str, window: str, seconds: float, now: float) -> FiguresData:
    route = route_of(ctx, route_name)
    since = now - seconds
    found = records(ctx.records, route=route_name, since=since)
    return FiguresData(
        route=route,
        baseline=baseline_of(route),
        window=window,
        since=since,
        until=now,
        figures=variant_figures(found),
        series=series(found, since, now),
    )


def canary_data(ctx: AdminContext, now: float) -> list[CanaryData]:
    out = []
    for name, status in sorted(ctx.ops.canaries.status().items()):
        route = ctx.ops.live.view.policy.routes.get(name)
        state = status.get("state")
        found = []
        if route is not None and route.canary is not None and state is not None:
            rows = records(ctx.records, route=name, since=state["epoch"])
            found = trajectories(
                route.canary,
                rows,
                epoch=state["epoch"],
                step_started_at=state["step_started_at"],
                shadow=state["status"] == "shadow",
            )
        query = AuditQuery(limit=200, route=name, actions=("canary_%", "drill"))
        out.append(CanaryData(name, status, found, ctx.ops.store.audit(query), now))
    return out


def shadow_data(ctx: AdminContext, window: str, seconds: float, now: float) -> ShadowData:
    policy = ctx.ops.live.view.policy
    found = records(ctx.records, since=now - seconds)
    return ShadowData(
        window=window,
        specs={name: route.shadow for name, route in policy.routes.items()},
        in_flight={name: ctx.shadow_in_flight(name) for name in policy.routes},
        summaries=pairs.summarize(found),
        overrides=overrides_json(ctx.ops.live),
    )


def adapters_data(ctx: AdminContext, route: str, window: str, seconds: float, now: float) -> AdaptersData:
    versions = adapter_versions(ctx)
    since = now - seconds
    served = served_versions(ctx.records, route, since, now) if route else []
    changes = ctx.ops.store.audit(AuditQuery(limit=AUDIT_LIMIT, since=since)) if route else []
    return AdaptersData(
        versions=versions,
        route=route,
        window=window,
        served=served,
        changes=[e for e in changes if e.route in (route, None)],
    )


def audit_entries(ctx: AdminContext, f: AuditFilters, seconds: float, now: float) -> Sequence[AuditEntry]:
    query = AuditQuery(
        limit=AUDIT_LIMIT,
        route=f.route or None,
        since=now - seconds,
        actions=(f.action,) if f.action else (),
    )
    entries = ctx.ops.store.audit(query)
    return [e for e in entries if not f.actor or e.actor == f.actor]
