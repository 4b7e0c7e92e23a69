"""The operator console's sessions and the viewer token: session cookies and their limits, the same-origin check,
and what the viewer token may do on the admin API."""

from __future__ import annotations

import pytest

from gateway.console.session import Sessions, Token, same_origin
from tests.conftest import AppGatewayFactory

VIEWER_TOKEN = "test-viewer-token"


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


def test_the_settings_refuse_one_token_for_both_roles() -> None:
    from pydantic import ValidationError

    from gateway.settings import Settings

    with pytest.raises(ValidationError, match="must differ from GATEWAY_ADMIN_TOKEN"):
        Settings(admin_token="same", viewer_token="same")
    with pytest.raises(ValidationError, match="must differ from GATEWAY_ADMIN_TOKEN_NAME"):
        Settings(viewer_token_name="admin")
