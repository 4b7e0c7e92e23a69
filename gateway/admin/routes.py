"""The operators' API under `/admin/`: kill switches, policy reload, status and the audit trail; the table of
every admin route (`admin_routes`).

Every route needs `Authorization: Bearer $GATEWAY_ADMIN_TOKEN` (compared in constant time); with no token
configured the admin API is disabled and answers 403. Handlers only parse and render: every body is read and
checked whole (`admin.http.read_body`) before anything changes, and the change itself is `control.operations`'
(unknown route or variant → 404; a flip that would leave a route with no live variant → 409 unless
`"force": true`; written with its audit entry before it goes live).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.admin.adapters import adapter_routes
from gateway.admin.http import (
    MAX_AUDIT_LIMIT,
    MAX_REASON_CHARS,
    MAX_TIMESTAMP,
    AdminContext,
    actor_of,
    authorize,
    guard,
    json_response,
    query_number,
    read_body,
    reason_actor,
)
from gateway.admin.shadow import overrides_json
from gateway.policy import Flip, View
from gateway.store.api import AuditQuery, Replica


def admin_routes(ctx: AdminContext) -> list[Route]:
    def flip_endpoint(scope: str, killed: bool) -> Any:
        async def endpoint(request: Request) -> Response:
            return await _flip(ctx, request, scope, killed)

        return endpoint

    return [
        Route(
            "/admin/routes/{route}/variants/{variant}/kill", flip_endpoint("variant", True), methods=["POST"]
        ),
        Route(
            "/admin/routes/{route}/variants/{variant}/revive",
            flip_endpoint("variant", False),
            methods=["POST"],
        ),
        Route("/admin/routes/{route}/kill", flip_endpoint("route", True), methods=["POST"]),
        Route("/admin/routes/{route}/revive", flip_endpoint("route", False), methods=["POST"]),
        Route("/admin/kill-all", flip_endpoint("global", True), methods=["POST"]),
        Route("/admin/revive-all", flip_endpoint("global", False), methods=["POST"]),
        Route("/admin/reload", guard(ctx, _reload), methods=["POST"]),
        Route("/admin/status", guard(ctx, _status), methods=["GET"]),
        Route("/admin/audit", guard(ctx, _audit), methods=["GET"]),
        Route("/admin/adapters", guard(ctx, _adapters), methods=["GET"]),
        *adapter_routes(ctx),
    ]


async def _flip(ctx: AdminContext, request: Request, scope: str, killed: bool) -> Response:
    authorize(ctx, request)
    body = await read_body(request, "force")
    reason, who = reason_actor(request, body)
    params = request.path_params
    flip = Flip(scope, killed, params.get("route", ""), params.get("variant", ""))  # type: ignore[arg-type]
    now = await ctx.ops.flip(flip, actor=who, reason=reason, force=body.flag("force"))
    return json_response(
        {
            "action": flip.action,
            "route": flip.route or None,
            "variant": flip.variant or None,
            "switches": switches_json(now),
            "routes": routes_json(now, ctx.counters),
        }
    )


async def _reload(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request)
    reason = body.text("reason", max_chars=MAX_REASON_CHARS) or None
    before, view = await ctx.ops.reload(actor=actor_of(request, body), reason=reason)
    return json_response(
        {
            "policy_version": view.policy.version,
            "previous_version": before,
            "routes": sorted(view.policy.routes),
        }
    )


async def _status(ctx: AdminContext, request: Request) -> Response:
    view = ctx.ops.live.view
    replicas = await asyncio.to_thread(ctx.ops.store.replicas, time.time() - ctx.replica_window_s)
    return json_response(
        {
            "policy_version": view.policy.version,
            "switches": switches_json(view),
            "routes": routes_json(view, ctx.counters),
            "shadow_overrides": overrides_json(ctx.ops.live),
            "answered_by": ctx.replica_id,
            "replicas": replicas_json(replicas),
            "engines": ctx.engines(),
        }
    )


def replicas_json(replicas: list[Replica]) -> list[dict[str, Any]]:
    """Each live replica, flagged `in_step` when it serves what most replicas serve (policy and switches)."""
    served = Counter((r.policy_version, r.switches) for r in replicas)
    common = max(served, key=lambda key: (served[key], key)) if served else None
    return [{**dataclasses.asdict(r), "in_step": (r.policy_version, r.switches) == common} for r in replicas]


async def _audit(ctx: AdminContext, request: Request) -> Response:
    limit = query_number(request, "limit", low=1, high=MAX_AUDIT_LIMIT, integer=True)
    since = query_number(request, "since", low=0, high=MAX_TIMESTAMP)
    query = AuditQuery(int(limit or 100), request.query_params.get("route"), since)
    entries = await asyncio.to_thread(ctx.ops.store.audit, query)
    return json_response({"entries": [e.as_dict() for e in entries]})


async def _adapters(ctx: AdminContext, request: Request) -> Response:
    return json_response({"adapters": adapter_versions(ctx)})


def adapter_versions(ctx: AdminContext) -> list[dict[str, Any]]:
    """Every version in the catalog with its lineage, and which live variants reference it."""
    used: dict[str, list[str]] = {}
    for name, route in ctx.ops.live.view.policy.routes.items():
        for v in route.variants:
            if v.adapter:
                used.setdefault(v.adapter, []).append(f"{name}/{v.name}")
    return [{**v.summary(), "referenced_by": used.get(v.ref, [])} for v in ctx.catalog()]


def switches_json(view: View) -> dict[str, Any]:
    s = view.switches
    return {
        "global_kill": s.global_kill,
        "routes": sorted(s.routes),
        "variants": [{"route": r, "variant": v} for r, v in sorted(s.variants)],
    }


def routes_json(view: View, counters: Counter[tuple[str, str, str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, plan in view.plans.items():
        route = plan.route
        total = sum(v.weight for v in route.variants) or 1.0
        out[name] = {
            "killed": view.switches.route_down(name),
            "live": plan.live,
            "fallback": list(route.fallback),
            "tool_calls": route.tool_calls,
            "variants": {
                v.name: {
                    "model": v.model,
                    "engine": v.engine,
                    "weight": v.weight,
                    "configured_share": v.weight / total,
                    "effective_share": plan.shares.get(v.name, 0.0),
                    "killed": view.switches.variant_killed(name, v.name),
                    "requests": _counts(counters, name, v.name),
                }
                for v in route.variants
            },
        }
    return out


def _counts(counters: Counter[tuple[str, str, str, str]], route: str, variant: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for (r, v, outcome, verdict), n in list(counters.items()):
        if r == route and v == variant:
            total["total"] += n
            total[outcome] += n
            if verdict in ("invalid", "truncated"):
                total[f"tool_calls_{verdict}"] += n
    return dict(total)
