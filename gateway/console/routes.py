"""The console's route table under `/console` and what changes anything: sign-in, sign-out and the actions (kill
and revive a variant or a route; pause, resume, promote, abort a canary). The pages are `views`'.

- Sign-in is throttled per client address (`session.Throttle`: 429 with `Retry-After` past the limit, whatever
  token is presented); each failure is logged at warning level with the address, never with what was presented.
- Sign-out ends the session on every replica (`Operations.end_session`), not only the cookie in that browser.
- Signed out, a page redirects to the sign-in page (303) and a POST is refused (401).
- Every POST must come from the console's origin (`session.same_origin`), and every action carries the session's
  CSRF token and needs the admin token's session: a viewer's is refused (403) whatever it sends.
- An action goes through `control.operations` like the admin API's, with the actor `console:<token name>` and the
  reason given; it needs `confirm=yes` and a reason, or it answers the confirmation page instead (the script asks
  both in a dialog first).
- Every answer carries the security headers below; errors are HTML pages with the gateway error's status.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import parse_qsl

import psycopg
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.admin.canary import OPERATIONS
from gateway.admin.http import MAX_REASON_CHARS, AdminContext
from gateway.canary.machine import Operation
from gateway.console import views
from gateway.console.html import Chrome, confirm_page, error_page, sign_in_page
from gateway.console.session import COOKIE, Principal, Sessions, Throttle, Token, same_origin
from gateway.console.views import PREFIX, Handler
from gateway.errors import AuthenticationError, BadRequest, GatewayError, PermissionDenied
from gateway.policy import Flip
from gateway.settings import Settings
from gateway.store.api import StoreError

log = logging.getLogger(__name__)
MAX_FORM_BYTES: Final = 16 * 1024
SECURITY: Final = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


@dataclass(slots=True)
class Console:
    admin: AdminContext
    sessions: Sessions
    refresh_s: float
    loadtest_dir: Path
    secure_cookie: Literal["auto", "on", "off"]
    throttle: Throttle
    clock: Callable[[], float] = time.time

    def principal(self, request: Request) -> Principal | None:
        return self.sessions.read(request.cookies.get(COOKIE))

    def chrome(self, request: Request) -> Chrome | None:
        """The signed-in page's chrome, or None when the request is signed out."""
        who = self.principal(request)
        if who is None:
            return None
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return Chrome(who, self.sessions.csrf(who), self.refresh_s, here)


def console_routes(settings: Settings, admin: AdminContext) -> list[Route]:
    tokens = [
        Token("admin", settings.admin_token_name, t.get_secret_value()) for t in [settings.admin_token] if t
    ]
    tokens += [
        Token("viewer", settings.viewer_token_name, t.get_secret_value())
        for t in [settings.viewer_token]
        if t
    ]
    secret = settings.console_secret.get_secret_value() if settings.console_secret else None
    live = admin.ops.live
    console = Console(
        admin,
        Sessions(
            tokens,
            secret=secret,
            lifetime_s=settings.console_session_s,
            ended=lambda sid: sid in live.ended_sessions,
        ),
        settings.console_refresh_s,
        settings.loadtest_dir,
        settings.console_secure_cookie,
        Throttle(),
    )
    return _table(console)


def _table(c: Console) -> list[Route]:
    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await _answer(c, request, handler)

        return endpoint

    return [
        Route(PREFIX, wrap(_home), methods=["GET"]),
        Route(PREFIX + "/", wrap(_home), methods=["GET"]),
        Route(PREFIX + "/sign-in", wrap(_sign_in_form), methods=["GET"]),
        Route(PREFIX + "/sign-in", wrap(_sign_in), methods=["POST"]),
        Route(PREFIX + "/sign-out", wrap(_sign_out), methods=["POST"]),
        *(
            Route(PREFIX + path, wrap(views.page_of(handler)), methods=["GET"])
            for path, handler in views.PAGES.items()
        ),
        Route(PREFIX + "/actions/kill", wrap(_flip(killed=True)), methods=["POST"]),
        Route(PREFIX + "/actions/revive", wrap(_flip(killed=False)), methods=["POST"]),
        *(
            Route(f"{PREFIX}/actions/canary/{op}", wrap(_canary_action(op)), methods=["POST"])
            for op in OPERATIONS
        ),
        Route(PREFIX + "/static/{name}", wrap(views.static), methods=["GET"]),
        Route(PREFIX + "/loadtests/{run}/report.html", wrap(views.report), methods=["GET"]),
        Route(PREFIX + "/{rest:path}", wrap(views.not_found)),
    ]


async def _answer(c: Console, request: Request, handler: Handler) -> Response:
    """The handler's answer, or its error as a page; with the security headers either way."""
    try:
        response = await handler(c, request)
    except GatewayError as err:
        response = HTMLResponse(error_page(err.status, err.message, c.chrome(request)), err.status)
    except (StoreError, OSError, sqlite3.Error, psycopg.Error) as err:
        message = f"The store did not answer: {str(err).strip() or type(err).__name__}."
        response = HTMLResponse(error_page(503, message, c.chrome(request)), 503)
    for name, value in SECURITY.items():
        response.headers.setdefault(name, value)
    return response


# --- sessions -------------------------------------------------------------------------------------------------


async def _home(c: Console, request: Request) -> Response:
    return RedirectResponse(PREFIX + "/routes", 303)


async def _sign_in_form(c: Console, request: Request) -> Response:
    if c.principal(request) is not None:
        return RedirectResponse(PREFIX + "/routes", 303)
    next_url = _local(request.query_params.get("next"))
    return HTMLResponse(sign_in_page(failed=False, enabled=c.sessions.enabled, next_url=next_url))


async def _sign_in(c: Console, request: Request) -> Response:
    if not same_origin(request.headers):
        raise PermissionDenied("This form must be sent from the console's own pages.")
    form = await _form(request)
    next_url = _local(form.get("next"))
    # No await from the throttle's check to its count: concurrent guesses from one address cannot all slip in.
    address = request.client.host if request.client else "unknown"
    wait_s = c.throttle.wait_s(address)
    if wait_s:
        page_ = sign_in_page(failed=False, enabled=c.sessions.enabled, next_url=next_url, wait_s=wait_s)
        return HTMLResponse(page_, 429, headers={"retry-after": str(wait_s)})
    who = c.sessions.sign_in(form.get("token", ""))
    if who is None:
        _failed(c.throttle, address)
        page_ = sign_in_page(failed=True, enabled=c.sessions.enabled, next_url=next_url)
        return HTMLResponse(page_, 401)
    response = RedirectResponse(next_url, 303)
    response.set_cookie(
        COOKIE,
        c.sessions.cookie(who),
        max_age=max(0, round(who.expires - c.clock())),
        path=PREFIX,
        secure=_secure(c, request),
        httponly=True,
        samesite="strict",
    )
    return response


def _failed(throttle: Throttle, address: str) -> None:
    """Count and log a failed sign-in (its address, never what it presented)."""
    failures = throttle.failed(address)
    full = "; further sign-ins from it wait" if failures >= throttle.limit else ""
    log.warning(
        "console: a sign-in from %s failed (%d of %d allowed in %.0f s)%s",
        address,
        failures,
        throttle.limit,
        throttle.window_s,
        full,
    )


async def _sign_out(c: Console, request: Request) -> Response:
    """End the session on every replica, then clear the cookie; when the store cannot record it, an error page
    (503) says the session goes on, and the cookie stays for another try."""
    if c.principal(request) is not None:
        chrome, _ = await _acting(c, request, act=False)
        await c.admin.ops.end_session(chrome.who.sid, chrome.who.expires)
    response = RedirectResponse(PREFIX + "/sign-in", 303)
    response.delete_cookie(COOKIE, path=PREFIX, secure=_secure(c, request), httponly=True, samesite="strict")
    return response


def _secure(c: Console, request: Request) -> bool:
    return c.secure_cookie == "on" or (c.secure_cookie == "auto" and request.url.scheme == "https")


def _local(url: str | None) -> str:
    """A console URL to go to after signing in or acting; anything else (another site) is the routes page."""
    if url and url.startswith(PREFIX + "/") and not url.startswith(("//", "/\\")) and "\\" not in url:
        return url
    return PREFIX + "/routes"


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (at most `MAX_FORM_BYTES`); the last value of each field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise BadRequest("The console takes urlencoded forms.", code="invalid_content_type")
    raw = b""
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_FORM_BYTES:
                raise BadRequest("The form is too large.", code="payload_too_large")
    except ClientDisconnect:
        raise BadRequest("The client disconnected while sending its form.") from None
    try:
        return dict(parse_qsl(raw.decode(), keep_blank_values=True, max_num_fields=50))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("The form could not be read.", code="invalid_form") from None


async def _acting(c: Console, request: Request, *, act: bool = True) -> tuple[Chrome, dict[str, str]]:
    """The session and form of a POST: signed in (401), from the console's origin and with the session's CSRF
    token (403), and for an action, with the admin token's session (403)."""
    chrome = c.chrome(request)
    if chrome is None:
        raise AuthenticationError("Sign in to the console first.")
    if not same_origin(request.headers):
        raise PermissionDenied("This form must be sent from the console's own pages.")
    form = await _form(request)
    if not c.sessions.csrf_ok(chrome.who, form.get("csrf")):
        raise PermissionDenied(
            "The form's CSRF token is missing or belongs to another session: reload the page."
        )
    if act and not chrome.who.may_act:
        raise PermissionDenied(f"{chrome.who.name} may only look: actions need the admin token.")
    return chrome, form


# --- actions ------------------------------------------------------------------------------------------------------


def _flip(*, killed: bool) -> Handler:
    verb = "Kill" if killed else "Revive"

    async def act(c: Console, request: Request) -> Response:
        chrome, form = await _acting(c, request)
        route, variant = (
            views.short(form.get("route", ""), "route"),
            views.short(form.get("variant", ""), "variant"),
        )
        target = f"{route}/{variant}" if variant else f"route {route}"
        fields = {"route": route, **({"variant": variant} if variant else {})}
        reason = _reason(form)
        if form.get("confirm") != "yes" or not reason:
            return _confirm(chrome, request, form, fields, f"{verb} {target}")
        flip = Flip("variant" if variant else "route", killed, route, variant)
        await c.admin.ops.flip(flip, actor=chrome.who.actor, reason=reason)
        return RedirectResponse(_local(form.get("back")), 303)

    return act


def _canary_action(op: Operation) -> Handler:
    async def act(c: Console, request: Request) -> Response:
        chrome, form = await _acting(c, request)
        route = views.short(form.get("route", ""), "route")
        reason = _reason(form)
        if form.get("confirm") != "yes" or not reason:
            return _confirm(
                chrome, request, form, {"route": route}, f"{op.capitalize()} the canary of {route}"
            )
        await c.admin.ops.canary(route, op, actor=chrome.who.actor, reason=reason)
        return RedirectResponse(_local(form.get("back")), 303)

    return act


def _reason(form: Mapping[str, str]) -> str:
    reason = form.get("reason", "").strip()
    if len(reason) > MAX_REASON_CHARS:
        raise BadRequest(f"The reason is longer than {MAX_REASON_CHARS} characters.", param="reason")
    return reason


def _confirm(
    chrome: Chrome, request: Request, form: Mapping[str, str], fields: dict[str, str], does: str
) -> Response:
    return HTMLResponse(confirm_page(chrome, request.url.path, fields, does, _local(form.get("back"))))
