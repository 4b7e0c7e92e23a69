"""The operators' API under `/admin/`: kill switches, policy reload, status and the audit trail.

Every route needs `Authorization: Bearer $GATEWAY_ADMIN_TOKEN` (compared in constant time); with no token
configured the admin API is disabled and answers 403. A flip is checked against the live policy first (unknown
route or variant → 404; a flip that would leave a route with no live variant → 409 unless `"force": true`), then
written with its audit entry in one SQLite transaction, and only then published to the live view, so the next
request sees it. A reload goes live only once its audit entry is committed. Every body is read and checked whole
(`admin_http.read_body`) before anything changes. Writes are serialised by one lock per process.
"""

from __future__ import annotations

import asyncio
import sqlite3
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
from gateway.control.adapters import AdapterRejected
from gateway.errors import (
    ConfigError,
    Conflict,
    EngineError,
    GatewayError,
    NotFound,
)
from gateway.policy import PolicySnapshot, View, build_view, newly_dark, served_adapters, with_pins
from gateway.store.state import Flip, StateStore, apply_flip


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
    force = body.flag("force")
    flip = Flip(scope, killed, request.path_params.get("route", ""), request.path_params.get("variant", ""))  # type: ignore[arg-type]
    async with ctx.lock:
        view = ctx.live.view
        _check_target(view, flip)
        proposed = build_view(view.policy, apply_flip(view.switches, flip))
        dark = newly_dark(view, proposed)
        if dark and not force:
            raise Conflict(
                f"This would leave {', '.join(repr(r) for r in dark)} with no live variant; "
                'send "force": true to do it anyway (their requests then get 503).',
                code="last_live_variant",
            )
        switches = await asyncio.to_thread(
            ctx.state.apply, flip, actor=who, reason=reason, policy_version=view.policy.version
        )
        now = ctx.live.set_switches(switches)
    return json_response(
        {
            "action": flip.action,
            "route": flip.route or None,
            "variant": flip.variant or None,
            "switches": _switches_json(now),
            "routes": _routes_json(now, ctx.counters),
        }
    )


def _check_target(view: View, flip: Flip) -> None:
    if flip.scope == "global":
        return
    route = view.policy.routes.get(flip.route)
    if route is None:
        raise NotFound(f"No route {flip.route!r}.")
    if flip.scope == "variant" and route.variant(flip.variant) is None:
        raise NotFound(f"Route {flip.route!r} has no variant {flip.variant!r}.")


async def _reload(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request)
    reason = body.text("reason", max_chars=MAX_REASON_CHARS) or None
    who = actor_of(request, body)
    async with ctx.lock:
        before = ctx.live.view.policy.version
        try:
            policy = await asyncio.to_thread(ctx.reload)
            # New adapter versions are loaded before traffic moves to them (pinned versions stay pinned).
            await ctx.prepare(with_pins(policy, ctx.live.pins), actor=who)
        except (ConfigError, AdapterRejected, EngineError) as err:
            await asyncio.to_thread(
                ctx.state.record, "reload_rejected", actor=who, reason=err.message, policy_version=before
            )
            raise
        # The audit entry is committed before the new policy goes live: if it cannot be written, nothing changed.
        served = served_adapters(with_pins(policy, ctx.live.pins))
        await asyncio.to_thread(_audit_reload, ctx.state, policy, served, who, reason, before)
        view = ctx.live.set_policy(policy)
    return json_response(
        {
            "policy_version": view.policy.version,
            "previous_version": before,
            "routes": sorted(view.policy.routes),
        }
    )


def _audit_reload(
    state: StateStore,
    policy: PolicySnapshot,
    served: dict[tuple[str, str], str],
    actor: str,
    reason: str | None,
    before: str,
) -> None:
    """The reload's audit entry and the adapter versions it serves, in one transaction."""
    try:
        with state.transaction() as tx:
            tx.note_served(served, actor=actor, action="reload")
            tx.audit(
                "reload",
                actor=actor,
                reason=reason,
                policy_version=policy.version,
                detail={"previous_version": before, "routes": sorted(policy.routes)},
            )
    except sqlite3.Error as err:
        raise GatewayError(
            f"The reload's audit entry could not be written ({err}); the policy in force did not change.",
            code="audit_failed",
        ) from None


async def _status(ctx: AdminContext, request: Request) -> Response:
    view = ctx.live.view
    return json_response(
        {
            "policy_version": view.policy.version,
            "switches": _switches_json(view),
            "routes": _routes_json(view, ctx.counters),
        }
    )


async def _audit(ctx: AdminContext, request: Request) -> Response:
    limit = query_number(request, "limit", low=1, high=MAX_AUDIT_LIMIT, integer=True)
    entries = await asyncio.to_thread(
        ctx.state.audit,
        limit=int(limit or 100),
        route=request.query_params.get("route"),
        since=query_number(request, "since", low=0, high=MAX_TIMESTAMP),
    )
    return json_response({"entries": [e.as_dict() for e in entries]})


async def _adapters(ctx: AdminContext, request: Request) -> Response:
    """Every version in the catalog with its lineage, and which live variants reference it."""
    used: dict[str, list[str]] = {}
    for name, route in ctx.live.view.policy.routes.items():
        for v in route.variants:
            if v.adapter:
                used.setdefault(v.adapter, []).append(f"{name}/{v.name}")
    versions = [{**v.summary(), "referenced_by": used.get(v.ref, [])} for v in ctx.catalog()]
    return json_response({"adapters": versions})


def _switches_json(view: View) -> dict[str, Any]:
    s = view.switches
    return {
        "global_kill": s.global_kill,
        "routes": sorted(s.routes),
        "variants": [{"route": r, "variant": v} for r, v in sorted(s.variants)],
    }


def _routes_json(view: View, counters: Counter[tuple[str, str, str, str]]) -> dict[str, Any]:
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
