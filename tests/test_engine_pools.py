"""Engine pools against real simulated engines on loopback: a member killed and restarted under a stream of requests
costs no request, is ejected and readmitted, and gets its adapters back alone; a failure before the first byte is
tried on another member before the route's fallback variant; records name the member; readiness and the admin
status show each member."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.adapter_factory import adapter_policy, make_adapter
from tests.conftest import (
    FORCER_TOKEN,
    GatewayFactory,
    RunningGateway,
    SimEngineProcess,
    engine_models,
    free_port,
    sdk_client,
    wait_for,
)

MESSAGES = [{"role": "user", "content": "Hooli: negotiation, 9000 EUR."}]
FAILING = """
seed = 7
[models.crm-base]
error_rate = 1.0
"""
ROUTE = """
route = "r"
fallback = ["spare"]

[variants.main]
model = "crm-base"
engine = "pool"
weight = 1

[variants.spare]
model = "crm-formatter"
engine = "spare"
weight = 0
"""


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    make_adapter(root, version="2", seed=2)
    return root


@pytest.fixture
def pair() -> Iterator[tuple[SimEngineProcess, SimEngineProcess]]:
    """Two simulated engines of this test's own: one pool's members."""
    a, b = SimEngineProcess(), SimEngineProcess()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def failing(tmp_path: Path) -> Iterator[Callable[[], SimEngineProcess]]:
    """Starts simulated engines that answer every crm-base request with a 500."""
    behaviour = tmp_path / "failing.toml"
    behaviour.write_text(FAILING)
    started: list[SimEngineProcess] = []

    def start() -> SimEngineProcess:
        started.append(SimEngineProcess(behaviour))
        return started[-1]

    yield start
    for engine in started:
        engine.stop()


def members(gw: RunningGateway, engine: str = "default") -> dict[str, dict[str, Any]]:
    """The pool's members as the admin status shows them, by URL."""
    listed = gw.admin("GET", "/admin/status").json()["engines"][engine]
    return {m["url"]: m for m in listed}


def served(engine: SimEngineProcess, model: str) -> int:
    return int(engine.stats()["requests"].get(model, 0))


class Load:
    """Clients sending one request after another (both variants, streams and not) until stopped; every answer
    that is not a complete 200 is a failure."""

    def __init__(self, gw: RunningGateway, clients: int = 3) -> None:
        self.gw = gw
        self.failures: list[str] = []
        self.done = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        client = sdk_client(self.gw, FORCER_TOKEN)
        n = seed
        while not self._stop.is_set():
            variant, stream = ("baseline", "formatter")[n % 2], n % 3 == 0
            n += 1
            try:
                self._one(client, variant, stream)
            except openai.APIError as exc:
                self.failures.append(f"{variant} stream={stream}: {exc!r}")
            self.done += 1

    def _one(self, client: openai.OpenAI, variant: str, stream: bool) -> None:
        headers = {"x-gateway-variant": variant}
        if not stream:
            client.chat.completions.create(model="crm-assistant", messages=MESSAGES, extra_headers=headers)
            return
        chunks = client.chat.completions.create(
            model="crm-assistant",
            messages=MESSAGES,
            extra_headers=headers,
            stream=True,
        )
        if not any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks):
            self.failures.append(f"{variant}: a stream without its finish chunk")

    def more(self, n: int) -> None:
        """Wait for `n` more answers."""
        target = self.done + n
        wait_for(lambda: self.done >= target, timeout=20)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def test_a_member_killed_and_restarted_under_load_costs_no_request(
    make_gateway: GatewayFactory,
    adapters: Path,
    pair: tuple[SimEngineProcess, SimEngineProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = pair
    gw = make_gateway(
        {"crm.toml": adapter_policy("2", weight=50)},
        adapters_dir=adapters,
        engines={"default": [a.url, b.url]},
        reconcile_s=0.3,
        engine_probe_s=0.2,
        engine_max_backoff_s=0.5,
    )
    wait_for(lambda: all("crm-formatter@2" in engine_models(m.url) for m in pair))
    load = Load(gw)
    try:
        wait_for(lambda: served(b, "crm-base") > 0 and served(b, "crm-formatter@2") > 0)
        b.kill()
        wait_for(lambda: members(gw)[b.url]["health"] != "healthy")  # ejected
        load.more(30)  # served by a alone meanwhile
        restarted = time.time()
        b.start()  # on its port again, without the adapters it had
        wait_for(lambda: members(gw)[b.url]["health"] == "healthy")  # readmitted
        wait_for(lambda: "crm-formatter@2" in engine_models(b.url))  # reloaded there alone
        wait_for(lambda: served(b, "crm-base") > 0 and served(b, "crm-formatter@2") > 0)  # and serving again
    finally:
        load.stop()
    assert load.failures == []
    retried = [r.getMessage() for r in caplog.records if "retrying on" in r.getMessage()]
    assert retried and all(f"at {b.url} failed" in m for m in retried)  # requests did meet the dead member
    records = gw.records()
    assert len(records) == load.done  # one record per request, retried or not
    assert {(r.outcome, r.fallback_from) for r in records} == {
        ("ok", None)
    }  # retried in the pool, no fallback
    assert {r.engine_url for r in records} == {a.url, b.url}
    assert any(r.engine_url == b.url and r.ts > restarted for r in records)
    loads = Counter(
        e["detail"]["member"]
        for e in gw.admin("GET", "/admin/audit?limit=1000").json()["entries"]
        if e["action"] == "adapter_load"
    )
    assert loads == {a.url: 1, b.url: 2}  # b at start and after its restart; a never again
    assert a.stats()["adapter_loads"] == 1
    assert {m["outstanding"] for m in members(gw).values()} == {0}  # every request's count given back


def test_a_failure_before_the_first_byte_is_retried_on_another_member_before_any_fallback(
    make_gateway: GatewayFactory,
    sim_engine_url: str,
    failing: Callable[[], SimEngineProcess],
) -> None:
    bad = failing()
    gw = make_gateway(
        {"r.toml": ROUTE},
        engines={"default": sim_engine_url, "pool": [bad.url, sim_engine_url], "spare": sim_engine_url},
    )
    client = sdk_client(gw, FORCER_TOKEN)
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(model="r", messages=MESSAGES)
        assert raw.headers["x-gateway-variant"] == "main"
    assert bad.stats()["injected_errors"] >= 1  # the first request went to it: round-robin starts there
    records = gw.records()
    assert [(r.variant, r.fallback_from, r.outcome, r.engine_url) for r in records] == [
        ("main", None, "ok", sim_engine_url)
    ] * 4


def test_the_fallback_variant_comes_only_after_every_member_tried_failed(
    make_gateway: GatewayFactory,
    sim_engine_url: str,
    failing: Callable[[], SimEngineProcess],
) -> None:
    bad, worse = failing(), failing()
    gw = make_gateway(
        {"r.toml": ROUTE},
        engines={"default": sim_engine_url, "pool": [bad.url, worse.url], "spare": sim_engine_url},
    )
    raw = sdk_client(gw, FORCER_TOKEN).chat.completions.with_raw_response.create(model="r", messages=MESSAGES)
    assert raw.headers["x-gateway-variant"] == "spare"
    assert (bad.stats()["injected_errors"], worse.stats()["injected_errors"]) == (1, 1)  # one try each
    (rec,) = gw.records()
    assert (rec.variant, rec.fallback_from, rec.fallback_reason) == ("spare", "main", "engine_error")
    assert (rec.outcome, rec.engine_url) == ("ok", sim_engine_url)


def test_with_no_fallback_the_client_gets_the_engine_error_and_the_record_names_the_last_member(
    make_gateway: GatewayFactory, failing: Callable[[], SimEngineProcess]
) -> None:
    bad, worse = failing(), failing()
    text = 'route = "r"\n[variants.main]\nmodel = "crm-base"\nweight = 1\n'
    gw = make_gateway({"r.toml": text}, engines={"default": [bad.url, worse.url]})
    with pytest.raises(openai.APIStatusError) as err:
        sdk_client(gw, FORCER_TOKEN).chat.completions.create(model="r", messages=MESSAGES)
    assert err.value.status_code == 502
    assert err.value.body == {  # the envelope as before pools: the engine's name, never a member's URL
        "message": "Engine 'default' answered 500: simulated engine failure",
        "type": "upstream_error",
        "param": None,
        "code": "engine_error",
    }
    (rec,) = gw.records()
    assert (rec.outcome, rec.error_code, rec.engine_url) == ("engine_error", "engine_error", worse.url)


def test_readiness_needs_one_member_of_each_pool_and_shows_every_member(
    make_gateway: GatewayFactory, sim_engine_url: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway(engines={"default": [dead, sim_engine_url]})
    ready = httpx.get(gw.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["engines"] == {"default": "ok"}
    listed = {m["url"]: m for m in ready.json()["members"]["default"]}
    assert listed[sim_engine_url]["ready"] == "ok"
    assert listed[dead]["ready"] == f"Engine 'default' at {dead}: GET v1/models failed: ClientConnectorError."
    answer = sdk_client(gw, FORCER_TOKEN).chat.completions.with_raw_response.create(
        model="crm-assistant",
        messages=MESSAGES,
        extra_headers={"x-gateway-variant": "baseline"},
    )
    assert answer.status_code == 200
    down = make_gateway(engines={"default": [dead, f"http://127.0.0.1:{free_port()}"]})
    not_ready = httpx.get(down.url + "/readyz", timeout=10)
    assert not_ready.status_code == 503 and not_ready.json()["engines"]["default"].count("failed") == 2


def test_a_dead_member_is_ejected_by_its_probe_and_the_status_says_so(
    make_gateway: GatewayFactory, sim_engine_url: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway(engines={"default": [dead, sim_engine_url]}, engine_probe_s=0.05, engine_eject_after=2)
    wait_for(lambda: members(gw)[dead]["health"] in ("ejected", "half_open"))  # no request needed
    assert members(gw)[sim_engine_url]["health"] == "healthy"
    status = members(gw)[dead]
    assert status["failures"] == 0 and status["outstanding"] == 0
