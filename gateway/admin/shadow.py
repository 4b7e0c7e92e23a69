"""The operators' shadow API (bearer admin token, errors in OpenAI's envelope like every admin route):

- `GET /admin/shadow/{route}?since=&until=` (Unix seconds; default: the whole request log): the route's shadow in
  force (`shadow`: the policy's `[shadow]` with the override applied), the one its policy declares (`declared`),
  the operators' override (`override`, with `stale` and the `problem` when it no longer fits the policy), this
  process's copies in flight, and the paired comparison of each shadow variant with what the route's users were
  served over the window (`shadow.pairs`), read from the request log, so every replica's copies are in it. 404 for
  a route the live policy does not have (unless a stale override still names it).
- `POST /admin/shadow/{route}/start` `{"variant", "share"?, "reason"}`, `/stop` `{"variant", "reason"}`,
  `/clear` `{"reason"}`: the runtime overrides of `shadow.overrides`, audited as `shadow_start`, `shadow_stop`,
  `shadow_clear`; the answer is the route's shadow state afterwards. 404 for an unknown route or variant; 400 for a
  share outside (0, 100]; 409 `shadow_mismatch` / `no_shadow` for a stop that names another variant than the one
  in force, or none; 409 `no_override` for a clear with nothing to clear; 503 `audit_failed` and nothing changed
  when the audit entry cannot be written.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from gateway.control.live import LiveView
from gateway.errors import NotFound
from gateway.policy import PolicySnapshot
from gateway.records import Record
from gateway.shadow import overrides, pairs
from gateway.store.request_log import Where, read_records


def shadow_routes(ctx: AdminContext) -> list[Route]:
    return [
        Route("/admin/shadow/{route}", guard(ctx, _shadow), methods=["GET"]),
        Route("/admin/shadow/{route}/start", guard(ctx, _start), methods=["POST"]),
        Route("/admin/shadow/{route}/stop", guard(ctx, _stop), methods=["POST"]),
        Route("/admin/shadow/{route}/clear", guard(ctx, _clear), methods=["POST"]),
    ]


async def _shadow(ctx: AdminContext, request: Request) -> Response:
    name = request.path_params["route"]
    live = ctx.ops.live
    if name not in live.view.policy.routes and name not in live.shadow_overrides:
        raise NotFound(f"No route {name!r}.", param="route")
    since = query_number(request, "since", low=0, high=MAX_TIMESTAMP)
    until = query_number(request, "until", low=0, high=MAX_TIMESTAMP)
    records = await asyncio.to_thread(_read, ctx.records, name, since, until)
    summaries = await asyncio.to_thread(pairs.summarize, records)
    return json_response(
        {
            "route": name,
            "since": since,
            "until": until,
            **shadow_state(live, name),
            "in_flight": ctx.shadow_in_flight(name),
            "summaries": [pairs.as_dict(s) for s in summaries],
        }
    )


async def _start(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request, "variant", "share")
    reason, actor = reason_actor(request, body)
    variant, share = body.required_text("variant"), body.optional_number("share", maximum=100)
    name = request.path_params["route"]
    await ctx.ops.shadow_start(name, variant, share, actor=actor, reason=reason)
    return _changed(ctx, "shadow_start", name)


async def _stop(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request, "variant")
    reason, actor = reason_actor(request, body)
    variant = body.required_text("variant")
    name = request.path_params["route"]
    await ctx.ops.shadow_stop(name, variant, actor=actor, reason=reason)
    return _changed(ctx, "shadow_stop", name)


async def _clear(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request)
    reason, actor = reason_actor(request, body)
    name = request.path_params["route"]
    await ctx.ops.shadow_clear(name, actor=actor, reason=reason)
    return _changed(ctx, "shadow_clear", name)


def _changed(ctx: AdminContext, action: str, name: str) -> Response:
    return json_response({"action": action, "route": name, **shadow_state(ctx.ops.live, name)})


def shadow_state(live: LiveView, name: str) -> dict[str, Any]:
    """The route's shadow in force, the one its policy declares, and the override (None when there is none)."""
    override = live.shadow_overrides.get(name)
    declared = live.declared.routes.get(name)
    return {
        "shadow": _spec(live.view.policy, name),
        "declared": _spec(live.declared, name),
        "override": overrides.status(declared, override) if override else None,
    }


def overrides_json(live: LiveView) -> list[dict[str, Any]]:
    """Every override in force or stale, by route (for `/admin/status`)."""
    return [
        overrides.status(live.declared.routes.get(name), o)
        for name, o in sorted(live.shadow_overrides.items())
    ]


def _spec(policy: PolicySnapshot, name: str) -> dict[str, Any] | None:
    route = policy.routes.get(name)
    return dataclasses.asdict(route.shadow) if route and route.shadow else None


def _read(where: Where, route: str, since: float | None, until: float | None) -> list[Record]:
    if isinstance(where, Path) and not where.exists():  # no request answered yet
        return []
    return read_records(where, route=route, since=since, until=until)
