"""The console's pages (each a title, its controls and its live region, read in a worker thread and rendered by
the page modules), the static files and the load-test reports. A page asked with `X-Console-Fragment: 1` answers
its live region alone: the script's refresh replaces the figures in place with it. Signed out, a page redirects
to the sign-in page with itself as `next`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from gateway.admin.http import MAX_NAME_CHARS
from gateway.console import loadtests, reads
from gateway.console.canary_page import canaries_live
from gateway.console.figures import refresh_s, window_seconds
from gateway.console.history_pages import (
    AuditFilters,
    adapters_controls,
    adapters_live,
    audit_controls,
    audit_live,
)
from gateway.console.html import Chrome, Html, page
from gateway.console.pages import figures_controls, figures_live, routes_live
from gateway.console.shadow_page import shadow_controls, shadow_live
from gateway.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from gateway.console.routes import Console

PREFIX: Final = "/console"
FRAGMENT: Final = "x-console-fragment"
STATIC: Final = {"console.js": "text/javascript", "console.css": "text/css"}
# A load-test report is a page of its own: inline CSS and SVG, no script at all.
REPORT_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass(frozen=True, slots=True)
class Rendered:
    """A page: its title, its live region and the controls above it. `span_s`: how many seconds of records it
    reads, which sets how often it refreshes (`figures.refresh_s`)."""

    title: str
    live: Html
    controls: Html | None = None
    span_s: float = 0.0


Handler = Callable[["Console", Request], Awaitable[Response]]
PageHandler = Callable[["Console", Request, Chrome], Awaitable[Rendered]]


def page_of(handler: PageHandler) -> Handler:
    """A signed-in page: (title, controls, live region); the live region alone for the script's refresh."""

    async def answer(c: Console, request: Request) -> Response:
        chrome = c.chrome(request)
        if chrome is None:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{PREFIX}/sign-in?next={quote(here, safe='')}", 303)
        shown = await handler(c, request, chrome)
        if request.headers.get(FRAGMENT) == "1":
            return HTMLResponse(shown.live)
        chrome = replace(chrome, refresh_s=refresh_s(chrome.refresh_s, shown.span_s))
        return HTMLResponse(page(shown.title, chrome, controls=shown.controls, live=shown.live))

    return answer


async def _routes(c: Console, request: Request, chrome: Chrome) -> Rendered:
    data = await asyncio.to_thread(reads.routes_data, c.admin, c.clock())
    return Rendered("Routes", routes_live(chrome, data))


def _route_param(c: Console, request: Request) -> str:
    names = sorted(c.admin.ops.live.view.policy.routes)
    name = request.query_params.get("route") or (names[0] if names else "")
    if not name:
        raise NotFound("No route is configured.")
    return name


async def _figures(c: Console, request: Request, chrome: Chrome) -> Rendered:
    window, seconds = window_seconds(request.query_params.get("window"))
    route = _route_param(c, request)
    data = await asyncio.to_thread(reads.figures_data, c.admin, route, window, seconds, c.clock())
    routes = sorted(c.admin.ops.live.view.policy.routes)
    return Rendered(f"Figures: {route}", figures_live(data), figures_controls(routes, route, window), seconds)


async def _canaries(c: Console, request: Request, chrome: Chrome) -> Rendered:
    now = c.clock()
    data = await asyncio.to_thread(reads.canary_data, c.admin, now)
    epochs = [d.status["state"]["epoch"] for d in data if d.status.get("state")]
    return Rendered("Canaries", canaries_live(chrome, data), span_s=now - min(epochs, default=now))


async def _shadow(c: Console, request: Request, chrome: Chrome) -> Rendered:
    window, seconds = window_seconds(request.query_params.get("window"))
    data = await asyncio.to_thread(reads.shadow_data, c.admin, window, seconds, c.clock())
    return Rendered("Shadow traffic", shadow_live(data), shadow_controls(window), seconds)


async def _adapters(c: Console, request: Request, chrome: Chrome) -> Rendered:
    window, seconds = window_seconds(request.query_params.get("window") or "7d")
    route = _route_param(c, request)
    reads.route_of(c.admin, route)
    data = await asyncio.to_thread(reads.adapters_data, c.admin, route, window, seconds, c.clock())
    routes = sorted(c.admin.ops.live.view.policy.routes)
    return Rendered(
        "Adapters and lineage", adapters_live(data), adapters_controls(routes, route, window), seconds
    )


async def _audit(c: Console, request: Request, chrome: Chrome) -> Rendered:
    q = request.query_params
    window, seconds = window_seconds(q.get("window") or "24h")
    f = AuditFilters(
        short(q.get("route", ""), "route"),
        short(q.get("action", ""), "action"),
        short(q.get("actor", ""), "actor"),
        window,
    )
    entries = await asyncio.to_thread(reads.audit_entries, c.admin, f, seconds, c.clock())
    routes = sorted(c.admin.ops.live.view.policy.routes)
    return Rendered("Audit log", audit_live(entries), audit_controls(routes, f))


async def _loadtests(c: Console, request: Request, chrome: Chrome) -> Rendered:
    found = await asyncio.to_thread(loadtests.runs, c.loadtest_dir)
    return Rendered("Load tests", loadtests.loadtests_live(c.loadtest_dir, found))


def short(value: str, name: str) -> str:
    value = value.strip()
    if len(value) > MAX_NAME_CHARS:
        raise BadRequest(f"'{name}' is longer than {MAX_NAME_CHARS} characters.", param=name)
    return value


async def static(c: Console, request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        raise NotFound(f"No static file {name!r}.")
    body = resources.files("gateway.console").joinpath("static", name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"cache-control": "no-cache"})


async def report(c: Console, request: Request) -> Response:
    if c.principal(request) is None:
        return RedirectResponse(PREFIX + "/sign-in", 303)
    path = await asyncio.to_thread(loadtests.report_path, c.loadtest_dir, request.path_params["run"])
    if path is None:
        raise NotFound("No such load-test report.")
    return FileResponse(path, media_type="text/html", headers={"content-security-policy": REPORT_CSP})


async def not_found(c: Console, request: Request) -> Response:
    raise NotFound(f"No console page {request.url.path}.")


PAGES: Final[Mapping[str, PageHandler]] = {
    "/routes": _routes,
    "/figures": _figures,
    "/canaries": _canaries,
    "/shadow": _shadow,
    "/adapters": _adapters,
    "/audit": _audit,
    "/loadtests": _loadtests,
}
