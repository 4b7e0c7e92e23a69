"""The operator console in a real browser: the system's chromium, headless, driven through its chromedriver by
Selenium (nothing downloaded), against a gateway on a real port in front of the simulated engine, with client
traffic flowing from a background thread.

Signing in, the routes page following the traffic without a reload, a kill from the page reaching the next
client requests and the audit log, a viewer's page without working buttons, forged and cross-origin posts
refused, the canary's statistics against their bounds, every page at 1280×800 and 390×844 without horizontal
overflow and with every control labelled. Each page's screenshot is saved under `$GATEWAY_SCREENSHOTS` (default
`var/screenshots/`); docs/console-routes.png and docs/console-canary.png, in the README, are two of them.

Skipped when chromium or chromedriver is missing, except in CI (`CI` set), where that fails: CI installs Debian's
`chromium` and `chromium-driver`.
"""

from __future__ import annotations

import http.server
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    CRM_POLICY,
    UPDATE_CRM,
    GatewayFactory,
    RunningGateway,
)

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
VIEWER_TOKEN = "test-viewer-token"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
PAGES = ("routes", "figures", "canaries", "shadow", "adapters", "audit", "loadtests")
POLICY = (
    CRM_POLICY
    + """
[canary]
candidate = "formatter"
baseline = "baseline"
steps = [10, 50, 100]
min_requests_per_step = 100000
min_minutes_per_step = 60
unit = "user"
on_fail = "hold"

[canary.guardrails]
invalid_call_rate = { alpha = 0.05 }
error_rate = { alpha = 0.05 }
latency_per_output_token = { max_ratio = 3.0, min_samples = 5 }
"""
)


def _programs() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    programs = _programs()
    if programs is None:
        if os.environ.get("CI"):
            pytest.fail(
                "CI is set but chromium or chromedriver is missing: apt-get install chromium chromium-driver"
            )
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = programs[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=programs[1]))
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def screenshots() -> Path:
    where = Path(os.environ.get("GATEWAY_SCREENSHOTS") or ROOT / "var" / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


class Traffic:
    """Client requests from a background thread, each remembered with when it was sent and who answered."""

    def __init__(self, gw: RunningGateway, per_s: float = 25.0) -> None:
        self.url = gw.url
        self.period = 1.0 / per_s
        self.answers: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        rng = random.Random(7)
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                sent = time.time()
                body = {
                    "model": "crm-assistant",
                    "messages": [{"role": "user", "content": "Set Globex to won, 5000 EUR."}],
                    "tools": [UPDATE_CRM],
                    "stream": rng.random() < 0.3,
                }
                headers = {
                    "authorization": f"Bearer {CLIENT_TOKEN}",
                    "x-user-id": f"user-{rng.randrange(400)}",
                }
                r = client.post("/v1/chat/completions", json=body, headers=headers)
                r.read()
                self.answers.append((sent, r.headers.get("x-gateway-variant", "")))
                self._stop.wait(self.period)

    def since(self, t: float) -> list[str]:
        return [variant for sent, variant in self.answers if sent >= t]


@pytest.fixture
def gateway(make_gateway: GatewayFactory, tmp_path: Path) -> RunningGateway:
    runs = tmp_path / "loadtests"
    (runs / "crm-compare-20260101T000000").mkdir(parents=True)
    (runs / "crm-compare-20260101T000000" / "report.html").write_text("<!doctype html><title>report</title>")
    return make_gateway(
        policies={"crm.toml": POLICY},
        viewer_token=VIEWER_TOKEN,
        canary_interval_s=0.2,
        console_refresh_s=1.0,
        loadtest_dir=runs,
    )


def wait(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        time.sleep(0.1)


def sign_in(driver: Any, gw: RunningGateway, token: str, page: str = "routes") -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.set_window_size(*SIZES["desktop"])
    driver.get(f"{gw.url}/console/{page}")
    assert "/console/sign-in" in driver.current_url  # signed out: only the sign-in page
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form.sign-in button[type=submit]").click()
    wait(lambda: driver.current_url.startswith(f"{gw.url}/console/{page}"), what="signed in")


def shoot(driver: Any, where: Path, name: str) -> Path:
    """The whole page at the window's width."""
    width = driver.execute_script("return window.innerWidth")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    size = driver.get_window_size()
    driver.set_window_size(size["width"], min(max(height + 100, size["height"]), 4000))
    path = where / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    assert width > 0 and path.stat().st_size > 1000
    return path


def share(driver: Any, variant: str) -> float:
    """The live share the page shows now (read in one script: the page replaces its figures as it refreshes)."""
    found = driver.execute_script(
        "const el = document.querySelector(arguments[0]); return el && el.dataset.share;",
        f'tr[data-variant="{variant}"] .live-share',
    )
    return float(found)


GUARDRAILS = """
return Array.from(document.querySelectorAll("tr[data-guardrail]"), (row) => ({
  name: row.dataset.guardrail,
  cells: Array.from(row.cells, (c) => c.textContent),
}));
"""


def test_sign_in_and_the_routes_page_follows_the_traffic(
    driver: Any, gateway: RunningGateway, screenshots: Path
) -> None:
    from selenium.webdriver.common.by import By

    sign_in(driver, gateway, ADMIN_TOKEN)
    section = driver.find_element(By.CSS_SELECTOR, 'section.route[data-route="crm-assistant"]')
    names = [
        row.get_attribute("data-variant")
        for row in section.find_elements(By.CSS_SELECTOR, "tr[data-variant]")
    ]
    assert names == ["baseline", "formatter"]
    assert share(driver, "baseline") == 0.0
    driver.execute_script("window.stillTheSamePage = true")
    with Traffic(gateway):
        wait(lambda: share(driver, "baseline") > 0.5 and share(driver, "formatter") > 0.0, what="live shares")
        assert driver.execute_script("return window.stillTheSamePage") is True  # refreshed in place
        first = share(driver, "baseline")
        wait(lambda: share(driver, "baseline") != first, what="the share moving")
    shoot(driver, screenshots, "routes")


def test_a_kill_from_the_page_reaches_the_next_requests_and_the_audit_log(
    driver: Any, gateway: RunningGateway, screenshots: Path
) -> None:
    from selenium.webdriver.common.by import By

    sign_in(driver, gateway, ADMIN_TOKEN)
    with Traffic(gateway) as traffic:
        wait(lambda: "formatter" in traffic.since(0), what="traffic on the candidate")
        driver.find_element(By.CSS_SELECTOR, '[aria-label="Kill crm-assistant/formatter"]').click()
        dialog = driver.find_element(By.ID, "confirm-dialog")
        wait(lambda: dialog.get_attribute("open") is not None, what="the confirmation dialog")
        driver.find_element(By.ID, "confirm-reason").send_keys("invalid calls rising")
        driver.find_element(By.ID, "confirm-ok").click()
        row = 'tr[data-variant="formatter"][data-state="killed"]'
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, row), what="the variant shown killed")
        killed_at = time.time()
        wait(lambda: len(traffic.since(killed_at)) >= 20, what="requests after the kill")
    assert set(traffic.since(killed_at)) == {"baseline"}
    entry = gateway.admin("GET", "/admin/audit").json()["entries"][0]
    assert (entry["action"], entry["actor"], entry["reason"]) == (
        "kill_variant",
        "console:admin",
        "invalid calls rising",
    )
    assert driver.find_elements(By.CSS_SELECTOR, '[aria-label="Revive crm-assistant/formatter"]')
    driver.get(f"{gateway.url}/console/audit")
    assert "console:admin" in driver.page_source and "invalid calls rising" in driver.page_source
    shoot(driver, screenshots, "audit")


FORGE = """
const done = arguments[arguments.length - 1];
const form = new URLSearchParams(arguments[0]);
fetch("/console/actions/kill", {method: "POST", body: form, credentials: "same-origin"})
  .then((r) => done(r.status), (e) => done(String(e)));
"""


def test_a_viewer_sees_everything_and_has_no_working_buttons(driver: Any, gateway: RunningGateway) -> None:
    from selenium.webdriver.common.by import By

    with Traffic(gateway):
        time.sleep(1.5)
    sign_in(driver, gateway, VIEWER_TOKEN)
    for page in PAGES:
        driver.get(f"{gateway.url}/console/{page}")
        assert driver.find_elements(By.CSS_SELECTOR, "main h1"), page
        assert driver.find_elements(By.CSS_SELECTOR, "form.action, #confirm-dialog") == [], page
    driver.get(f"{gateway.url}/console/routes")
    assert driver.find_elements(By.CSS_SELECTOR, 'tr[data-variant="formatter"]')
    csrf = driver.find_element(By.CSS_SELECTOR, "form[action='/console/sign-out'] input[name=csrf]")
    form = {
        "csrf": csrf.get_attribute("value"),
        "route": "crm-assistant",
        "variant": "formatter",
        "reason": "forged",
        "confirm": "yes",
    }
    assert driver.execute_async_script(FORGE, form) == 403  # the viewer's own session and CSRF token
    assert gateway.admin("GET", "/admin/status").json()["switches"]["variants"] == []


def test_a_post_without_the_csrf_token_or_from_another_origin_is_refused(
    driver: Any, gateway: RunningGateway
) -> None:
    from selenium.webdriver.common.by import By

    sign_in(driver, gateway, ADMIN_TOKEN)
    form = {"route": "crm-assistant", "variant": "formatter", "reason": "forged", "confirm": "yes"}
    assert driver.execute_async_script(FORGE, form) == 403
    assert driver.execute_async_script(FORGE, {**form, "csrf": "guessed"}) == 403
    csrf = driver.find_element(By.CSS_SELECTOR, "form.action input[name=csrf]").get_attribute("value")
    # Another origin (another port of the same host, so the same site: SameSite does not stop this one) with
    # the right CSRF token, even: its form posts in the signed-in browser.
    attack = (
        f'<!doctype html><form id="f" method="post" action="{gateway.url}/console/actions/kill">'
        + "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in {**form, "csrf": csrf}.items())
        + '</form><script>document.getElementById("f").submit()</script>'
    ).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait(lambda: "Error 403" in driver.page_source, what="the refusal")
        assert "own pages" in driver.page_source
    finally:
        server.shutdown()
    assert gateway.admin("GET", "/admin/status").json()["switches"]["variants"] == []
    assert [
        e for e in gateway.admin("GET", "/admin/audit").json()["entries"] if e["actor"].startswith("console")
    ] == []


def test_the_canary_page_shows_each_statistic_against_its_bound(
    driver: Any, gateway: RunningGateway, screenshots: Path
) -> None:
    from selenium.webdriver.common.by import By

    with Traffic(gateway) as traffic:
        wait(lambda: len(traffic.answers) > 60, what="traffic")
        sign_in(driver, gateway, ADMIN_TOKEN, page="canaries")
        state = driver.execute_script(
            "const el = document.querySelector('section.canary .state');"
            " return [el.dataset.status, el.textContent];"
        )
        assert state[0] == "running" and "step 1 of 3" in state[1]
        found = {row["name"]: row["cells"] for row in driver.execute_script(GUARDRAILS)}
        assert set(found) == {"invalid_call_rate", "error_rate", "latency_per_output_token"}
        for name in ("invalid_call_rate", "error_rate"):
            assert float(found[name][1]) >= 0 and found[name][2] == "20"  # the statistic, against 1/alpha
        charts = driver.execute_script(
            "return Array.from(document.querySelectorAll('section.canary svg.chart'),"
            " (svg) => svg.querySelectorAll('path.bound').length);"
        )
        assert charts == [1, 1, 1]  # a chart per guardrail, each with its bound
        wait(
            lambda: driver.find_elements(By.CSS_SELECTOR, "section.canary svg.chart path.line[d^='M']"),
            what="a statistic drawn",
        )
        for button in ("Pause", "Promote", "Abort"):  # what applies to a running canary
            assert driver.find_elements(
                By.CSS_SELECTOR, f'[aria-label="{button} the canary of crm-assistant"]'
            )
        assert not driver.find_elements(By.CSS_SELECTOR, '[aria-label="Resume the canary of crm-assistant"]')
        shoot(driver, screenshots, "canary")


WIDE = """
return Array.from(document.querySelectorAll("body *"))
  .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5 && !el.closest(".scroll"))
  .map((el) => el.tagName + "." + el.className + " " + Math.round(el.getBoundingClientRect().right))
  .slice(0, 5);
"""


# The page's width once two frames have been drawn (measured at once, right after the load event, Chrome
# sometimes still reports the layout of a moment before).
SETTLED = """
const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() =>
  done([document.documentElement.scrollWidth, window.innerWidth])));
"""


UNLABELLED = """
return Array.from(document.querySelectorAll("input:not([type=hidden]), select, textarea, button"))
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.textContent.trim())
  .map((el) => el.outerHTML);
"""


def test_every_page_fits_both_sizes_and_labels_its_controls(
    driver: Any, gateway: RunningGateway, screenshots: Path
) -> None:
    with Traffic(gateway):
        time.sleep(3)
        sign_in(driver, gateway, ADMIN_TOKEN)
        for size, (width, height) in SIZES.items():
            driver.set_window_size(width, height)
            for page in PAGES:
                driver.get(f"{gateway.url}/console/{page}")
                overflow = driver.execute_async_script(SETTLED)
                assert overflow[0] <= overflow[1], (page, size, overflow, driver.execute_script(WIDE))
                assert driver.execute_script(UNLABELLED) == [], (page, size)
                shoot(driver, screenshots, f"{page}-{size}")
    report = f"{gateway.url}/console/loadtests/crm-compare-20260101T000000/report.html"
    driver.get(report)
    wait(lambda: driver.title == "report", what="the load-test report")
