"""The admin API's adapter routes: swap a variant to another adapter version, roll it back, and answer an
auditor's "what served this route between March and April, trained on what, changed by whom".

A swap pins a variant to a version on top of the policy files (the pin survives restarts, in the state store); it
passes the route's release gate, and the version is verified and loaded on the engine before the pin goes live,
so no request meets a version that is not there. A rollback pins the version the variant served before, and is
never gated. Both are `control.operations`' work; the handlers parse and render.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.admin.http import (
    MAX_TIMESTAMP,
    AdminContext,
    guard,
    json_response,
    query_number,
    read_body,
    reason_actor,
)
from gateway.control.operations import Pinned
from gateway.errors import BadRequest
from gateway.store.api import AuditQuery
from gateway.store.request_log import Where, read_records


def adapter_routes(ctx: AdminContext) -> list[Route]:
    base = "/admin/routes/{route}/variants/{variant}/adapter"
    return [
        Route(base, guard(ctx, _swap), methods=["POST"]),
        Route(base + "/rollback", guard(ctx, _rollback), methods=["POST"]),
        Route("/admin/lineage", guard(ctx, _lineage), methods=["GET"]),
    ]


async def _swap(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request, "adapter")
    reason, actor = reason_actor(request, body)
    ref = body.required_text("adapter")
    route, variant = request.path_params["route"], request.path_params["variant"]
    return _pinned(await ctx.ops.swap(route, variant, ref, actor=actor, reason=reason))


async def _rollback(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request)
    reason, actor = reason_actor(request, body)
    route, variant = request.path_params["route"], request.path_params["variant"]
    return _pinned(await ctx.ops.rollback(route, variant, actor=actor, reason=reason))


def _pinned(done: Pinned) -> Response:
    return json_response(
        {
            "action": done.action,
            "route": done.route,
            "variant": done.variant,
            "previous": done.previous,
            "adapter": done.adapter,
            "policy_version": done.policy_version,
        }
    )


async def _lineage(ctx: AdminContext, request: Request) -> Response:
    """What served a route over a window: variants, adapter versions (with their lineage) and policy versions,
    from the request log; and every change made to it (reloads, swaps, rollbacks, kills), from the audit log."""
    route = request.query_params.get("route")
    if not route:
        raise BadRequest("'route' is required.", param="route")
    since = query_number(request, "since", low=0, high=MAX_TIMESTAMP) or 0.0
    given_until = query_number(request, "until", low=0, high=MAX_TIMESTAMP)
    until = float("inf") if given_until is None else given_until
    served = await asyncio.to_thread(served_versions, ctx.records, route, since, until)
    catalog = ctx.catalog()
    for row in served:
        version = catalog.get(row["adapter"]) if row["adapter"] else None
        row["lineage"] = version.lineage.model_dump() if version and version.lineage else None
    audit = await asyncio.to_thread(ctx.ops.store.audit, AuditQuery(limit=10_000, since=since))
    changes = [e.as_dict() for e in audit if e.at <= until and e.route in (route, None)]
    return json_response(
        {"route": route, "since": since, "until": until, "served": served, "changes": changes}
    )


def served_versions(where: Where, route: str, since: float, until: float) -> list[dict[str, Any]]:
    groups: dict[tuple[str | None, str | None, str | None], dict[str, Any]] = {}
    if isinstance(where, Path) and not where.exists():
        return []
    for rec in read_records(where, route=route, since=since, until=until if until != float("inf") else None):
        if rec.shadow:  # a shadow copy served nobody
            continue
        key = (rec.variant, rec.adapter, rec.policy_version)
        row = groups.setdefault(
            key,
            {
                "variant": rec.variant,
                "adapter": rec.adapter,
                "policy_version": rec.policy_version,
                "requests": 0,
                "first": rec.ts,
                "last": rec.ts,
            },
        )
        row["requests"] += 1
        row["first"], row["last"] = min(row["first"], rec.ts), max(row["last"], rec.ts)
    return sorted(groups.values(), key=lambda r: (r["first"], str(r["variant"])))
