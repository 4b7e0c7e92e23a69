"""The admin API's adapter operations: swap a variant to another adapter version, roll it back, and answer an
auditor's "what served this route between March and April, trained on what, changed by whom".

A swap pins a variant to a version on top of the policy files (the pin survives restarts, in `state.db`); it
passes the route's release gate, and the version is verified and loaded on the engine before the pin goes live,
so no request meets a version that is not there. A rollback pins the version the variant served before, and is
never gated: getting back to known ground must not be blocked by the checks that guard getting away from it.
"""

from __future__ import annotations

import asyncio
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
from gateway.control.adapters import Catalog, release_gate
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.policy import PolicySnapshot, served_adapters
from gateway.store.request_log import read_records


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
    if "@" not in ref:
        raise BadRequest(
            "'adapter' must name a version, as name@version.", param="adapter", code="invalid_value"
        )
    route, variant = request.path_params["route"], request.path_params["variant"]
    async with ctx.lock:
        _adapter_variant(ctx.live.files, route, variant)
        _gate(ctx.catalog(), ctx.live.files, route, ref)
        return await _pin(ctx, route, variant, ref, action="adapter_swap", actor=actor, reason=reason)


async def _rollback(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request)
    reason, actor = reason_actor(request, body)
    route, variant = request.path_params["route"], request.path_params["variant"]
    async with ctx.lock:
        _adapter_variant(ctx.live.files, route, variant)
        current = served_adapters(ctx.live.view.policy).get((route, variant))
        history = await asyncio.to_thread(ctx.state.history, route, variant)
        previous = next((ref for _, ref, _, _ in history if ref != current), None)
        if previous is None:
            raise Conflict(
                f"{route}/{variant} has served no other adapter version than {current}.", code="no_previous"
            )
        return await _pin(
            ctx, route, variant, previous, action="adapter_rollback", actor=actor, reason=reason
        )


async def _pin(
    ctx: AdminContext, route: str, variant: str, ref: str, *, action: str, actor: str, reason: str
) -> Response:
    before = served_adapters(ctx.live.view.policy).get((route, variant))
    pins = {**ctx.live.pins, (route, variant): ref}
    await ctx.prepare(ctx.live.preview_pins(pins), actor=actor)  # loaded before any request is routed to it
    version = ctx.live.view.policy.version
    saved = await asyncio.to_thread(
        ctx.state.pin, route, variant, ref, action=action, actor=actor, reason=reason, policy_version=version
    )
    view = ctx.live.set_pins(saved)
    await asyncio.to_thread(
        ctx.state.note_served,
        served_adapters(view.policy),
        actor=actor,
        action=action.removeprefix("adapter_"),
    )
    return json_response(
        {
            "action": action,
            "route": route,
            "variant": variant,
            "previous": before,
            "adapter": ref,
            "policy_version": view.policy.version,
        }
    )


def _adapter_variant(policy: PolicySnapshot, route: str, variant: str) -> None:
    r = policy.routes.get(route)
    v = r.variant(variant) if r else None
    if v is None:
        raise NotFound(f"No variant {route}/{variant}.")
    if v.adapter is None:
        raise BadRequest(f"{route}/{variant} serves the model {v.model!r}, not an adapter: nothing to swap.")


def _gate(catalog: Catalog, policy: PolicySnapshot, route: str, ref: str) -> None:
    version = catalog.get(ref)
    if version is None or version.lineage is None or version.problem:
        raise NotFound(
            f"Adapter {ref} is not usable: {version.problem if version else 'not in the catalog'}."
        )
    problem = release_gate(policy.routes[route].release, version.lineage)
    if problem:
        raise Conflict(f"{ref} does not pass the release gate of {route!r}: {problem}", code="release_gate")


async def _lineage(ctx: AdminContext, request: Request) -> Response:
    """What served a route over a window: variants, adapter versions (with their lineage) and policy versions,
    from the request log; and every change made to it (reloads, swaps, rollbacks, kills), from the audit log."""
    route = request.query_params.get("route")
    if not route:
        raise BadRequest("'route' is required.", param="route")
    since = query_number(request, "since", low=0, high=MAX_TIMESTAMP) or 0.0
    given_until = query_number(request, "until", low=0, high=MAX_TIMESTAMP)
    until = float("inf") if given_until is None else given_until
    served = await asyncio.to_thread(_served, ctx.records_db, route, since, until)
    catalog = ctx.catalog()
    for row in served:
        version = catalog.get(row["adapter"]) if row["adapter"] else None
        row["lineage"] = version.lineage.model_dump() if version and version.lineage else None
    audit = await asyncio.to_thread(ctx.state.audit, limit=10_000, since=since)
    changes = [e.as_dict() for e in audit if e.at <= until and e.route in (route, None)]
    return json_response(
        {"route": route, "since": since, "until": until, "served": served, "changes": changes}
    )


def _served(path: Any, route: str, since: float, until: float) -> list[dict[str, Any]]:
    groups: dict[tuple[str | None, str | None, str | None], dict[str, Any]] = {}
    if not path.exists():
        return []
    for rec in read_records(path, route=route, since=since, until=until if until != float("inf") else None):
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
