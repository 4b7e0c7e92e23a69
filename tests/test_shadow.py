"""Shadow copies through real gateways in front of the simulated engine: every copy is paired with the request it
copied, in the policy's share; a slow, failing or unreachable shadow variant changes nothing a user gets, nor
their record, in any tool-call mode; the user's disconnect does not cancel a copy and shutdown drains or ends it;
copies over the in-flight limit or the budget, or to a killed variant, are dropped and counted; and the paired
report on a known setup points the right way with a McNemar p far below 0.01."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli.main import main
from gateway.control.policies import load_policies
from gateway.drain import Drain
from gateway.engine import EnginePool
from gateway.openai_types import parse_chat_request
from gateway.policy import Switches, Timeouts, plan
from gateway.records import Record
from gateway.settings import Settings
from gateway.shadow.copies import HourlyBudget, ShadowCopies
from gateway.store.request_log import RecordWriter, read_records
from gateway.telemetry import Telemetry
from gateway.toolcalls import SchemaCache, expectation_from_request
from tests.conftest import (
    CLIENT_TOKEN,
    FORCER_TOKEN,
    UPDATE_CRM,
    AppGatewayFactory,
    Gateway,
    GatewayFactory,
    free_port,
    start_app_gateway,
    wait_for,
    write_keys,
)

MESSAGES = [{"role": "user", "content": "Update ACC-1: stage won, amount 18500."}]


def policy(
    shadow_model: str | None = "always-invalid",
    *,
    route: str = "crm-assistant",
    share: float = 100,
    tool_calls: str = "annotate",
    baseline: str = "crm-base",
    engine: str = "default",
    max_in_flight: int = 64,
    extra: str = "",
) -> str:
    """A route served wholly by `baseline`, with a zero-weight `candidate` on `shadow_model` as its shadow."""
    text = f"""
route = "{route}"
tool_calls = "{tool_calls}"
fallback = ["baseline"]

[variants.baseline]
model = "{baseline}"
weight = 100
price = {{ input_per_mtok = 0.40, output_per_mtok = 1.20, currency = "EUR" }}
"""
    if shadow_model is None:
        return text
    return (
        text
        + f"""
[variants.candidate]
model = "{shadow_model}"
engine = "{engine}"
weight = 0
price = {{ input_per_mtok = 0.30, output_per_mtok = 0.90, currency = "EUR" }}

[shadow]
variant = "candidate"
share = {share}
max_in_flight = {max_in_flight}
{extra}
"""
    )


def chat(
    gw: Gateway, *, stream: bool = False, route: str = "crm-assistant", token: str = CLIENT_TOKEN
) -> httpx.Response:
    body: dict[str, Any] = {"model": route, "messages": MESSAGES, "tools": [UPDATE_CRM], "stream": stream}
    return gw.http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})


def settled(gw: Gateway, timeout: float = 15.0) -> tuple[list[Record], list[Record]]:
    """(served records, shadow records), once every copy in flight has submitted its record."""
    wait_for(lambda: gw.app.components.shadows.inflight == 0, timeout=timeout)
    records = gw.records()
    return [r for r in records if not r.shadow], [r for r in records if r.shadow]


def sim_requests(gw: Gateway, model: str) -> int:
    """Requests the simulated engine has had for `model` (the engine is shared by the session: compare deltas)."""
    stats = httpx.get(gw.settings.engines["default"] + "/sim/stats", timeout=10).json()  # type: ignore[operator]
    return int(stats["requests"].get(model, 0))


# --- pairing ----------------------------------------------------------------------------------------------


def test_every_copy_names_its_primary_and_the_copied_share_is_the_policys(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("always-invalid", share=30)})
    n = 400
    answers = [chat(gw, stream=i % 4 == 0) for i in range(n)]
    assert all(r.status_code == 200 and r.headers["x-gateway-variant"] == "baseline" for r in answers)
    assert not any("shadow" in h.lower() or "candidate" in v for r in answers for h, v in r.headers.items())
    served, copies = settled(gw)
    assert len(served) == n and not any(r.primary_id for r in served)
    by_id = {r.request_id: r for r in served}
    assert all(c.primary_id in by_id for c in copies)
    assert len({c.primary_id for c in copies}) == len(copies)  # at most one copy per request
    # Binomial: 30 % of 400 is 120, sd 9.2; 4.5 sd either side fails a correct gateway once in 150,000 runs.
    assert abs(len(copies) - n * 0.3) <= 4.5 * math.sqrt(n * 0.3 * 0.7)
    for copy in copies:
        primary = by_id[copy.primary_id or ""]
        assert copy.request_id == f"{primary.request_id}-shadow"
        assert (copy.route, copy.variant, copy.engine_model, copy.key_name) == (
            "crm-assistant",
            "candidate",
            "always-invalid",
            primary.key_name,
        )
        assert copy.stream == primary.stream  # as_sent
        assert (copy.status, copy.outcome, copy.tool_verdict) == (200, "ok", "invalid")
        assert copy.cost is not None and copy.currency == "EUR" and copy.share == 0.3
        assert copy.e2e_s is not None and copy.input_tokens and copy.output_tokens
        assert copy.ts >= primary.ts
    assert any(c.stream for c in copies) and any(c.ttft_s is not None for c in copies if c.stream)


def test_non_stream_mode_copies_a_stream_as_a_plain_request(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("crm-formatter", extra='stream = "non_stream"')})
    events = chat(gw, stream=True).text
    assert events.rstrip().endswith("data: [DONE]")
    (primary,), (copy,) = settled(gw)
    assert primary.stream and not copy.stream
    assert (copy.outcome, copy.tool_verdict, copy.ttft_s) == ("ok", "valid", None)


def test_a_forced_request_and_one_the_shadow_variant_serves_are_not_copied(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("crm-formatter")})
    body = {"model": "crm-assistant", "messages": MESSAGES, "tools": [UPDATE_CRM]}
    for variant in ("baseline", "candidate"):
        headers = {"Authorization": f"Bearer {FORCER_TOKEN}", "x-gateway-variant": variant}
        assert gw.http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
    assert chat(gw).status_code == 200
    served, copies = settled(gw)
    assert [r.forced for r in served] == [True, True, False]
    assert [c.primary_id for c in copies] == [served[2].request_id]  # only the request placed by policy


def test_the_shadow_draw_leaves_the_routing_draw_alone(tmp_path: Path, sim_engine_url: str) -> None:
    """Without a sticky key each request takes one routing draw; copying it must not take another."""
    (tmp_path / "policies").mkdir()
    split = (
        policy("crm-formatter").replace("weight = 100", "weight = 50").replace("weight = 0", "weight = 50")
    )
    (tmp_path / "policies" / "crm.toml").write_text(split)
    draws = [0.1, 0.9, 0.3, 0.7, 0.45, 0.55]
    taken: list[float] = []

    def draw() -> float:
        taken.append(draws[len(taken)])
        return taken[-1]

    settings = Settings(
        policies_dir=tmp_path / "policies",
        engines={"default": sim_engine_url},
        data_dir=tmp_path / "var",
        keys_file=write_keys(tmp_path / "keys.toml"),
    )
    gw = start_app_gateway(settings, draw=draw)
    try:
        variants = [chat(gw).headers["x-gateway-variant"] for _ in draws]
        served, copies = settled(gw)
    finally:
        gw.stop()
    assert taken == draws  # one routing draw per request, none for the copies
    assert variants == ["baseline", "candidate", "baseline", "candidate", "baseline", "candidate"]
    assert len(copies) == 3 and {c.primary_id for c in copies} == {
        r.request_id for r in served if r.variant == "baseline"
    }


# --- isolation --------------------------------------------------------------------------------------------


def test_a_shadow_that_takes_2_s_per_answer_does_not_slow_anyone(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(
        policies={
            "crm.toml": policy("sleepy"),
            "plain.toml": policy(None, route="plain"),
        }
    )
    client_s: dict[str, list[float]] = {"crm-assistant": [], "plain": []}
    for i in range(40):
        for route in ("crm-assistant", "plain"):  # side by side: the same machine, the same moment
            started = time.perf_counter()
            response = chat(gw, route=route, token=FORCER_TOKEN, stream=i % 2 == 1)
            client_s[route].append(time.perf_counter() - started)
            assert response.status_code == 200
    assert gw.app.components.shadows.inflight > 10  # the copies were still running meanwhile
    served, copies = settled(gw)
    e2e = {route: [r.e2e_s or 0.0 for r in served if r.route == route] for route in client_s}
    # Generous: the copies share the event loop, but never the user's wait for a 2 s answer.
    assert statistics.median(e2e["crm-assistant"]) < statistics.median(e2e["plain"]) + 0.25
    assert max(e2e["crm-assistant"]) < 1.0 and max(client_s["crm-assistant"]) < 1.0
    assert len(copies) == 40 and all(c.outcome == "ok" and (c.e2e_s or 0) >= 2.0 for c in copies)


@pytest.mark.parametrize("failure", ["engine_5xx", "connection_refused", "broken_stream"])
def test_a_failing_shadow_changes_nothing_the_user_gets(
    make_app_gateway: AppGatewayFactory, sim_engine_url: str, failure: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    shadowed = {
        "engine_5xx": policy("broken", baseline="crm-formatter"),
        "connection_refused": policy("crm-formatter", baseline="crm-formatter", engine="dead"),
        "broken_stream": policy("midstream", baseline="crm-formatter"),
    }[failure]
    gw = make_app_gateway(
        policies={"crm.toml": shadowed, "plain.toml": policy(None, route="plain", baseline="crm-formatter")},
        engines={"default": sim_engine_url, "dead": dead},
    )
    for stream in (False, True, False, True):
        with_copy = chat(gw, stream=stream, token=FORCER_TOKEN)
        without = chat(gw, route="plain", token=FORCER_TOKEN, stream=stream)
        assert with_copy.status_code == without.status_code == 200
        assert _shape(with_copy) == _shape(without)
    served, copies = settled(gw)
    assert all(r.outcome == "ok" and r.variant == "baseline" and r.fallback_from is None for r in served)
    assert len(copies) == 4
    expected = {
        "engine_5xx": {("engine_error", "engine_error")},
        "connection_refused": {("engine_error", "engine_unreachable")},
        "broken_stream": {
            ("stream_error", "engine_stream_error"),
            ("ok", None),
        },  # a plain request does not break
    }[failure]
    assert {(c.outcome, c.error_code) for c in copies} == expected
    if failure == "connection_refused":
        assert {c.engine_url for c in copies} == {dead}


def _shape(response: httpx.Response) -> tuple[Any, ...]:
    """What a user can tell about an answer, less what differs per request (ids, the route's name, how the
    simulated engine happened to split a stream's text)."""
    skip = {"x-request-id", "x-gateway-route", "content-length", "date"}
    headers = sorted((k, v) for k, v in response.headers.items() if k not in skip)
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e]
        return headers, events[-2:], '"tool_calls"' in response.text, '"error"' in response.text
    body = response.json()
    return headers, body["choices"][0]["finish_reason"], bool(body["choices"][0]["message"].get("tool_calls"))


def test_enforce_mode_on_the_primary_is_unaffected_by_an_invalid_shadow(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(
        policies={"crm.toml": policy("always-invalid", baseline="crm-formatter", tool_calls="enforce")}
    )
    for stream in (False, True) * 5:
        response = chat(gw, stream=stream)
        assert response.status_code == 200
        if stream:  # the held tool-call deltas were released, with the verdict at the end
            assert '"tool_calls"' in response.text and "x-gateway-tool-calls=valid" in response.text
        else:
            assert response.headers["x-gateway-tool-calls"] == "valid"
    served, copies = settled(gw)
    assert all((r.outcome, r.tool_verdict, r.fallback_from) == ("ok", "valid", None) for r in served)
    # The copy's invalid call is recorded, not enforced: no retry on a fallback, no error.
    assert len(copies) == 10
    assert all((c.outcome, c.tool_verdict, c.fallback_from) == ("ok", "invalid", None) for c in copies)


def test_the_users_disconnect_does_not_cancel_the_copy(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(policies={"crm.toml": policy("sleepy", baseline="slow")})
    body = {"model": "crm-assistant", "messages": MESSAGES, "tools": [UPDATE_CRM]}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on its 3 s answer and hangs up
        httpx.post(
            gw.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {CLIENT_TOKEN}"},
            timeout=0.5,
        )
    (primary,), (copy,) = settled(gw)
    assert primary.outcome == "client_disconnected"
    assert (copy.outcome, copy.primary_id, copy.tool_verdict) == ("ok", primary.request_id, "valid")
    assert (copy.e2e_s or 0) >= 2.0


@pytest.mark.parametrize(("drain_s", "outcome"), [(0.5, "server_shutdown"), (10.0, "ok")])
def test_shutdown_drains_a_copy_or_ends_it_at_the_drain_deadline(
    make_app_gateway: AppGatewayFactory, drain_s: float, outcome: str
) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("sleepy")}, drain_s=drain_s)
    assert chat(gw).status_code == 200
    assert gw.app.components.shadows.inflight == 1
    started = time.perf_counter()
    gw.stop()
    took = time.perf_counter() - started
    records = read_records(gw.app.components.records.where)
    (copy,) = [r for r in records if r.shadow]
    assert copy.outcome == outcome
    if outcome == "ok":  # drained: the copy's 2 s answer was waited for, well within the 10 s deadline
        assert 1.0 < took < 8.0
    else:  # ended at the deadline, its record written
        assert took < 1.9 and copy.error_code == "server_shutting_down"


# --- limits -----------------------------------------------------------------------------------------------


def test_over_the_in_flight_limit_copies_are_dropped_and_counted_never_queued(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("sleepy", max_in_flight=2)})
    sent_before = sim_requests(gw, "sleepy")
    for _ in range(10):
        assert chat(gw).status_code == 200
    assert gw.app.components.shadows.inflight == 2
    _, copies = settled(gw)
    sent = [c for c in copies if c.outcome != "shadow_dropped"]
    dropped = [c for c in copies if c.outcome == "shadow_dropped"]
    assert len(sent) == 2 and all(c.outcome == "ok" for c in sent)
    assert len(dropped) == 8 and {c.error_code for c in dropped} == {"in_flight_limit"}
    assert sim_requests(gw, "sleepy") - sent_before == 2  # the dropped copies were never sent, not even later
    metrics = gw.admin("GET", "/metrics").text
    assert (
        'gateway_shadow_dropped_total{route="crm-assistant",variant="candidate",reason="in_flight_limit"} 8'
        in metrics
    )
    assert chat(gw).status_code == 200  # room again: the next copy goes
    _, copies = settled(gw)
    assert sum(c.outcome == "ok" for c in copies) == 3


def test_a_killed_shadow_variant_gets_no_copies(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("crm-formatter")})
    killed = gw.admin("POST", "/admin/routes/crm-assistant/variants/candidate/kill", json={"reason": "bad"})
    assert killed.status_code == 200
    sent_before = sim_requests(gw, "crm-formatter")
    for _ in range(5):
        assert chat(gw).headers["x-gateway-variant"] == "baseline"
    _, copies = settled(gw)
    assert [(c.outcome, c.error_code) for c in copies] == [("shadow_dropped", "killed")] * 5
    assert sim_requests(gw, "crm-formatter") == sent_before
    assert 'reason="killed"} 5' in gw.admin("GET", "/metrics").text
    gw.admin("POST", "/admin/routes/crm-assistant/variants/candidate/revive", json={"reason": "fixed"})
    chat(gw)
    _, copies = settled(gw)
    assert copies[-1].outcome == "ok" and sim_requests(gw, "crm-formatter") == sent_before + 1


def test_over_the_hourly_budget_copies_stop(make_app_gateway: AppGatewayFactory) -> None:
    # One copy costs about 0.00002 EUR (input ~ 60 tokens at 0.30 per million, 12 output at 0.90).
    gw = make_app_gateway(policies={"crm.toml": policy("crm-formatter", extra="max_cost_per_hour = 0.00001")})
    chat(gw)
    _, (first,) = settled(gw)
    assert first.outcome == "ok" and (first.cost or 0) > 0.00001
    for _ in range(4):
        chat(gw)
    _, copies = settled(gw)
    assert [(c.outcome, c.error_code) for c in copies[1:]] == [("shadow_dropped", "budget")] * 4
    assert 'reason="budget"} 4' in gw.admin("GET", "/metrics").text


def test_the_budget_is_spent_per_clock_hour() -> None:
    budget = HourlyBudget()
    hour = 3600.0 * 490_000  # some hour since the epoch
    assert not budget.over(1.0, hour + 10)
    budget.spend(0.6, hour + 10)
    budget.spend(None, hour + 11)  # an unpriced answer
    budget.spend(math.nan, hour + 12)
    assert not budget.over(1.0, hour + 20) and not budget.over(None, hour + 20)
    budget.spend(0.4, hour + 30)
    assert budget.over(1.0, hour + 3599)
    assert not budget.over(1.0, hour + 3600)  # the hour turned
    budget.spend(0.1, hour + 3601)
    assert budget.spent == pytest.approx(0.1) and not budget.over(1.0, hour + 3602)


# --- reading ----------------------------------------------------------------------------------------------


def test_the_paired_report_shows_a_worse_shadow_with_mcnemar(
    make_app_gateway: AppGatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = make_app_gateway(policies={"crm.toml": policy("always-invalid", baseline="crm-base")})
    for i in range(150):
        assert chat(gw, stream=i % 3 == 0).status_code == 200
    served, copies = settled(gw)
    assert len(copies) == 150
    answer = gw.admin("GET", "/admin/shadow/crm-assistant")
    assert answer.status_code == 200
    data = answer.json()
    assert data["shadow"]["variant"] == "candidate" and data["in_flight"] == 0
    (summary,) = data["summaries"]
    assert (summary["variant"], summary["pairs"], summary["unpaired"], summary["copies"]) == (
        "candidate",
        150,
        0,
        150,
    )
    assert summary["served_by"] == {"baseline": 150}
    served_invalid = sum(r.tool_verdict == "invalid" for r in served)
    assert 3 <= served_invalid <= 35  # crm-base: 10 % invalid (a fluke outside this fails once in ~10^6 runs)
    assert summary["served"]["invalid"] == served_invalid and summary["shadow"]["invalid"] == 150
    assert (
        summary["difference"] > 0 and summary["difference_ci"][0] > 0.5
    )  # the shadow is worse: the whole interval says so
    assert summary["mcnemar_p"] < 0.01 and summary["mcnemar_method"] == "chi2-cc"
    assert summary["table"]["n10"] == 0 and summary["table"]["n01"] == 150 - served_invalid
    assert summary["served"]["e2e"]["p50"] > 0 and summary["latency_ratio"]["p50"] > 0
    assert set(summary["served"]["cost_per_1k"]) == set(summary["shadow"]["cost_per_1k"]) == {"EUR"}
    assert gw.admin("GET", "/admin/shadow/nope").status_code == 404
    assert gw.http.get("/admin/shadow/crm-assistant").status_code == 401
    # gateway report reads the request log directly: the same comparison, and served figures without copies.
    assert main(["report", "--db", str(gw.settings.records_db)]) == 0
    text = capsys.readouterr().out
    assert "shadow crm-assistant: candidate, 150 pairs" in text and "McNemar p = " in text
    assert main(["report", "--json", "--db", str(gw.settings.records_db)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["variant"], r["requests"]) for r in rows] == [("baseline", 150)]
    assert main(["report", "--shadow", "--json", "--db", str(gw.settings.records_db)]) == 0
    (shadow_json,) = json.loads(capsys.readouterr().out)
    assert shadow_json["pairs"] == 150 and shadow_json["mcnemar_p"] == summary["mcnemar_p"]


# --- the copies' own bookkeeping --------------------------------------------------------------------------


def test_a_copy_cut_off_before_its_first_step_still_has_its_record(
    tmp_path: Path, sim_engine_url: str
) -> None:
    """The drain deadline may cancel a copy the same instant it was started: its coroutine never runs, and the
    copy must still release its counts and submit its record."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "crm.toml").write_text(policy("crm-formatter"))
    route = load_policies(
        tmp_path / "policies", {"default": sim_engine_url}, Timeouts(2.0, 60.0, 300.0)
    ).routes["crm-assistant"]
    shadow = plan(route, Switches()).shadow
    assert shadow is not None
    body = {"model": "crm-assistant", "messages": MESSAGES, "tools": [UPDATE_CRM]}
    writer = RecordWriter(tmp_path / "requests.db")
    writer.start()
    inflight: Counter[str] = Counter()

    async def scenario() -> tuple[int, int]:
        engines = EnginePool({"default": sim_engine_url})
        await engines.start()
        schemas = SchemaCache()
        copies = ShadowCopies(
            engines=engines, schemas=schemas, records=writer, telemetry=Telemetry(), engine_inflight=inflight
        )
        try:
            req = parse_chat_request(json.dumps(body).encode())
            primary = Record(ts=1.0, request_id="p1", route="crm-assistant", variant="baseline")
            exp = expectation_from_request(req.body, schemas)
            copies.offer(primary, req, route, shadow, route.variants[0], exp)
            started = copies.inflight
            copies.cut_off()  # no await in between: the copy's task has not taken a step
            await copies.close(0.0)
            copies.offer(primary, req, route, shadow, route.variants[0], exp)  # closed: nothing more starts
            return started, copies.inflight + copies.running("crm-assistant")
        finally:
            await engines.close()

    started, left = asyncio.run(scenario())
    writer.close()
    assert (started, left, sum(inflight.values())) == (1, 0, 0)
    (copy,) = read_records(tmp_path / "requests.db")
    assert (copy.shadow, copy.primary_id, copy.outcome, copy.error_code) == (
        True,
        "p1",
        "server_shutdown",
        "server_shutting_down",
    )


def test_the_drain_says_how_long_is_left() -> None:
    async def scenario() -> tuple[float, float]:
        drain = Drain(5.0)
        before = drain.remaining()
        drain.begin(lambda: None)
        await asyncio.sleep(0.05)
        during = drain.remaining()
        drain.close()
        return before, during

    before, during = asyncio.run(scenario())
    assert before == 5.0 and 4.0 < during < 4.96
