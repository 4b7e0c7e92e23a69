"""Who may read `/metrics`: with GATEWAY_METRICS_AUTH=on (the default) a scraper presents the metrics token (or the
admin token) as a bearer token; with `off` anyone who reaches the listener may."""

from __future__ import annotations

import httpx

from tests.conftest import ADMIN_TOKEN, CLIENT_TOKEN, GatewayFactory

SCRAPE_TOKEN = "scrape-token-for-prometheus"


def scrape(url: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(url + "/metrics", headers=headers, timeout=10.0)


def test_metrics_need_a_token_by_default(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    for token in (None, "wrong", CLIENT_TOKEN):
        r = scrape(gw.url, token)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "gateway_" not in r.text
    r = scrape(gw.url, ADMIN_TOKEN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_a_scrape_token_reads_metrics_but_not_the_admin_api(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(metrics_token=SCRAPE_TOKEN)
    assert scrape(gw.url, SCRAPE_TOKEN).status_code == 200
    assert scrape(gw.url, ADMIN_TOKEN).status_code == 200
    assert scrape(gw.url, "wrong").status_code == 401
    denied = httpx.post(
        gw.url + "/admin/kill-all", json={"reason": "x"}, headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    )
    assert denied.status_code == 401 and gw.app.components.state.audit() == []


def test_metrics_without_any_token_configured_say_how_to_enable_them(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(admin_token=None)
    r = scrape(gw.url, "anything")
    assert r.status_code == 403 and "GATEWAY_METRICS_TOKEN" in r.json()["error"]["message"]


def test_metrics_auth_off_serves_anyone(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(metrics_auth="off", admin_token=None)
    assert scrape(gw.url).status_code == 200
    assert scrape(gw.url, "whatever").status_code == 200
