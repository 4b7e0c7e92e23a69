"""Canaries end to end: gateways in front of the simulated engine, the openai SDK as the client, real SQLite
files. The gateway decides by itself (kill, advance, promote), operators pause / resume / promote / abort, the
state survives a restart, two gateway processes sharing the databases decide once, and a drill measures the time
back to the baseline in milliseconds. The gateway runs in process (tests/conftest.py) except where a `gateway`
subprocess (the CLI, a second `gateway serve`) must reach it by URL."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    CRM_POLICY,
    FORCER_TOKEN,
    UPDATE_CRM,
    AppGatewayFactory,
    Gateway,
    GatewayFactory,
    RunningGateway,
    free_port,
    sdk_client,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Set Globex to won, 5000 EUR."}]
_users = itertools.count()


def canary_policy(
    candidate_model: str, *, steps: str = "[10, 50, 100]", min_requests: int = 20, on_fail: str = "kill"
) -> str:
    """The test route with `formatter` serving `candidate_model` as the canary's candidate (crm-base, the
    baseline, has 10 % invalid calls in tests/data/sim_engine.toml; crm-formatter none; always-invalid all)."""
    base = CRM_POLICY.replace('model = "crm-formatter"', f'model = "{candidate_model}"')
    return (
        base
        + f"""
[canary]
candidate = "formatter"
baseline = "baseline"
steps = {steps}
min_requests_per_step = {min_requests}
min_minutes_per_step = 0.005
unit = "user"
on_fail = "{on_fail}"

[canary.guardrails]
invalid_call_rate = {{ alpha = 0.05 }}
error_rate = {{ alpha = 0.05 }}
latency_per_output_token = {{ max_ratio = 3.0, min_samples = 5 }}
cost_per_request = {{ max_ratio = 1.10, min_samples = 5 }}
"""
    )


def ask(client: openai.OpenAI, user: str | None = None) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model="crm-assistant",
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=[UPDATE_CRM],  # type: ignore[list-item]
        extra_headers={"x-user-id": user or f"user-{next(_users) // 2}"},
    )
    return raw.headers["x-gateway-variant"]


def audit(http: httpx.Client, action: str | None = None) -> list[dict[str, Any]]:
    """The route's audit entries, oldest first, through `http` (a client whose base URL is a gateway)."""
    r = http.get(
        "/admin/audit",
        params={"route": "crm-assistant", "limit": 1000},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    entries = list(reversed(r.json()["entries"]))
    return [e for e in entries if action is None or e["action"] == action]


def drive_until(clients: Sequence[openai.OpenAI], done: Callable[[], bool], timeout: float = 60.0) -> int:
    """Send traffic (8 at a time, round-robin over `clients`) until `done()`; the number of requests sent.
    Requests through a test gateway take tens of milliseconds each, so one at a time would make these tests
    slow."""
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(8) as pool:
        for batch in itertools.count(1):
            list(pool.map(ask, [clients[i % len(clients)] for i in range(16)]))
            if done():
                return batch * 16
            assert time.monotonic() < deadline, "the canary did not decide in time"
    raise AssertionError("unreachable")


def canary_status(gw: Gateway) -> dict[str, Any]:
    r = gw.admin("GET", "/admin/routes/crm-assistant/canary")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def gateway_cmd(*args: str, gw: Gateway) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN,
        GATEWAY_DATA_DIR=str(gw.settings.data_dir),
        GATEWAY_POLICIES_DIR=str(gw.settings.policies_dir),
    )
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
    )


def test_a_bad_candidate_is_killed_by_the_gateway_itself(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": canary_policy("always-invalid")}, canary_interval_s=0.1)
    sdk = sdk_client(gw)
    sent = drive_until([sdk], lambda: bool(audit(gw.http, "canary_kill")))
    (kill,) = audit(gw.http, "canary_kill")
    assert (kill["actor"], kill["variant"]) == ("canary", "formatter")
    assert kill["reason"].startswith("invalid_call_rate: ") and "step 1/3 (10 %)" in kill["reason"]
    detail = kill["detail"]
    assert (detail["step"], detail["share"], detail["outcome"]) == (0, 0.1, "fail")
    check = next(c for c in detail["checks"] if c["guardrail"] == "invalid_call_rate")
    assert check["verdict"] == "fail" and check["bound"] == 20.0
    assert check["statistic"] == "inf" or check["statistic"] >= 20.0
    assert check["candidate_events"] > 0 and check["baseline_requests"] > check["candidate_requests"] > 0
    assert detail["candidate"]["invalid"] == detail["candidate"]["requests"] > 0  # always invalid
    assert detail["to"]["status"] == "killed"
    print(f"\nbad candidate killed after {sent} requests: M = {check['statistic']}")
    # Like a manual kill: the switch is on, and the very next requests all go to the baseline.
    assert gw.admin("GET", "/admin/status").json()["switches"]["variants"] == [
        {"route": "crm-assistant", "variant": "formatter"}
    ]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, [sdk] * 40)) == {"baseline"}
    assert canary_status(gw)["state"]["status"] == "killed"


def test_a_good_candidate_walks_up_the_steps_and_is_promoted(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(policies={"crm.toml": canary_policy("crm-formatter")}, canary_interval_s=0.1)
    sdk = sdk_client(gw)
    sent = drive_until([sdk], lambda: bool(audit(gw.http, "canary_promote")))
    print(f"\ngood candidate promoted after {sent} requests")
    actions = [e["action"] for e in audit(gw.http)]
    assert actions == ["canary_start", "canary_advance", "canary_promote"]
    advance, promote = audit(gw.http)[1:]
    for entry, step in ((advance, 0), (promote, 1)):
        d = entry["detail"]
        assert (d["step"], d["outcome"], entry["actor"]) == (step, "pass", "canary")
        assert d["candidate"]["requests"] >= 20 and d["baseline"]["requests"] > 0
        assert {c["guardrail"]: c["verdict"] for c in d["checks"]} == {
            "invalid_call_rate": "pass",
            "error_rate": "pass",
            "latency_per_output_token": "pass",
            "cost_per_request": "pass",
        }
    assert advance["detail"]["to"]["step"] == 1 and promote["detail"]["to"]["status"] == "promoted"
    route = gw.admin("GET", "/admin/status").json()["routes"]["crm-assistant"]
    assert route["variants"]["formatter"]["effective_share"] == 1.0 and route["fallback"] == ["baseline"]
    assert {ask(sdk) for _ in range(20)} == {"formatter"}
    report = gateway_cmd("report", gw=gw)
    assert report.returncode == 0, report.stderr
    lines = [line for line in report.stdout.splitlines() if line.startswith("crm-assistant ")]
    advance_line = next(line for line in lines if " advance " in line)
    assert "1 (10%)" in advance_line and re.search(r"\d+/\d+ \d+\.\d% \[\d+\.\d%, \d+\.\d%\]", advance_line)
    assert re.search(r"\d\S*/20 pass", advance_line) and any(" promote " in line for line in lines)


def test_the_report_shows_the_step_in_progress_as_the_gateway_sees_it(
    make_app_gateway: AppGatewayFactory,
) -> None:
    """A step in progress has no audit entry yet: `gateway report` looks at it from the request log (no gateway
    needed), with the numbers the gateway would decide on."""
    gw = make_app_gateway(
        policies={"crm.toml": canary_policy("crm-formatter", min_requests=10**6)}, canary_interval_s=0.1
    )
    wait_for(lambda: canary_status(gw)["state"] is not None)  # started at its first tick: it has a look
    sent = drive_until([sdk_client(gw)], lambda: canary_status(gw)["look"]["candidate"]["requests"] > 0)
    # Every record written, so that the gateway's look and the report's see the same requests.
    wait_for(lambda: len(gw.records()) == sent)
    seen = canary_status(gw)["look"]
    report = gateway_cmd("report", gw=gw)
    assert report.returncode == 0, report.stderr
    (line,) = [
        line
        for line in report.stdout.splitlines()
        if line.startswith("crm-assistant ") and " running " in line
    ]
    cand, base = seen["candidate"], seen["baseline"]
    assert " 1 (10%) " in line and "step in progress" in line
    assert (
        f"{cand['invalid']}/{cand['requests']} " in line and f"{base['invalid']}/{base['requests']} " in line
    )
    assert re.search(r"\S+/20 pass", line)  # the invalid-call count test: statistic / bound, verdict


def test_operators_pause_resume_promote_and_abort(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(policies={"crm.toml": canary_policy("crm-formatter", min_requests=10**6)})
    sdk = sdk_client(gw)
    paused = gateway_cmd("canary", "pause", "crm-assistant", "--reason", "looking", "--url", gw.url, gw=gw)
    assert paused.returncode == 0, paused.stderr
    assert "[paused]" in paused.stdout and canary_status(gw)["state"]["status"] == "paused"
    again = gw.admin("POST", "/admin/routes/crm-assistant/canary/pause", json={"reason": "twice"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "canary_state"
    assert gw.admin("POST", "/admin/routes/crm-assistant/canary/resume", json={}).status_code == 400
    resumed = gw.admin("POST", "/admin/routes/crm-assistant/canary/resume", json={"reason": "fine"})
    assert resumed.status_code == 200 and resumed.json()["state"]["status"] == "running"
    promoted = gw.admin("POST", "/admin/routes/crm-assistant/canary/promote", json={"reason": "ship it"})
    assert promoted.json()["state"]["status"] == "promoted" and promoted.json()["weights"]["formatter"] == 100
    assert {ask(sdk) for _ in range(20)} == {"formatter"}
    aborted = gateway_cmd("canary", "abort", "crm-assistant", "--reason", "roll back", "--url", gw.url, gw=gw)
    assert aborted.returncode == 0, aborted.stderr
    assert {ask(sdk) for _ in range(20)} == {"baseline"}
    late = gateway_cmd("canary", "resume", "crm-assistant", "--reason", "oops", "--url", gw.url, gw=gw)
    assert late.returncode == 1 and "409" in late.stderr and "aborted" in late.stderr
    entries = audit(gw.http)
    assert [e["action"] for e in entries] == [
        "canary_start",
        "canary_pause",
        "canary_resume",
        "canary_promote",
        "canary_abort",
    ]
    assert entries[1]["reason"] == "looking" and entries[3]["actor"] == "admin"
    missing = gw.admin("GET", "/admin/routes/nope/canary")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


def test_a_route_without_a_canary_answers_404(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    r = gw.admin("POST", "/admin/routes/crm-assistant/canary/pause", json={"reason": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_canary"
    assert gw.admin("GET", "/admin/canaries").json() == {"canaries": {}}


def test_the_canary_state_survives_a_restart(make_app_gateway: AppGatewayFactory) -> None:
    policies = {"crm.toml": canary_policy("crm-formatter", steps="[10, 50, 75, 100]", min_requests=20)}
    gw = make_app_gateway(policies=policies, canary_interval_s=0.1)
    drive_until([sdk_client(gw)], lambda: bool(audit(gw.http, "canary_advance")))
    gw.admin("POST", "/admin/routes/crm-assistant/canary/pause", json={"reason": "restart"})
    before = canary_status(gw)["state"]
    gw.stop()
    again = make_app_gateway(policies=policies, canary_interval_s=0.1)
    after = canary_status(again)
    assert after["state"] == before and after["state"]["status"] == "paused"
    assert before["step"] == 1 and after["weights"] == {"baseline": 50, "formatter": 50}
    time.sleep(0.5)  # a few ticks: nothing restarts the canary
    assert len(audit(again.http, "canary_start")) == 1


def _serve_subprocess(gw: RunningGateway, port: int) -> subprocess.Popen[bytes]:
    s = gw.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_POLICIES_DIR=str(s.policies_dir),
        GATEWAY_ENGINES=orjson.dumps(s.engines).decode(),
        GATEWAY_DATA_DIR=str(s.data_dir),
        GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN,
        GATEWAY_KEYS_FILE=str(s.keys_file),
        GATEWAY_PORT=str(port),
        GATEWAY_CANARY_INTERVAL_S="0.1",
    )
    return subprocess.Popen([sys.executable, "-m", "gateway.cli.main", "serve"], env=env, cwd=ROOT)


@pytest.mark.parametrize(
    ("model", "decisions"),
    [("crm-formatter", ("canary_advance", "canary_promote")), ("always-invalid", ("canary_kill",))],
)
def test_two_gateway_processes_decide_once(
    make_gateway: GatewayFactory, model: str, decisions: tuple[str, ...]
) -> None:
    gw = make_gateway(policies={"crm.toml": canary_policy(model)}, canary_interval_s=0.1)
    port = free_port()
    other = _serve_subprocess(gw, port)
    url = f"http://127.0.0.1:{port}"
    sdk, other_sdk = sdk_client(gw), openai.OpenAI(base_url=url + "/v1", api_key=CLIENT_TOKEN, max_retries=0)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        drive_until([sdk, other_sdk], lambda: bool(audit(gw.http, decisions[-1])))
        time.sleep(0.5)  # both processes look several more times
        with httpx.Client(base_url=url) as other_http:
            actions = [e["action"] for e in audit(other_http)]
        assert actions == ["canary_start", *decisions]
        records = gw.records()
        assert {r.policy_version for r in records} == {records[0].policy_version}
        # Both processes served traffic, and the decision reached both.
        served = {ask(other_sdk) for _ in range(20)} | {ask(sdk) for _ in range(20)}
        assert served == ({"formatter"} if model == "crm-formatter" else {"baseline"})
    finally:
        other.terminate()
        other.wait(timeout=15)


def test_a_drill_kills_measures_milliseconds_and_revives(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(policies={"crm.toml": canary_policy("crm-formatter", min_requests=10**6)})
    env_args = ("--url", gw.url, "--api-key", FORCER_TOKEN)
    result = gateway_cmd("drill", "crm-assistant", *env_args, gw=gw)
    assert result.returncode == 0, result.stderr
    match = re.search(r"all traffic on baseline (\d+\.\d) ms after the kill \((\d+) probes\)", result.stdout)
    assert match, result.stdout
    (drill,) = audit(gw.http, "drill")
    assert drill["variant"] == "formatter" and drill["detail"]["fallback"] == "baseline"
    assert drill["detail"]["time_to_baseline_ms"] == pytest.approx(float(match.group(1)), abs=0.06)
    assert [e["action"] for e in audit(gw.http) if e["action"] != "canary_start"] == [
        "kill_variant",
        "revive_variant",
        "drill",
    ]
    assert gw.admin("GET", "/admin/status").json()["switches"]["variants"] == []  # revived
    report = gateway_cmd("report", gw=gw)
    assert re.search(r"drill\s+-\s+formatter killed: back on baseline in \d+ ms", report.stdout), (
        report.stdout
    )
    refused = gateway_cmd("drill", "crm-assistant", "--url", gw.url, "--api-key", CLIENT_TOKEN, gw=gw)
    assert refused.returncode == 1 and "403" in refused.stderr  # a key that may not name a variant


# -- the shadow phase ([canary] shadow_requests) ----------------------------------------------------------------


def shadow_gated_policy(candidate_model: str, *, shadow_requests: int = 30) -> str:
    """The test route with a shadow phase of `shadow_requests` pairs before its first step (10 %, which never ends
    here): every request the baseline serves is copied to the candidate. The latency tolerance is wide: a copy waits
    its turn behind the test's requests, so its latency says little here."""
    base = CRM_POLICY.replace('model = "crm-formatter"', f'model = "{candidate_model}"')
    return (
        base
        + f"""
[shadow]
variant = "formatter"
share = 100
max_in_flight = 64

[canary]
candidate = "formatter"
baseline = "baseline"
steps = [10, 50, 100]
min_requests_per_step = 1000000
unit = "user"
shadow_requests = {shadow_requests}

[canary.guardrails]
invalid_call_rate = {{ alpha = 0.05 }}
error_rate = {{ alpha = 0.05 }}
latency_per_output_token = {{ max_ratio = 10.0, min_samples = 5 }}
cost_per_request = {{ max_ratio = 1.10, min_samples = 5 }}
"""
    )


def shadow_config(gw: Gateway) -> Any:
    """The route's [shadow] as the live policy has it (None: no copies)."""
    return gw.admin("GET", "/admin/shadow/crm-assistant").json()["shadow"]


def test_a_bad_candidate_is_killed_in_the_shadow_phase_before_any_user_sees_it(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(policies={"crm.toml": shadow_gated_policy("always-invalid")}, canary_interval_s=0.1)
    sdk = sdk_client(gw)
    wait_for(lambda: canary_status(gw)["state"] is not None)
    assert canary_status(gw)["state"]["status"] == "shadow" and canary_status(gw)["weights"]["formatter"] == 0
    drive_until([sdk], lambda: bool(audit(gw.http, "canary_kill")))
    (kill,) = audit(gw.http, "canary_kill")
    assert (kill["actor"], kill["variant"]) == ("canary", "formatter")
    assert kill["reason"].startswith("invalid_call_rate: ")
    assert "in the shadow phase" in kill["reason"] and "no user was served by the candidate" in kill["reason"]
    detail = kill["detail"]
    assert (detail["phase"], detail["users_served"], detail["outcome"]) == ("shadow", 0, "fail")
    assert (detail["from"]["status"], detail["to"]["status"]) == ("shadow", "killed")
    check = next(c for c in detail["checks"] if c["guardrail"] == "invalid_call_rate")
    assert check["verdict"] == "fail" and check["candidate_only"] > check["baseline_only"]
    assert detail["candidate"]["invalid"] == detail["candidate"]["checked"] > 0  # always invalid
    assert [e["action"] for e in audit(gw.http)] == ["canary_start", "canary_kill"]
    # Nobody was ever served by the candidate; every one of its answers was a copy.
    records = gw.records()
    assert not [r for r in records if r.variant == "formatter" and not r.shadow]
    assert any(r.variant == "formatter" and r.shadow for r in records)
    # Killed: the switch is on, the route is the baseline's, and the copies stopped with the phase.
    assert gw.admin("GET", "/admin/status").json()["switches"]["variants"] == [
        {"route": "crm-assistant", "variant": "formatter"}
    ]
    assert shadow_config(gw) is None
    before = len(gw.records())
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, [sdk] * 16)) == {"baseline"}
    assert len(gw.records()) == before + 16  # no copy, not even a dropped one


def test_a_good_candidate_passes_the_shadow_phase_and_starts_its_first_step(
    make_app_gateway: AppGatewayFactory,
) -> None:
    gw = make_app_gateway(policies={"crm.toml": shadow_gated_policy("crm-formatter")}, canary_interval_s=0.1)
    sdk = sdk_client(gw)
    drive_until([sdk], lambda: bool(audit(gw.http, "canary_advance")))
    start, advance = audit(gw.http)
    assert start["detail"]["shadow_requests"] == 30
    detail = advance["detail"]
    assert advance["reason"].startswith("shadow phase passed (") and advance["reason"].endswith("now 10 %")
    assert (detail["phase"], detail["outcome"], detail["users_served"]) == ("shadow", "pass", 0)
    assert detail["minimums"]["pairs"][0] >= 30 and detail["to"]["status"] == "running"
    assert {c["guardrail"]: c["verdict"] for c in detail["checks"]} == {
        "invalid_call_rate": "pass",
        "error_rate": "pass",
        "latency_per_output_token": "pass",
        "cost_per_request": "pass",
    }
    status = canary_status(gw)
    assert (status["state"]["status"], status["state"]["step"]) == ("running", 0)
    assert status["weights"] == {"baseline": 90, "formatter": 10}
    assert status["look"].get("phase") is None and status["look"]["share"] == 0.1  # a served step's look
    assert shadow_config(gw) is None  # the candidate serves its share: no more copies
    served = {ask(sdk, f"after-{i}") for i in range(60)}
    assert served == {"baseline", "formatter"}


def test_the_shadow_phase_in_progress_in_the_status_the_cli_and_the_report(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(
        policies={"crm.toml": shadow_gated_policy("crm-formatter", shadow_requests=10**6)},
        canary_interval_s=0.1,
    )
    wait_for(lambda: canary_status(gw)["state"] is not None)
    drive_until([sdk_client(gw)], lambda: canary_status(gw)["look"]["minimums"]["pairs"][0] >= 10)
    seen = canary_status(gw)["look"]
    assert (seen["phase"], seen["outcome"], seen["users_served"]) == ("shadow", "hold", 0)
    assert seen["minimums"]["pairs"][1] == 10**6
    status = gateway_cmd("canary", "status", "crm-assistant", "--url", gw.url, gw=gw)
    assert status.returncode == 0, status.stderr
    assert "[shadow]  before step 1" in status.stdout
    assert re.search(
        r"look \(shadow phase\): hold; pairs \d+/1000000; requests routed to the candidate 0", status.stdout
    )
    assert re.search(r"invalid_call_rate\s+pass", status.stdout)
    report = gateway_cmd("report", gw=gw)
    assert report.returncode == 0, report.stderr
    (line,) = [
        ln for ln in report.stdout.splitlines() if ln.startswith("crm-assistant ") and " running " in ln
    ]
    assert " shadow " in line and "shadow phase in progress" in line and re.search(r"\S+/20 pass", line)
    paused = gw.admin("POST", "/admin/routes/crm-assistant/canary/pause", json={"reason": "x"})
    assert paused.status_code == 409 and paused.json()["error"]["code"] == "canary_state"
    promoted = gw.admin("POST", "/admin/routes/crm-assistant/canary/promote", json={"reason": "seen enough"})
    assert promoted.status_code == 200 and promoted.json()["weights"]["formatter"] == 100
