"""The operators' shadow API: `GET /admin/shadow/{route}?since=&until=` (bearer admin token, Unix seconds; default:
the whole request log). It answers the route's `[shadow]` as the live policy has it, this process's copies in
flight, and the paired comparison of each shadow variant with what the route's users were served over the window
(`shadow.pairs`), read from the request log, so every replica's copies are in it. 404 for a route the live policy
does not have.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.admin.http import MAX_TIMESTAMP, AdminContext, guard, json_response, query_number
from gateway.errors import NotFound
from gateway.records import Record
from gateway.shadow import pairs
from gateway.store.request_log import Where, read_records


def shadow_routes(ctx: AdminContext) -> list[Route]:
    return [Route("/admin/shadow/{route}", guard(ctx, _shadow), methods=["GET"])]


async def _shadow(ctx: AdminContext, request: Request) -> Response:
    name = request.path_params["route"]
    route = ctx.ops.live.view.policy.routes.get(name)
    if route is None:
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
            "shadow": dataclasses.asdict(route.shadow) if route.shadow else None,
            "in_flight": ctx.shadow_in_flight(name),
            "summaries": [pairs.as_dict(s) for s in summaries],
        }
    )


def _read(where: Where, route: str, since: float | None, until: float | None) -> list[Record]:
    if isinstance(where, Path) and not where.exists():  # no request answered yet
        return []
    return read_records(where, route=route, since=since, until=until)
