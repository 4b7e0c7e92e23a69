"""Who may read `/metrics`: with GATEWAY_METRICS_AUTH=on (the default) a scraper presents the metrics token (or the
admin token) as a bearer token; with `off` anyone who reaches the listener may."""

from __future__ import annotations

import httpx

from tests.conftest import ADMIN_TOKEN, CLIENT_TOKEN, AppGatewayFactory, Gateway

SCRAPE_TOKEN = "scrape-token-for-prometheus"


def scrape(gw: Gateway, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return gw.http.get("/metrics", headers=headers)


def test_metrics_need_a_token_by_default(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    for token in (None, "wrong", CLIENT_TOKEN):
        r = scrape(gw, token)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "gateway_" not in r.text
    r = scrape(gw, ADMIN_TOKEN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_a_scrape_token_reads_metrics_but_not_the_admin_api(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(metrics_token=SCRAPE_TOKEN)
    assert scrape(gw, SCRAPE_TOKEN).status_code == 200
    assert scrape(gw, ADMIN_TOKEN).status_code == 200
    assert scrape(gw, "wrong").status_code == 401
    denied = gw.http.post(
        "/admin/kill-all", json={"reason": "x"}, headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    )
    assert denied.status_code == 401 and gw.app.components.state.audit() == []


def test_metrics_without_any_token_configured_say_how_to_enable_them(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(admin_token=None)
    r = scrape(gw, "anything")
    assert r.status_code == 403 and "GATEWAY_METRICS_TOKEN" in r.json()["error"]["message"]


def test_metrics_auth_off_serves_anyone(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(metrics_auth="off", admin_token=None)
    assert scrape(gw).status_code == 200
    assert scrape(gw, "whatever").status_code == 200
