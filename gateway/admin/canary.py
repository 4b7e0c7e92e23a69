"""The operators' canary API under `/admin/` (bearer admin token, errors in OpenAI's envelope like every admin
route), and the drill record:

- `GET  /admin/canaries`: every declared canary with its state, weights and current look.
- `GET  /admin/routes/{route}/canary`: one of them (404 `no_canary` when the route declares none).
- `POST /admin/routes/{route}/canary/{pause|resume|promote|abort}` with `{"reason": ...}`: audited as
  `canary_<operation>`; 409 `canary_state` when the operation does not apply (resume a running canary, ...).
- `POST /admin/routes/{route}/drills` with `{"variant", "time_to_baseline_ms", "probes", "fallback", "reason"}`:
  the result of a `gateway drill`, audited as `drill` (the CLI kills and revives through the ordinary kill-switch
  routes). Every field is checked before the entry is written: `probes` a count, `fallback` a name.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.admin.http import (
    AdminContext,
    Endpoint,
    authorize,
    guard,
    json_response,
    read_body,
    reason_actor,
)
from gateway.canary.machine import Operation

OPERATIONS: tuple[Operation, ...] = ("pause", "resume", "promote", "abort")
DRILL_FIELDS = ("variant", "time_to_baseline_ms", "probes", "fallback")
MAX_DRILL_MS = 86_400_000.0  # a day: a drill times a switch that acts on the next request


def canary_routes(ctx: AdminContext) -> list[Route]:
    controller = ctx.ops.canaries

    async def all_canaries(ctx: AdminContext, request: Request) -> Response:
        return json_response({"canaries": await asyncio.to_thread(controller.status)})

    async def one(ctx: AdminContext, request: Request) -> Response:
        name = request.path_params["route"]
        found = await asyncio.to_thread(controller.status, name)
        return json_response({"route": name, **found[name]})

    def operation(op: Operation) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            authorize(ctx, request)
            return await _operate(ctx, request, op)

        return endpoint

    async def drill(ctx: AdminContext, request: Request) -> Response:
        return await _drill(ctx, request)

    return [
        Route("/admin/canaries", guard(ctx, all_canaries), methods=["GET"]),
        Route("/admin/routes/{route}/canary", guard(ctx, one), methods=["GET"]),
        *(
            Route(f"/admin/routes/{{route}}/canary/{op}", operation(op), methods=["POST"])
            for op in OPERATIONS
        ),
        Route("/admin/routes/{route}/drills", guard(ctx, drill), methods=["POST"]),
    ]


async def _operate(ctx: AdminContext, request: Request, op: Operation) -> Response:
    body = await read_body(request)
    reason, actor = reason_actor(request, body)
    name = request.path_params["route"]
    await ctx.ops.canary(name, op, actor=actor, reason=reason)
    found = await asyncio.to_thread(ctx.ops.canaries.status, name)
    return json_response({"route": name, "operation": op, **found[name]})


async def _drill(ctx: AdminContext, request: Request) -> Response:
    body = await read_body(request, *DRILL_FIELDS)
    reason, actor = reason_actor(request, body)
    variant = body.required_text("variant")
    detail: dict[str, Any] = {"time_to_baseline_ms": body.number("time_to_baseline_ms", maximum=MAX_DRILL_MS)}
    probes, fallback = body.count("probes"), body.text("fallback")
    detail.update({k: v for k, v in (("probes", probes), ("fallback", fallback)) if v is not None})
    name = request.path_params["route"]
    await ctx.ops.drill(name, variant, detail, actor=actor, reason=reason)
    return json_response({"route": name, "variant": variant, **detail})
