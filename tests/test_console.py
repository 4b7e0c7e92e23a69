"""The operator console over HTTP, as a browser uses it (in process): signing in and out, the session cookie and
its limits, a sign-out holding for copies of the cookie on every process sharing the store, the sign-in throttle,
CSRF and origin checks, who may act, kills from the console reaching the next request and the audit
log, every page rendering on both backends, escaping, labels, and the load-test reports' paths. The same pages in
a real browser are tests/test_console_browser.py."""

from __future__ import annotations

import copy
import logging
import re
import sqlite3
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from pydantic import ValidationError

from gateway.console.session import COOKIE, Sessions, Throttle, Token, same_origin
from gateway.devtools.postgres import PostgresServer
from gateway.settings import Settings
from tests.conftest import (
    ADMIN_TOKEN,
    APP_URL,
    CLIENT_TOKEN,
    CRM_POLICY,
    UPDATE_CRM,
    AppGatewayFactory,
    Gateway,
    sdk_client,
)

VIEWER_TOKEN = "test-viewer-token"
PAGES = (
    "/console/routes",
    "/console/figures",
    "/console/canaries",
    "/console/shadow",
    "/console/adapters",
    "/console/audit",
    "/console/loadtests",
)
CANARY_POLICY = (
    CRM_POLICY
    + """
[canary]
candidate = "formatter"
baseline = "baseline"
steps = [10, 50, 100]
min_requests_per_step = 1000
min_minutes_per_step = 60
unit = "request"
on_fail = "kill"

[canary.guardrails]
invalid_call_rate = { alpha = 0.05 }
error_rate = { alpha = 0.05 }
"""
)
SHADOW_POLICY = CRM_POLICY + '\n[shadow]\nvariant = "formatter"\nshare = 100\n'


class Operator:
    """One browser's session with the console: its cookie, sent by hand (the client's jar is shared)."""

    def __init__(self, gw: Gateway, token: str = ADMIN_TOKEN) -> None:
        self.gw = gw
        self.origin = gw.url
        r = self.post("/console/sign-in", {"token": token, "next": "/console/routes"}, signed_in=False)
        assert r.status_code == 303, r.text
        self.cookie = r.headers["set-cookie"].split(";")[0]
        self.csrf = self.csrf_of(self.get("/console/routes").text)

    def copy(self, gw: Gateway | None = None) -> Operator:
        """Another browser holding a copy of this session's cookie (and its CSRF token), sending to `gw`."""
        other = copy.copy(self)
        other.gw = gw or self.gw
        other.origin = other.gw.url
        return other

    @staticmethod
    def csrf_of(page: str) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found is not None
        return found.group(1)

    def get(self, path: str, **headers: str) -> httpx.Response:
        self.gw.http.cookies.clear()
        return self.gw.http.get(path, headers={"cookie": self.cookie, **headers})

    def post(
        self, path: str, form: dict[str, str], *, signed_in: bool = True, **headers: str
    ) -> httpx.Response:
        self.gw.http.cookies.clear()
        sent = {"origin": self.origin, **({"cookie": self.cookie} if signed_in else {}), **headers}
        return self.gw.http.post(path, data=form, headers={k: v for k, v in sent.items() if v})

    def act(self, path: str, **form: str) -> httpx.Response:
        return self.post(path, {"csrf": self.csrf, "back": "/console/routes", "confirm": "yes", **form})


def ask(gw: Gateway, user: str) -> str:
    raw = sdk_client(gw).chat.completions.with_raw_response.create(
        model="crm-assistant",
        messages=[{"role": "user", "content": "Set Globex to won, 5000 EUR."}],
        tools=[UPDATE_CRM],
        extra_headers={"x-user-id": user},
    )
    return raw.headers["x-gateway-variant"]


def traffic(gw: Gateway, n: int = 40) -> None:
    for i in range(n):
        ask(gw, f"user-{i}")
    gw.records()  # flushed: the pages read the request log


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    parts = [p.strip() for p in set_cookie.split(";")]
    return {k.lower(): v for k, _, v in (p.partition("=") for p in parts[1:])}


# --- signing in ---------------------------------------------------------------------------------------------------


def test_sign_in_gives_a_strict_http_only_cookie_that_expires(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(console_session_s=600)
    r = gw.http.post(
        "/console/sign-in", data={"token": ADMIN_TOKEN, "next": "/console/audit"}, headers={"origin": APP_URL}
    )
    assert r.status_code == 303 and r.headers["location"] == "/console/audit"
    assert ADMIN_TOKEN not in r.headers["location"]
    name, _, value = r.headers["set-cookie"].split(";")[0].partition("=")
    assert name == COOKIE and ADMIN_TOKEN not in value
    attrs = cookie_attributes(r.headers["set-cookie"])
    assert "httponly" in attrs and attrs["samesite"].lower() == "strict" and attrs["path"] == "/console"
    assert 590 <= int(attrs["max-age"]) <= 600
    assert "secure" not in attrs  # plain http here; https (or GATEWAY_CONSOLE_SECURE_COOKIE=on) sets it


def test_the_secure_attribute_can_be_forced_behind_a_tls_proxy(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(console_secure_cookie="on")
    r = gw.http.post("/console/sign-in", data={"token": ADMIN_TOKEN}, headers={"origin": APP_URL})
    assert "secure" in cookie_attributes(r.headers["set-cookie"])


def test_signed_out_requests_see_only_the_sign_in_page(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    for path in PAGES:
        r = gw.http.get(path + "?window=5m")
        assert r.status_code == 303, path
        assert r.headers["location"] == "/console/sign-in?next=" + quote(path + "?window=5m", safe=""), path
    assert gw.http.get("/console").headers["location"] == "/console/routes"
    r = gw.http.get("/console/sign-in")
    assert r.status_code == 200 and 'name="token"' in r.text and "crm-assistant" not in r.text
    r = gw.http.post(
        "/console/actions/kill",
        data={"route": "crm-assistant", "variant": "formatter", "reason": "x", "confirm": "yes"},
        headers={"origin": APP_URL},
    )
    assert r.status_code == 401
    assert gw.app.components.state.audit() == []


def test_a_failed_sign_in_does_not_say_which_tokens_exist(make_app_gateway: AppGatewayFactory) -> None:
    answers = []
    for viewer in (None, VIEWER_TOKEN):
        gw = make_app_gateway(viewer_token=viewer)
        r = gw.http.post("/console/sign-in", data={"token": "guess"}, headers={"origin": APP_URL})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        answers.append(r.text)
        gw.stop()
    assert answers[0] == answers[1]
    assert "viewer" not in answers[0].lower().replace("admin or viewer token", "")


def test_sign_out_clears_the_cookie_and_ends_the_session_for_its_copies(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    op, other = Operator(gw), Operator(gw)
    stolen = op.copy()  # the same cookie, taken before the sign-out
    r = op.post("/console/sign-out", {"csrf": op.csrf})
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    cleared = r.headers["set-cookie"]
    assert cleared.startswith(f"{COOKIE}=") and cookie_attributes(cleared)["max-age"] == "0"
    r = stolen.get("/console/audit")
    assert r.status_code == 303 and r.headers["location"].startswith("/console/sign-in?next=")
    assert stolen.get("/console/sign-in").status_code == 200  # the form, not a redirect into the console
    r = stolen.act("/console/actions/kill", route="crm-assistant", variant="formatter", reason="stolen")
    assert r.status_code == 401 and gw.app.components.state.audit() == []
    assert stolen.post("/console/sign-out", {"csrf": stolen.csrf}).status_code == 303  # nothing left to end
    assert other.get("/console/routes").status_code == 200  # another session goes on


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_sign_out_holds_on_another_gateway_process_within_a_poll(
    make_app_gateway: AppGatewayFactory, request: pytest.FixtureRequest, backend: str
) -> None:
    shared = (
        {} if backend == "sqlite" else {"database_url": request.getfixturevalue("postgres").new_database()}
    )
    a, b = make_app_gateway(**shared), make_app_gateway(**shared)  # one state store
    op = Operator(a)
    on_b = op.copy(b)
    assert on_b.get("/console/routes").status_code == 200  # the replicas share the tokens, so the session
    assert op.post("/console/sign-out", {"csrf": op.csrf}).status_code == 303
    started = time.monotonic()
    while on_b.get("/console/routes").status_code == 200:
        assert time.monotonic() - started < 2.0, "the other process still accepts the signed-out cookie"
        time.sleep(0.01)
    r = on_b.act("/console/actions/kill", route="crm-assistant", variant="formatter", reason="stolen")
    assert r.status_code == 401 and b.app.components.state.audit() == []
    later = op.copy(make_app_gateway(**shared))  # a process started later reads the sign-outs at start
    assert later.get("/console/routes").status_code == 303


def test_a_sign_out_the_store_cannot_record_keeps_the_session_and_says_so(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    with sqlite3.connect(gw.settings.state_db) as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON console_signouts BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )
    r = op.post("/console/sign-out", {"csrf": op.csrf})
    assert r.status_code == 503 and "still valid" in r.text and "set-cookie" not in r.headers
    assert op.get("/console/routes").status_code == 200


def test_failed_sign_ins_are_throttled_per_address_even_for_the_right_token(
    make_app_gateway: AppGatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = make_app_gateway()

    def sign_in(token: str) -> httpx.Response:
        return gw.http.post("/console/sign-in", data={"token": token}, headers={"origin": APP_URL})

    for _ in range(15):
        assert sign_in(ADMIN_TOKEN).status_code == 303  # successes are not counted
    with caplog.at_level(logging.WARNING, logger="gateway.console.routes"):
        assert [sign_in(f"guess-{i}").status_code for i in range(10)] == [401] * 10
        for token in ("guess-10", ADMIN_TOKEN):
            r = sign_in(token)
            assert r.status_code == 429 and "set-cookie" not in r.headers, token
            assert 1 <= int(r.headers["retry-after"]) <= 60
            assert "Too many failed sign-ins" in r.text and 'name="token"' in r.text
            assert r.headers["content-security-policy"].startswith("default-src 'none'")
    logged = [rec for rec in caplog.records if rec.name == "gateway.console.routes"]
    assert len(logged) == 10 and {rec.levelno for rec in logged} == {logging.WARNING}
    assert "127.0.0.1" in logged[0].getMessage() and "10 of 10" in logged[-1].getMessage()
    assert not any("guess" in rec.getMessage() or ADMIN_TOKEN in rec.getMessage() for rec in caplog.records)


def test_the_throttle_lets_an_address_try_again_once_its_window_has_passed() -> None:
    now = [0.0]
    throttle = Throttle(limit=3, window_s=60, max_addresses=2, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait_s("a") == 0
        throttle.failed("a")
        now[0] += 10
    assert throttle.wait_s("a") == 30 and throttle.wait_s("b") == 0  # failed at 0, 10, 20; now 30
    now[0] = 59.5
    assert throttle.wait_s("a") == 1
    now[0] = 60.0  # the first failure has left the window: one more try
    assert throttle.wait_s("a") == 0
    assert throttle.failed("a") == 3 and throttle.wait_s("a") == 10  # 10, 20, 60 in the window
    now[0] = 200.0
    assert throttle.wait_s("a") == 0 and throttle.failed("a") == 1
    throttle.failed("b")
    throttle.failed("c")
    assert throttle.addresses == 2  # bounded: the address quiet longest ("a") is forgotten


def test_an_expired_altered_or_foreign_cookie_is_no_session(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(viewer_token=VIEWER_TOKEN, console_session_s=1)
    viewer = Operator(gw, VIEWER_TOKEN)
    role, expires, sid, signature = viewer.cookie.split("=", 1)[1].split(".")
    forged = [
        f"admin.{expires}.{sid}.{signature}",  # a viewer's session claiming the admin role
        f"viewer.{int(expires) + 3600}.{sid}.{signature}",  # a later expiry
        f"viewer.{expires}.{sid}.{signature[:-2]}AA",
        "garbage",
    ]
    for value in forged:
        viewer.cookie = f"{COOKIE}={value}"
        assert viewer.get("/console/routes").status_code == 303, value
    viewer.cookie = f"{COOKIE}={role}.{expires}.{sid}.{signature}"
    time.sleep(1.1)
    assert viewer.get("/console/routes").status_code == 303  # expired


def test_sessions_end_with_their_expiry_their_token_or_the_secret() -> None:
    now = [1000.0]
    admin = Token("admin", "admin", "a-token")
    sessions = Sessions([admin], secret=None, lifetime_s=60, clock=lambda: now[0])
    who = sessions.sign_in("a-token")
    assert who is not None and who.may_act and who.actor == "console:admin"
    cookie = sessions.cookie(who)
    assert sessions.read(cookie) == who
    now[0] += 59
    assert sessions.read(cookie) is not None
    now[0] += 1
    assert sessions.read(cookie) is None
    now[0] = 1000.0
    rotated = Sessions(
        [Token("admin", "admin", "new-token")], secret=None, lifetime_s=60, clock=lambda: now[0]
    )
    assert rotated.read(cookie) is None
    other = Sessions([admin], secret="configured", lifetime_s=60, clock=lambda: now[0])
    assert other.read(cookie) is None
    shared = Sessions([admin], secret=None, lifetime_s=60, clock=lambda: now[0])  # another replica
    assert shared.read(cookie) == who
    assert shared.csrf_ok(who, sessions.csrf(who)) and not shared.csrf_ok(who, "x")
    assert sessions.sign_in("") is None and sessions.sign_in("A-TOKEN") is None
    ended = {who.sid}
    signed_out = Sessions([admin], secret=None, lifetime_s=60, clock=lambda: now[0], ended=ended.__contains__)
    assert signed_out.read(cookie) is None
    fresh = signed_out.sign_in("a-token")  # a new session of the same token is another id
    assert fresh is not None and signed_out.read(signed_out.cookie(fresh)) == fresh


def test_same_origin_compares_the_origin_or_referer_with_the_host() -> None:
    host = {"host": "gw.example:8080"}
    assert same_origin({**host, "origin": "http://gw.example:8080"})
    assert same_origin({**host, "referer": "http://gw.example:8080/console/routes"})
    assert same_origin({"host": "gw.example", "origin": "https://gw.example:443"})
    assert not same_origin({**host, "origin": "http://evil.example:8080"})
    assert not same_origin({**host, "origin": "http://gw.example:8081"})
    assert not same_origin({**host, "origin": "null"})
    assert not same_origin(host)
    assert not same_origin({**host, "origin": "http://gw.example:x"})


# --- acting -------------------------------------------------------------------------------------------------------


def test_a_kill_from_the_console_moves_the_next_requests_and_is_audited_by_token_name(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(admin_token_name="night-ops")
    users = [f"user-{i}" for i in range(60)]
    assert {ask(gw, u) for u in users} == {"baseline", "formatter"}
    op = Operator(gw)
    r = op.act("/console/actions/kill", route="crm-assistant", variant="formatter", reason="invalid calls up")
    assert r.status_code == 303 and r.headers["location"] == "/console/routes"
    assert {ask(gw, u) for u in users} == {"baseline"}  # the very next requests
    entry = gw.app.components.state.audit()[0]
    assert (entry.action, entry.actor, entry.reason) == (
        "kill_variant",
        "console:night-ops",
        "invalid calls up",
    )
    assert (entry.route, entry.variant) == ("crm-assistant", "formatter")
    page = op.get("/console/routes").text
    assert 'data-variant="formatter" data-state="killed"' in page
    assert 'aria-label="Revive crm-assistant/formatter"' in page
    r = op.act("/console/actions/revive", route="crm-assistant", variant="formatter", reason="fixed")
    assert r.status_code == 303 and {ask(gw, u) for u in users} == {"baseline", "formatter"}
    r = op.act("/console/actions/kill", route="crm-assistant", reason="whole route out")
    assert r.status_code == 303
    assert gw.app.components.state.audit()[0].action == "kill_route"
    assert 'data-route="crm-assistant" data-killed="true"' in op.get("/console/routes").text


def test_an_action_without_its_reason_or_confirmation_asks_for_them(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    for form in ({"reason": "x"}, {"confirm": "yes"}, {"confirm": "yes", "reason": "   "}):
        r = op.post(
            "/console/actions/kill",
            {"csrf": op.csrf, "route": "crm-assistant", "variant": "formatter", **form},
        )
        assert r.status_code == 200 and 'value="yes"' in r.text and 'label for="reason"' in r.text
    assert gw.app.components.state.audit() == []


def test_an_operation_the_gateway_refuses_is_an_error_page(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    r = op.act("/console/actions/kill", route="nope", variant="formatter", reason="x")
    assert r.status_code == 404 and "No route" in r.text and "<html" in r.text
    op.act("/console/actions/kill", route="crm-assistant", variant="formatter", reason="x")
    r = op.act("/console/actions/kill", route="crm-assistant", variant="baseline", reason="x")
    assert r.status_code == 409 and "no live variant" in r.text
    r = op.act("/console/actions/canary/pause", route="crm-assistant", reason="x")
    assert r.status_code == 404 and "no [canary]" in r.text


@pytest.mark.parametrize(
    "form",
    [
        {},  # no CSRF token
        {"csrf": "not-the-token"},
    ],
)
def test_a_post_without_the_sessions_csrf_token_is_refused(
    make_app_gateway: AppGatewayFactory, form: dict[str, str]
) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    r = op.post(
        "/console/actions/kill",
        {"route": "crm-assistant", "variant": "formatter", "reason": "x", "confirm": "yes", **form},
    )
    assert r.status_code == 403 and "CSRF" in r.text
    other = Operator(gw)  # another session's token is no better
    r = op.act(
        "/console/actions/kill", route="crm-assistant", variant="formatter", reason="x", csrf=other.csrf
    )
    assert r.status_code == 403
    assert not gw.app.components.live.view.switches.variants


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": "", "referer": "http://evil.example/page"},
        {"origin": ""},  # neither header
    ],
)
def test_a_post_from_another_origin_is_refused(
    make_app_gateway: AppGatewayFactory, headers: dict[str, str]
) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    form = {
        "csrf": op.csrf,
        "route": "crm-assistant",
        "variant": "formatter",
        "reason": "x",
        "confirm": "yes",
    }
    r = op.post("/console/actions/kill", form, **headers)
    assert r.status_code == 403
    r = gw.http.post("/console/sign-in", data={"token": ADMIN_TOKEN}, headers=headers)
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert gw.app.components.state.audit() == []
    r = op.post("/console/actions/kill", form, origin="", referer=f"{APP_URL}/console/routes")
    assert r.status_code == 303  # the Referer of the console's own page is its origin


def test_a_viewer_sees_every_page_and_may_not_act(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": CANARY_POLICY}, viewer_token=VIEWER_TOKEN)
    traffic(gw)
    viewer = Operator(gw, VIEWER_TOKEN)
    for path in PAGES:
        r = viewer.get(path)
        assert r.status_code == 200, path
        assert 'class="action"' not in r.text and "confirm-dialog" not in r.text, path
    assert (
        "viewer" in viewer.get("/console/routes").text and "read-only" in viewer.get("/console/routes").text
    )
    for path, form in (
        ("/console/actions/kill", {"route": "crm-assistant", "variant": "formatter"}),
        ("/console/actions/revive", {"route": "crm-assistant"}),
        ("/console/actions/canary/abort", {"route": "crm-assistant"}),
    ):
        r = viewer.act(path, reason="forged", **form)  # a valid viewer session, its own CSRF token
        assert r.status_code == 403, path
    assert not [e for e in gw.app.components.state.audit() if e.actor.startswith("console:")]
    assert not gw.app.components.live.view.switches.variants


def test_the_viewer_token_reads_the_admin_api_and_changes_nothing(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(viewer_token=VIEWER_TOKEN)
    bearer = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    for path in ("/admin/status", "/admin/audit", "/admin/adapters", "/admin/canaries"):
        assert gw.http.get(path, headers=bearer).status_code == 200, path
    for path in ("/admin/routes/crm-assistant/variants/formatter/kill", "/admin/kill-all", "/admin/reload"):
        r = gw.http.post(path, headers=bearer, json={"reason": "x"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", path
    assert gw.app.components.state.audit() == []
    gw_without = make_app_gateway(admin_token=None, viewer_token=VIEWER_TOKEN)
    assert gw_without.http.get("/admin/status", headers=bearer).status_code == 200
    assert gw_without.http.post("/admin/kill-all", headers=bearer, json={"reason": "x"}).status_code == 403


# --- pages --------------------------------------------------------------------------------------------------------


def _every_page_renders(gw: Gateway) -> None:
    traffic(gw)
    op = Operator(gw)
    op.act("/console/actions/kill", route="crm-assistant", variant="formatter", reason="look")
    traffic(gw, 10)
    bodies = {}
    for path in PAGES:
        r = op.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        assert r.headers["content-type"].startswith("text/html")
        bodies[path] = r.text
    assert 'data-variant="formatter" data-state="killed"' in bodies["/console/routes"]
    assert "console:admin" in bodies["/console/audit"] and "look" in bodies["/console/audit"]
    assert "requests" in bodies["/console/figures"] and "<svg" in bodies["/console/figures"]
    assert re.search(r"<td>requests</td><td>\d+</td>", bodies["/console/figures"])
    replicas = re.findall(r"data-in-step=\"(\w+)\"", bodies["/console/routes"])
    assert replicas == ["true"]
    shares = [float(s) for s in re.findall(r'data-share="([\d.]+)"', bodies["/console/routes"])]
    assert abs(sum(shares) - 1) < 1e-3 and "(50 requests)" in bodies["/console/routes"]


def test_every_page_renders_on_sqlite(make_app_gateway: AppGatewayFactory) -> None:
    _every_page_renders(make_app_gateway(policies={"crm.toml": CANARY_POLICY}))


def test_every_page_renders_on_postgres(
    make_app_gateway: AppGatewayFactory, postgres: PostgresServer
) -> None:
    gw = make_app_gateway(policies={"crm.toml": CANARY_POLICY}, database_url=postgres.new_database())
    _every_page_renders(gw)


def test_the_routes_page_shows_live_shares_and_the_figures_page_compares_with_the_baseline(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    before = op.get("/console/routes").text
    assert re.findall(r'data-share="([\d.]+)"', before) == ["0.0000", "0.0000"]
    traffic(gw, 60)
    shares = [float(s) for s in re.findall(r'data-share="([\d.]+)"', op.get("/console/routes").text)]
    assert len(shares) == 2 and abs(sum(shares) - 1) < 1e-3 and shares[0] > shares[1] > 0  # 90/10 weights
    figures = op.get("/console/figures?route=crm-assistant&window=5m").text
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", figures)
    assert header is not None and "baseline (baseline)" in header.group(1)
    assert header.group(1).index("baseline (baseline)") < header.group(1).index("formatter")
    assert re.search(r"invalid calls \(95 % CI\)</td><td>\d+/\d+ [\d.]+% \[[\d.]+%, [\d.]+%\]", figures)
    assert "e2e p50 / p90 / p99" in figures and "cost per 1,000 requests" in figures and "EUR" in figures
    assert 'data-refresh="3000"' in figures
    day = op.get("/console/figures?window=24h").text
    assert 'data-refresh="720000"' in day  # a day's window refreshes every 12 minutes
    assert op.get("/console/figures?window=3w").status_code == 400
    assert op.get("/console/figures?route=nope").status_code == 404


def test_a_refresh_gets_only_the_live_region(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    full = op.get("/console/routes").text
    fragment = op.get("/console/routes", **{"x-console-fragment": "1"}).text
    assert "<html" in full and "<html" not in fragment and "<nav" not in fragment
    assert 'data-route="crm-assistant"' in fragment
    live = re.search(r'<div id="live">(.*)</div></main>', full, re.S)
    assert live is not None and live.group(1).count("<section") == fragment.count("<section")


def test_the_canary_page_shows_each_guardrail_against_its_bound(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": CANARY_POLICY}, canary_interval_s=0.05)
    traffic(gw, 60)
    op = Operator(gw)
    page = op.get("/console/canaries").text
    assert 'data-status="running"' in page
    rows = dict(re.findall(r'data-guardrail="(\w+)" data-statistic="[^"]*" data-bound="([\d.]+)"', page))
    assert rows == {"invalid_call_rate": "20.0", "error_rate": "20.0"}
    assert page.count('<svg class="chart"') == 2 and "bound 20" in page
    assert 'aria-label="Pause the canary of crm-assistant"' in page
    r = op.act("/console/actions/canary/pause", route="crm-assistant", reason="look closer")
    assert r.status_code == 303
    entry = gw.app.components.state.audit()[0]
    assert (entry.action, entry.actor, entry.reason) == ("canary_pause", "console:admin", "look closer")
    assert 'data-status="paused"' in op.get("/console/canaries").text


def test_a_canary_in_its_shadow_phase_shows_its_pairs_and_only_the_operations_that_apply(
    make_app_gateway: AppGatewayFactory,
) -> None:
    policy = (
        CANARY_POLICY.replace('on_fail = "kill"', 'on_fail = "kill"\nshadow_requests = 1000000')
        + '\n[shadow]\nvariant = "formatter"\nshare = 100\nmax_in_flight = 64\n'
    )
    gw = make_app_gateway(policies={"crm.toml": policy}, canary_interval_s=0.05)
    traffic(gw, 40)
    op = Operator(gw)
    page = op.get("/console/canaries").text
    assert 'data-status="shadow"' in page and "serves nobody" in page
    pairs = re.search(r"Shadow phase: pairs (\d+) of 1000000", page)
    assert pairs is not None and 0 < int(pairs.group(1)) <= 40
    assert "requests routed to the candidate 0" in page
    rows = dict(re.findall(r'data-guardrail="(\w+)" data-statistic="[^"]*" data-bound="([\d.]+)"', page))
    assert rows == {"invalid_call_rate": "20.0", "error_rate": "20.0"}
    assert "pairs only the candidate" in page and page.count('<svg class="chart"') == 2
    labels = set(re.findall(r'aria-label="(\w+) the canary of crm-assistant"', page))
    assert labels == {"Promote", "Abort"}  # pause and resume do not apply to a shadow phase


def test_the_shadow_page_shows_the_paired_comparison(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": SHADOW_POLICY})
    traffic(gw, 30)
    op = Operator(gw)
    page = op.get("/console/shadow?window=5m").text
    assert 'data-route="crm-assistant"' in page and "formatter in shadow" in page
    assert "McNemar" in page and "Shadow pairs of crm-assistant" in page
    assert "(30 requests)" in op.get("/console/routes").text  # the copies are not counted as served


def test_the_shadow_page_shows_an_operators_override(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": SHADOW_POLICY})
    r = gw.admin(
        "POST", "/admin/shadow/crm-assistant/stop", json={"variant": "formatter", "reason": "costly"}
    )
    assert r.status_code == 200, r.text
    page = Operator(gw).get("/console/shadow").text
    assert "Operators&#x27; overrides" in page  # the caption, escaped
    row = re.search(r"<tr><td>crm-assistant</td><td>stop</td><td>formatter</td>.*?</tr>", page, re.S)
    assert row is not None and "costly" in row.group(0) and "applied" in row.group(0)


def test_names_and_reasons_are_escaped(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    markup = '<img src=x onerror="alert(1)">'
    r = gw.admin(
        "POST",
        "/admin/routes/crm-assistant/variants/formatter/kill",
        json={"reason": f"reason {markup}", "actor": f"actor {markup}"},
    )
    assert r.status_code == 200
    op = Operator(gw)
    page = op.get("/console/audit").text
    assert "<img" not in page
    assert "reason &lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "actor &lt;img" in page
    page = op.get("/console/audit?actor=" + httpx.QueryParams({"a": "<b>"})["a"]).text
    assert "<b>" not in page and 'value="&lt;b&gt;"' in page


class _Controls(HTMLParser):
    """Every form control of a page, and the ids its labels name."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[tuple[str, dict[str, Any]]] = []
        self.labelled: set[str] = set()
        self._button: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "label" and a.get("for"):
            self.labelled.add(str(a["for"]))
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.controls.append((tag, a))
        if tag == "button":
            self._button = {**a, "text": ""}
            self.controls.append(("button", self._button))

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._button["text"] += data.strip()

    def handle_endtag(self, tag: str) -> None:
        if tag == "button":
            self._button = None


def unlabelled(page: str) -> list[str]:
    parser = _Controls()
    parser.feed(page)
    return [
        f"{tag} {a}"
        for tag, a in parser.controls
        if not a.get("aria-label")
        and not (tag == "button" and a.get("text"))
        and not (a.get("id") and a["id"] in parser.labelled)
    ]


def test_every_control_has_a_label(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": CANARY_POLICY})
    traffic(gw)
    op = Operator(gw)
    pages = [op.get(path).text for path in PAGES]
    pages.append(gw.http.get("/console/sign-in").text)
    pages.append(
        op.post("/console/actions/kill", {"csrf": op.csrf, "route": "crm-assistant"}).text
    )  # confirm
    for page in pages:
        assert unlabelled(page) == []
    assert sum(page.count("<button") for page in pages) > 10


def test_every_answer_carries_the_security_headers(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    op = Operator(gw)
    for r in (op.get("/console/routes"), gw.http.get("/console/sign-in"), op.get("/console/nope")):
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "same-origin"
        assert r.headers["cache-control"] == "no-store"
    assert op.get("/console/nope").status_code == 404
    page = op.get("/console/routes").text
    assert "<script>" not in page and " style=" not in page and not re.search(r"\son[a-z]+=", page)
    script = gw.http.get("/console/static/console.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert gw.http.get("/console/static/../settings.py").status_code == 404


def test_load_test_reports_are_served_and_no_other_file(
    make_app_gateway: AppGatewayFactory, tmp_path: Path
) -> None:
    root = tmp_path / "loadtests"
    run = root / "crm-compare-20260101T000000"
    run.mkdir(parents=True)
    (run / "report.html").write_text("<!doctype html><title>the report</title><style>p{}</style>")
    (run / "result.json").write_text(
        '{"scenario": {"name": "crm-compare", "route": "crm-assistant", "mode": "paired"},'
        ' "window": {"started_at": 1767225600}, "overall": {"requests": 80},'
        ' "variants": [{"variant": "baseline"}, {"variant": "formatter"}]}'
    )
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "report.html").write_text("TOP-SECRET-CONTENT")
    (root / "linked").symlink_to(secret)
    gw = make_app_gateway(loadtest_dir=root)
    op = Operator(gw)
    listing = op.get("/console/loadtests").text
    assert (
        "crm-compare-20260101T000000/report.html" in listing
        and "80" in listing
        and "baseline, formatter" in listing
    )
    r = op.get("/console/loadtests/crm-compare-20260101T000000/report.html")
    assert r.status_code == 200 and "the report" in r.text
    assert "script-src" not in r.headers["content-security-policy"]
    for path in (
        "/console/loadtests/linked/report.html",
        "/console/loadtests/..%2Fsecret/report.html",
        "/console/loadtests/%2E%2E/secret/report.html",
        "/console/loadtests/.hidden/report.html",
        "/console/loadtests/..%2F..%2Fetc%2Fpasswd%00/report.html",
    ):
        r = op.get(path)
        assert r.status_code == 404 and "TOP-SECRET" not in r.text, path
    gw.http.cookies.clear()
    assert gw.http.get("/console/loadtests/crm-compare-20260101T000000/report.html").status_code == 303


def test_the_settings_refuse_one_token_for_both_roles() -> None:
    with pytest.raises(ValidationError, match="must differ from GATEWAY_ADMIN_TOKEN"):
        Settings(admin_token="same", viewer_token="same")
    with pytest.raises(ValidationError, match="must differ from GATEWAY_ADMIN_TOKEN_NAME"):
        Settings(viewer_token_name="admin")


def test_a_client_key_is_not_a_console_token(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    r = gw.http.post("/console/sign-in", data={"token": CLIENT_TOKEN}, headers={"origin": APP_URL})
    assert r.status_code == 401
