"""End to end on the real engine: vLLM (the CPU build here) serving the demo model and adapters the recipe builds,
the gateway in front, the `openai` SDK as the client. Marked `engine`: `make test-engine` (and CI) installs the
engine's virtualenv, builds the demo model when the recipe changed, and runs them.

What they prove is what the demo claims: the invalid-call rates the gateway records on the golden set land in their
bands (base model with the RAG prompt 5-25 %, crm-formatter@1 and @2 under 3 %, @3 over 25 %), with four adapter
versions batched alongside the base model; a canary promotes @2 and kills @4, which passes the golden set but
regresses at the temperature live traffic uses; a hot swap under load loses no request; an engine restart is
reconciled while requests fall back; each adapter check stops a broken version before the engine sees it; the
release gate refuses @3; @3 in shadow behind the baseline is shown worse on the pairs (McNemar p < 0.01), and a
shadow-gated canary of it is killed before its first step. The measured rates are written to var/engine-results.json (CI prints them).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.devtools.engine_runner import (
    EngineProcess,
    demo_spec,
    ensure_demo_model,
    install_cpu_extras,
    serve,
    site_packages,
    venv_python,
)
from gateway.digests import sha256_file
from gateway.records import Record
from gateway.settings import Settings
from tests.conftest import (
    ADMIN_TOKEN,
    FORCER_TOKEN,
    ROOT,
    RunningGateway,
    engine_models,
    free_port,
    start_gateway,
    wait_for,
    write_keys,
)

pytestmark = pytest.mark.engine

ENGINE_VENV = ROOT / ".venv-engine"
GOLDEN = ROOT / "loadtests" / "golden" / "crm.jsonl"
RESULTS = ROOT / "var" / "engine-results.json"
SHIPPED = (ROOT / "policies" / "crm-assistant.toml").read_text()
# variant -> (adapter or None for the RAG baseline, lowest and highest invalid-call rate the demo promises)
BANDS: dict[str, tuple[str | None, float, float]] = {
    # 11.3-18.3 % over seven runs on an AVX-512 machine, vLLM pinned to AVX2 or not (README): at 18.3 % a run of
    # 300 exceeds 25 % once in about 650 runs (at the mean, 13.5 %, far less than once in a million); 8-20 % was too close.
    "baseline": (None, 0.05, 0.25),
    "v1": ("crm-formatter@1", 0.0, 0.03),
    "formatter": ("crm-formatter@2", 0.0, 0.03),
    "v3": ("crm-formatter@3", 0.25, 1.0),
    # @4 passes the release gate offline (2.0 % on the recipe's evaluator); its regression shows at temperature
    # 1.0 (the canary test below). Here it also fills the engine's fourth and last adapter slot: without the
    # engine venv's CPU LoRA fix (gateway/vllm_cpu_lora.py) the baseline, batched with the adapters, was answered
    # with the last slot's adapter and recorded 1.7 % instead of 11-16 %.
    "v4": ("crm-formatter@4", 0.0, 0.06),
}
CONCURRENCY = 32
# The real engine on two shared cores: an adapter load or a restart can take many seconds.
ENGINE_WAIT_S = 60.0


def without_release_gate(policy: str) -> str:
    return re.sub(r"\n\[release\]\n(?:[^\[\n][^\n]*\n|\n)*", "\n", policy)


def with_variants(policy: str, **variants: str) -> str:
    extra = "".join(f'\n[variants.{name}]\nadapter = "{ref}"\nweight = 0\n' for name, ref in variants.items())
    return policy + extra


def engine_python() -> Path:
    """The engine venv's python, with the current CPU LoRA fix installed (`make test-engine` builds the venv)."""
    python = venv_python(ENGINE_VENV)
    if not python.exists():
        pytest.fail(f"no engine venv at {ENGINE_VENV}: `make test-engine` builds it")
    install_cpu_extras(site_packages(python))
    return python


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProcess]:
    python = engine_python()
    ensure_demo_model(python)  # seconds when the recipe has not changed
    process = serve(demo_spec(port=free_port()), python, ROOT / "var" / "test-engine.log")
    yield process
    process.stop()


GatewayMaker = Callable[..., RunningGateway]


@pytest.fixture
def make_gateway(tmp_path: Path, engine: EngineProcess) -> Iterator[GatewayMaker]:
    started: list[RunningGateway] = []

    def make(policy: str, **overrides: Any) -> RunningGateway:
        (tmp_path / "policies").mkdir(exist_ok=True)
        (tmp_path / "policies" / "crm-assistant.toml").write_text(policy)
        values: dict[str, Any] = {
            "policies_dir": tmp_path / "policies",
            "engines": {"default": engine.spec.base_url},
            "data_dir": tmp_path / "var",
            "admin_token": ADMIN_TOKEN,
            "keys_file": write_keys(tmp_path / "keys.toml"),
            "adapters_dir": ROOT / "adapters",
            "max_lora_rank": engine.spec.max_lora_rank,
            "reconcile_s": 0.5,
            **overrides,
        }
        gateway = start_gateway(Settings(**values))
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


def golden() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines()]


async def replay(url: str, jobs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    """Send each (variant, golden row) through the gateway, forced to that variant, CONCURRENCY at a time, at the
    engine's default sampling (the model's generation_config.json). No per-request `seed`: vllm-cpu 0.32.0's worker
    dies on one ("CPU Generator does not use offset"), taking the engine down. Returns the (x-gateway-variant,
    x-gateway-tool-calls) headers of each answer."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=FORCER_TOKEN, max_retries=0, timeout=300)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(variant: str, row: dict[str, Any]) -> tuple[str, str]:
        async with gate:
            raw = await client.chat.completions.with_raw_response.create(
                model="crm-assistant",
                messages=row["messages"],
                tools=row["tools"],
                extra_headers={"x-gateway-variant": variant},
            )
            return raw.headers["x-gateway-variant"], raw.headers["x-gateway-tool-calls"]

    try:
        return await asyncio.gather(*(one(variant, row) for variant, row in jobs))
    finally:
        await client.close()


def rates(records: list[Record]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for variant in sorted({r.variant for r in records if r.variant}):
        mine = [r for r in records if r.variant == variant]
        invalid = sum(r.tool_verdict == "invalid" for r in mine)
        reasons: dict[str, int] = {}
        for r in mine:
            if r.tool_verdict == "invalid":
                reasons[r.tool_reason or "?"] = reasons.get(r.tool_reason or "?", 0) + 1
        out[variant] = {
            "adapter": mine[0].adapter,
            "n": len(mine),
            "invalid": invalid,
            "invalid_call_rate": round(invalid / len(mine), 4),
            "truncated": sum(r.tool_verdict == "truncated" for r in mine),
            "no_call": sum(r.tool_verdict == "none" for r in mine),
            "reasons": reasons,
            "e2e_p50_s": round(sorted(r.e2e_s or 0 for r in mine)[len(mine) // 2], 3),
        }
    return out


def test_every_variant_answers_and_the_recorded_rates_land_in_their_bands(
    make_gateway: GatewayMaker, engine: EngineProcess
) -> None:
    policy = with_variants(
        without_release_gate(SHIPPED), v1="crm-formatter@1", v3="crm-formatter@3", v4="crm-formatter@4"
    )
    gw = make_gateway(policy)
    # The gateway loads the adapters in the background once it serves; until a load is done, that variant's
    # requests fall back to the baseline (on a busy machine the fourth load took seconds), which this replay
    # must not mistake for a failure.
    adapters = {adapter for adapter, _, _ in BANDS.values() if adapter}
    wait_for(lambda: adapters <= engine_models(engine.spec.base_url), timeout=ENGINE_WAIT_S)
    rows = golden()
    jobs = [(variant, row) for row in rows for variant in BANDS]
    started = time.monotonic()
    answers = asyncio.run(replay(gw.url, jobs))
    seconds = time.monotonic() - started
    assert [served for served, _ in answers] == [variant for variant, _ in jobs]  # no fallback, no error
    records = gw.records()
    assert len(records) == len(jobs) and all(r.status == 200 for r in records)
    measured = rates(records)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    summary = {"golden_rows": len(rows), "seconds": round(seconds, 1), "variants": measured}
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nrecorded on the golden set ({len(jobs)} requests in {seconds:.0f} s):")
    for variant, figures in measured.items():
        print(f"  {variant:10} {figures['adapter'] or 'crm-base + RAG':16} {figures}")
    for variant, (adapter, low, high) in BANDS.items():
        assert measured[variant]["adapter"] == adapter
        assert measured[variant]["n"] == len(rows)
        assert low <= measured[variant]["invalid_call_rate"] <= high, (variant, measured[variant])
    baseline = [r for r in records if r.variant == "baseline"]
    assert all(r.retrieval_s is not None for r in baseline)  # the RAG prompt was filled per request


LORA_ROWS = """
import json, torch
from vllm.lora.punica_wrapper import punica_cpu
slots = torch.stack([torch.full((1, 4, 8), float(k + 1)) for k in range(3)])  # slot k's LoRA A weights are k + 1

def shrink():
    out = torch.full((3, 4), 7.0)
    punica_cpu.bgmv_shrink(torch.ones(3, 8), slots, out, torch.tensor([-1, 0, 2]), 1.0)  # -1: no adapter
    return out[:, 0].tolist()

before = shrink()
from gateway_vllm_cpu_lora import register
register()
print(json.dumps([before, shrink()]))
"""


def test_tokens_without_an_adapter_get_none_on_the_cpu_build() -> None:
    """vllm-cpu's LoRA ops read the "no adapter" index -1 as the last slot; the plugin the engine venv carries
    (gateway/vllm_cpu_lora.py) zeroes those rows. The band test below shows what it means for the baseline."""
    run = subprocess.run(
        [str(engine_python()), "-c", LORA_ROWS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    before, after = json.loads(run.stdout.strip().splitlines()[-1])
    assert before == [24.0, 8.0, 24.0]  # the row without an adapter got the last slot's (3 x 8 inputs of 1)
    assert after == [0.0, 8.0, 24.0]


def test_a_streamed_answer_carries_its_verdict(make_gateway: GatewayMaker) -> None:
    gw = make_gateway(SHIPPED)
    row = golden()[0]
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=FORCER_TOKEN, max_retries=0, timeout=120)
    for variant in ("baseline", "formatter"):
        stream = client.chat.completions.create(
            model="crm-assistant",
            messages=row["messages"],
            tools=row["tools"],
            stream=True,
            extra_headers={"x-gateway-variant": variant},
        )
        chunks = list(stream)
        assert chunks, variant
    records = gw.records()
    assert [(r.variant, r.stream) for r in records] == [("baseline", True), ("formatter", True)]
    assert all(r.ttft_s is not None and r.tool_verdict in ("valid", "invalid", "truncated") for r in records)


def test_a_hot_swap_under_load_loses_no_request(make_gateway: GatewayMaker, engine: EngineProcess) -> None:
    # No release gate: @1's recorded golden-set rate is not under the shipped gate's 3 % in every build.
    gw = make_gateway(
        without_release_gate(SHIPPED).replace('adapter = "crm-formatter@2"', 'adapter = "crm-formatter@1"')
    )
    wait_for(lambda: "crm-formatter@1" in engine_models(engine.spec.base_url), timeout=ENGINE_WAIT_S)
    # An earlier test's @2 is unloaded once no gateway has referenced it for three reconcile rounds: the swap
    # must then load it again, under load.
    wait_for(lambda: "crm-formatter@2" not in engine_models(engine.spec.base_url), timeout=ENGINE_WAIT_S)
    rows = golden()
    failures: list[str] = []
    served: list[str] = []
    stop = threading.Event()

    def load(offset: int) -> None:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=FORCER_TOKEN, max_retries=0, timeout=120)
        i = offset
        while not stop.is_set():
            row = rows[i % len(rows)]
            i += 4
            try:
                answer = client.chat.completions.create(
                    model="crm-assistant",
                    messages=row["messages"],
                    tools=row["tools"],
                    extra_headers={"x-gateway-variant": "formatter"},
                )
                served.append(answer.model)
            except openai.APIError as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(served) >= 8, timeout=ENGINE_WAIT_S)
        swap = gw.admin(
            "POST",
            "/admin/routes/crm-assistant/variants/formatter/adapter",
            json={"adapter": "crm-formatter@2", "reason": "ship the fixes", "actor": "maria.keller"},
        )
        assert swap.status_code == 200, swap.text
        count = len(served)
        wait_for(lambda: len(served) >= count + 8, timeout=ENGINE_WAIT_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert {"crm-formatter@1", "crm-formatter@2"} <= set(served) and served[-1] == "crm-formatter@2"
    assert len(gw.records()) == len(served)
    unloaded = lambda: "crm-formatter@1" not in engine_models(engine.spec.base_url)  # noqa: E731
    wait_for(unloaded, timeout=ENGINE_WAIT_S)  # unloaded once unused
    actions = [e["action"] for e in gw.admin("GET", "/admin/audit?limit=1000").json()["entries"]]
    assert {"adapter_load", "adapter_swap", "adapter_unload"} <= set(actions)


def test_the_release_gate_refuses_the_regressed_version(make_gateway: GatewayMaker, tmp_path: Path) -> None:
    gw = make_gateway(SHIPPED)
    version = gw.app.components.live.view.policy.version
    (tmp_path / "policies" / "crm-assistant.toml").write_text(
        SHIPPED.replace('adapter = "crm-formatter@2"', 'adapter = "crm-formatter@3"')
    )
    reload = gw.admin("POST", "/admin/reload", json={"reason": "try @3"})
    assert reload.status_code == 500 and "max_invalid_call_rate" in reload.json()["error"]["message"]
    swap = gw.admin(
        "POST",
        "/admin/routes/crm-assistant/variants/formatter/adapter",
        json={"adapter": "crm-formatter@3", "reason": "try @3"},
    )
    assert swap.status_code == 409 and "max_invalid_call_rate" in swap.json()["error"]["message"]
    assert gw.app.components.live.view.policy.version == version


def broken_copies(root: Path) -> dict[str, str]:
    """Copies of crm-formatter@2, each broken in one way; returns version -> the check that must stop it."""
    source = ROOT / "adapters" / "crm-formatter" / "2"
    for version in ("2", "11", "12", "13", "14", "15"):
        shutil.copytree(source, root / "crm-formatter" / version)
        lineage = root / "crm-formatter" / version / "lineage.toml"
        lineage.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', lineage.read_text()))

    def edit_json(version: str, **changes: Any) -> None:
        path = root / "crm-formatter" / version / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def relineage(version: str, **changes: str) -> None:
        path = root / "crm-formatter" / version / "lineage.toml"
        text = path.read_text()
        for key, value in changes.items():
            text = re.sub(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', text)
        path.write_text(text)

    edit_json("11", base_model_name_or_path="var/models/base/other-base")
    relineage("11", base_model="other-base")
    edit_json("12", r=64, lora_alpha=128)  # above the engine's --max-lora-rank 8
    weights = root / "crm-formatter" / "13" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # tampered after the lineage was written
    weights.write_bytes(bytes(data))
    weights = root / "crm-formatter" / "14" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # a NaN, read as float32 or as two bfloat16
    weights.write_bytes(bytes(data))
    relineage("14", adapter_sha256=sha256_file(weights))  # the lineage matches: only the NaN is wrong
    (root / "crm-formatter" / "15" / "lineage.toml").unlink()
    return {"11": "base_model", "12": "rank", "13": "weights_sha256", "14": "tensors_finite", "15": "lineage"}


def test_each_adapter_check_stops_a_broken_version_before_the_engine(
    make_gateway: GatewayMaker, tmp_path: Path, engine: EngineProcess
) -> None:
    adapters = tmp_path / "adapters"
    expected = broken_copies(adapters)
    gw = make_gateway(without_release_gate(SHIPPED), adapters_dir=adapters)
    for version, check in expected.items():
        swap = gw.admin(
            "POST",
            "/admin/routes/crm-assistant/variants/formatter/adapter",
            json={"adapter": f"crm-formatter@{version}", "reason": "try a broken copy"},
        )
        error = swap.json()["error"]
        if check == "lineage":  # without a lineage the catalog cannot vouch for the version at all
            assert swap.status_code == 404 and "lineage.toml is missing" in error["message"], swap.text
            continue
        assert swap.status_code == 400 and error["code"] == f"adapter_{check}", (version, swap.text)
        assert f"crm-formatter@{version}" in error["message"] and check in error["message"]
    assert not {f"crm-formatter@{v}" for v in expected} & engine_models(engine.spec.base_url)
    assert gw.app.components.live.view.policy.routes["crm-assistant"].variant("formatter").adapter == (  # type: ignore[union-attr]
        "crm-formatter@2"
    )


CANARY = """
[canary]
candidate = "{candidate}"
baseline = "{baseline}"
steps = {steps}
min_requests_per_step = {min_requests}
min_minutes_per_step = 0
unit = "request"
on_fail = "kill"

[canary.guardrails]
invalid_call_rate = {{ alpha = 0.05 }}
error_rate = {{ alpha = 0.05 }}
"""


# What the chat product sends; the golden set is sampled at the engine's default (0.65).
LIVE_TEMPERATURE = 1.0


Tally = dict[str, dict[str, list[int]]]  # variant -> "default" | "t=1.0" -> [requests, invalid calls]


def drive(url: str, done: Callable[[], bool], timeout: float = 300.0, tally: Tally | None = None) -> int:
    """Live traffic on the route until `done()`: golden messages, no forced variant, a user per request, and the
    live mix of sampling: every other request comes from a product that sends `temperature` 1.0, the rest use the
    engine's default. Returns the number of requests sent; `tally` gets the answers' verdicts by variant and
    sampling (from the gateway's headers)."""
    rows = golden()
    sent = 0
    tally = {} if tally is None else tally

    async def one(client: openai.AsyncOpenAI, n: int, row: dict[str, Any]) -> None:
        live = n % 2 == 1
        raw = await client.chat.completions.with_raw_response.create(
            model="crm-assistant",
            messages=row["messages"],
            tools=row["tools"],
            extra_headers={"x-user-id": f"user-{n}"},
            **({"temperature": LIVE_TEMPERATURE} if live else {}),
        )
        counts = tally.setdefault(raw.headers["x-gateway-variant"], {}).setdefault(
            f"t={LIVE_TEMPERATURE}" if live else "default", [0, 0]
        )
        counts[0] += 1
        counts[1] += raw.headers["x-gateway-tool-calls"] == "invalid"

    async def run() -> None:
        nonlocal sent
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=FORCER_TOKEN, max_retries=0, timeout=120)
        deadline = time.monotonic() + timeout
        try:
            while not done():
                assert time.monotonic() < deadline, (
                    f"no decision after {sent} requests; [requests, invalid]: {tally}"
                )
                await asyncio.gather(
                    *(one(client, sent + i, rows[(sent + i) % len(rows)]) for i in range(CONCURRENCY))
                )
                sent += CONCURRENCY
        finally:
            await client.close()

    asyncio.run(run())
    return sent


def audit_actions(gw: RunningGateway) -> list[dict[str, Any]]:
    return list(reversed(gw.admin("GET", "/admin/audit?limit=1000").json()["entries"]))


def decided(gw: RunningGateway) -> bool:
    """The canary was killed or promoted (the tests wait for either, so a wrong decision fails at once)."""
    return any(e["action"] in ("canary_kill", "canary_promote") for e in audit_actions(gw))


def test_a_canary_of_the_good_version_walks_up_the_steps_on_real_output(make_gateway: GatewayMaker) -> None:
    canary = CANARY.format(candidate="formatter", baseline="baseline", steps="[20, 50, 100]", min_requests=25)
    gw = make_gateway(SHIPPED + canary)
    tally: Tally = {}
    sent = drive(gw.url, lambda: decided(gw), tally=tally)
    print(
        f"\ncrm-formatter@2 promoted after {sent} requests; [requests, invalid] by variant and sampling: {tally}"
    )
    decisions = [e for e in audit_actions(gw) if e["action"].startswith("canary_")]
    assert [e["action"] for e in decisions] == ["canary_start", "canary_advance", "canary_promote"]
    assert all(e["detail"]["outcome"] == "pass" for e in decisions[1:])


def test_a_version_that_passes_the_golden_set_but_regresses_live_is_killed_by_its_canary(
    make_gateway: GatewayMaker,
) -> None:
    """@4 passes the shipped release gate (its golden-set rate, sampled at the engine's default, is under 3 %) but
    its vendor-labelled mistakes show at temperature 1.0, which half the live traffic uses. A canary of it against
    @2, the route's current fine-tune, is killed by the gateway, and the next requests go to @2."""
    policy = (
        SHIPPED.replace("weight = 90", "weight = 0").replace("weight = 10", "weight = 100")
        + '\n[variants.v4]\nadapter = "crm-formatter@4"\nweight = 0\n'
        # A step passes once it has its minimum of candidate requests without a failed guardrail, so the minimum
        # is what gives the count test its evidence: @4 was killed after 160-320 of its requests in local runs,
        # and at a minimum of 300 it was promoted in one CI run before the evidence was in.
        + CANARY.format(candidate="v4", baseline="formatter", steps="[50, 100]", min_requests=1200)
    )
    gw = make_gateway(policy)  # the release gate is on: @4 passes it
    tally: Tally = {}
    sent = drive(gw.url, lambda: decided(gw), timeout=900, tally=tally)
    decisions = [e["action"] for e in audit_actions(gw) if e["action"].startswith("canary_")]
    assert "canary_kill" in decisions, (decisions, tally)
    kill = next(e for e in audit_actions(gw) if e["action"] == "canary_kill")
    print(f"\ncrm-formatter@4 killed after {sent} requests: {kill['reason']}")
    print(f"[requests, invalid] by variant and sampling: {tally}")
    assert kill["actor"] == "canary" and "invalid_call_rate" in kill["reason"]
    check = next(c for c in kill["detail"]["checks"] if c["guardrail"] == "invalid_call_rate")
    assert check["verdict"] == "fail", kill["detail"]
    assert gw.app.components.live.view.switches.variant_killed("crm-assistant", "v4")
    default, live = tally["v4"]["default"], tally["v4"][f"t={LIVE_TEMPERATURE}"]
    assert live[1] / live[0] > 2 * max(default[1], 1) / default[0]  # the regression is in the live sampling
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=FORCER_TOKEN, max_retries=0, timeout=120)
    for n, row in enumerate(golden()[:8]):  # the next requests all go to the canary's baseline
        raw = client.chat.completions.with_raw_response.create(
            model="crm-assistant",
            messages=row["messages"],
            tools=row["tools"],
            extra_headers={"x-user-id": f"after-the-kill-{n}"},
        )
        assert raw.headers["x-gateway-variant"] == "formatter"


def test_an_engine_restart_is_reconciled_and_requests_fall_back_meanwhile(
    make_gateway: GatewayMaker, engine: EngineProcess
) -> None:
    """Last in the module: it restarts the shared engine (about a minute)."""
    gw = make_gateway(SHIPPED)
    url = engine.spec.base_url
    wait_for(lambda: "crm-formatter@2" in engine_models(url), timeout=ENGINE_WAIT_S)
    # The engine may already have held @2 (earlier tests): no load needed then.
    before = len(audit_actions(gw))
    engine.restart()
    # A restarted vLLM has forgotten its adapters: until the reconciler reloads, requests for the formatter get
    # the engine's 404 and fall back to the baseline instead of failing.
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=FORCER_TOKEN, max_retries=0, timeout=120)
    row = golden()[0]
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="crm-assistant",
            messages=row["messages"],
            tools=row["tools"],
            extra_headers={"x-gateway-variant": "formatter"},
        )
        assert raw.http_response.status_code == 200
    wait_for(lambda: "crm-formatter@2" in engine_models(url), timeout=ENGINE_WAIT_S)
    raw = client.chat.completions.with_raw_response.create(
        model="crm-assistant",
        messages=row["messages"],
        tools=row["tools"],
        extra_headers={"x-gateway-variant": "formatter"},
    )
    assert raw.headers["x-gateway-variant"] == "formatter"
    assert all(r.outcome == "ok" for r in gw.records())
    reloads = [e for e in audit_actions(gw)[before:] if e["action"] == "adapter_load"]
    assert reloads and "crm-formatter@2" in json.dumps(reloads)  # loaded again after the restart


SHADOW = """
[shadow]
variant = "v3"
share = 100
max_in_flight = 64
"""
SHADOW_PAIRS = 120
SHADOW_PHASE = "shadow_requests = 200\n"  # at most: @3 fails its paired tests long before


def behind_the_baseline(policy: str) -> str:
    """The shipped route with the whole traffic on its RAG baseline and @3 as a zero-weight variant. The release
    gate stays on: @3 fails it, and a zero-weight shadow variant is not gated (it serves nobody)."""
    return (
        policy.replace("weight = 10\n", "weight = 0\n").replace("weight = 90\n", "weight = 100\n")
        + '\n[variants.v3]\nadapter = "crm-formatter@3"\nweight = 0\n'
    )


def shadow_summary(gw: RunningGateway) -> dict[str, Any] | None:
    found = gw.admin("GET", "/admin/shadow/crm-assistant").json()["summaries"]
    return found[0] if found else None


def test_a_shadow_of_the_regressed_version_shows_it_worse_without_serving_anyone(
    make_gateway: GatewayMaker, engine: EngineProcess
) -> None:
    """@3 answers a copy of every live request while the baseline serves them: its answers are checked and
    recorded, never returned, and the paired comparison shows it worse than what users got (McNemar p < 0.01)."""
    gw = make_gateway(behind_the_baseline(SHIPPED) + SHADOW)
    wait_for(lambda: "crm-formatter@3" in engine_models(engine.spec.base_url), timeout=ENGINE_WAIT_S)
    tally: Tally = {}
    sent = drive(
        gw.url, lambda: sum(v[0] for t in tally.values() for v in t.values()) >= SHADOW_PAIRS, tally=tally
    )
    assert set(tally) == {"baseline"}, tally  # every user was served by the baseline
    wait_for(lambda: (shadow_summary(gw) or {}).get("pairs", 0) >= sent, timeout=ENGINE_WAIT_S)
    summary = shadow_summary(gw)
    assert summary is not None
    print(
        f"\nshadow crm-formatter@3 behind the baseline, {summary['pairs']} pairs: invalid served"
        f" {summary['served']['invalid_rate']:.3f}, shadow {summary['shadow']['invalid_rate']:.3f},"
        f" table {summary['table']}, McNemar p = {summary['mcnemar_p']:.2g}; e2e {summary['latency_ratio']}"
    )
    assert summary["variant"] == "v3" and summary["served_by"] == {"baseline": sent}
    assert summary["difference"] > 0 and summary["difference_ci"][0] > 0
    assert summary["mcnemar_p"] < 0.01
    served = [r for r in gw.records() if not r.shadow]
    assert len(served) == sent and {r.variant for r in served} == {"baseline"}


def test_a_shadow_gated_canary_of_the_regressed_version_is_killed_before_step_1(
    make_gateway: GatewayMaker, engine: EngineProcess
) -> None:
    """A canary of @3 against the baseline with a shadow phase: @3 answers copies until the paired tests decide,
    and it is killed there, before its first step, with no user ever served by it. The release gate, which would
    refuse @3 as a canary candidate at load, is off: the shadow phase is the safety net when a version gets past
    (or was never given) an offline evaluation."""
    canary = CANARY.format(candidate="v3", baseline="baseline", steps="[10, 100]", min_requests=25)
    gw = make_gateway(
        behind_the_baseline(without_release_gate(SHIPPED))
        + SHADOW
        + canary.replace("[canary.guardrails]", SHADOW_PHASE + "\n[canary.guardrails]")
    )
    wait_for(lambda: "crm-formatter@3" in engine_models(engine.spec.base_url), timeout=ENGINE_WAIT_S)
    tally: Tally = {}
    sent = drive(gw.url, lambda: decided(gw), tally=tally)
    kill = next(e for e in audit_actions(gw) if e["action"] == "canary_kill")
    print(f"\ncrm-formatter@3 killed in its shadow phase after {sent} requests: {kill['reason']}")
    assert set(tally) == {"baseline"}, tally
    assert kill["actor"] == "canary" and "no user was served by the candidate" in kill["reason"]
    detail = kill["detail"]
    assert (detail["phase"], detail["users_served"]) == ("shadow", 0)
    assert (detail["from"]["status"], detail["to"]["status"]) == ("shadow", "killed")
    assert not [r for r in gw.records() if r.variant == "v3" and not r.shadow]
    assert gw.app.components.live.view.switches.variant_killed("crm-assistant", "v3")
