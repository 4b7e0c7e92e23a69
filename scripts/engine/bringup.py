"""Engine bring-up check: install the engine venv, build the tiny model, start vLLM on it, exercise it, stop it.

Run with the gateway's venv from the repository root: `.venv/bin/python scripts/engine/bringup.py [--workdir D]`.
It prints each step and ends with one JSON line of figures (install, start-up to healthy, first request
latency, requests/s at 8 concurrent with 60 output tokens). Every check asserts a behaviour of docs/vllm.md:
plain-text 200 on adapter load, 400 on a second load of the same name, 404 for an unknown model, an adapter
listed in /v1/models with `parent` = the base model and served as soon as the load returns.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gateway.devtools.engine_runner import EngineProcess, EngineSpec, ensure_engine_env

HERE = Path(__file__).resolve().parent
BASE = "tiny-base"
ADAPTER = "tiny-lora"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "update_crm",
            "parameters": {"type": "object", "properties": {"contact": {"type": "string"}}},
        },
    }
]


def step(name: str, started: float) -> float:
    seconds = time.monotonic() - started
    print(f"[{seconds:7.2f} s] {name}", flush=True)
    return seconds


def build_models(python: Path, workdir: Path) -> tuple[Path, Path]:
    model, lora = workdir / "tiny-llama", workdir / "tiny-lora-r8"
    if not (model / "config.json").exists() or not (lora / "adapter_config.json").exists():
        cmd = [str(python), str(HERE / "tiny_model.py"), "model", str(model), "--lora", str(lora)]
        subprocess.run(cmd, check=True)
    return model, lora


def chat(client: httpx.Client, model: str, max_tokens: int = 16, **extra: Any) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Update Ada."}],
        "max_tokens": max_tokens,
    }
    return client.post("/v1/chat/completions", json=body | extra)


def check_chat(client: httpx.Client) -> float:
    started = time.monotonic()
    reply = chat(client, BASE)
    latency = time.monotonic() - started
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["role"] == "assistant", body
    print(f"  chat: {body['usage']}, finish {body['choices'][0]['finish_reason']}")
    tools = chat(client, BASE, tools=TOOLS, tool_choice="auto")
    assert tools.status_code == 200, tools.text
    return latency


def check_stream(client: httpx.Client) -> None:
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    frames = []
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        frames = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]", frames[-3:]
    usage = json.loads(frames[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0, usage
    print(f"  stream: {len(frames)} frames, usage {usage['usage']}")


def check_adapters(client: httpx.Client, lora: Path) -> None:
    load = {"lora_name": ADAPTER, "lora_path": str(lora)}
    first = client.post("/v1/load_lora_adapter", json=load)
    assert first.status_code == 200, first.text
    assert not first.text.lstrip().startswith("{"), f"load answered JSON: {first.text}"
    print(f"  load: 200 {first.text!r}")
    again = client.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "error" in again.json(), again.text
    print(f"  load again: {again.status_code} {again.json()['error']['message'][:80]!r}")
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards[ADAPTER]["parent"] == BASE and cards[ADAPTER]["root"] == str(lora), cards
    served = chat(client, ADAPTER)
    assert served.status_code == 200 and served.json()["model"] == ADAPTER, served.text
    unload = client.post("/v1/unload_lora_adapter", json={"lora_name": ADAPTER})
    assert unload.status_code == 200, unload.text
    print(f"  unload: 200 {unload.text!r}")
    gone = chat(client, ADAPTER)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == 404, gone.text
    print(f"  after unload: 404 {gone.json()['error']['message'][:80]!r}")


def check_unknown(client: httpx.Client) -> None:
    reply = chat(client, "no-such-model")
    assert reply.status_code == 404, reply.text
    assert set(reply.json()["error"]) >= {"message", "type", "param", "code"}, reply.text
    unload = client.post("/v1/unload_lora_adapter", json={"lora_name": "no-such-adapter"})
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nonexistent"})
    print(
        f"  unknown model 404; unload unknown {unload.status_code}; load missing path {missing.status_code}"
    )


def throughput(base_url: str, concurrency: int = 8, requests: int = 64, tokens: int = 60) -> dict[str, float]:
    """Requests/s with `concurrency` clients, each request forced to `tokens` output tokens."""

    def one(_: int) -> float:
        started = time.monotonic()
        with httpx.Client(base_url=base_url, timeout=120) as client:
            reply = chat(client, BASE, max_tokens=tokens, ignore_eos=True)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == tokens, reply.text
        return time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up
        started = time.monotonic()
        latencies = list(pool.map(one, range(requests)))
        wall = time.monotonic() - started
    return {
        "req_per_s": round(requests / wall, 1),
        "output_tok_per_s": round(requests * tokens / wall),
        "p50_ms": round(statistics.median(latencies) * 1000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("var/engine-bringup"))
    parser.add_argument("--env", type=Path, default=Path(".venv-engine"))
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--skip-load", action="store_true", help="skip the throughput run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    t0 = time.monotonic()
    python = ensure_engine_env(args.env)
    figures["ensure_env_s"] = round(step("engine venv ready", t0), 1)
    model, lora = build_models(python, args.workdir)
    step("tiny model and adapter built", t0)
    spec = EngineSpec(
        model=model, served_model_name=BASE, port=args.port, max_lora_rank=8, max_model_len=1024
    )
    with EngineProcess(spec, python, args.workdir / "engine.log") as engine:
        figures["startup_to_healthy_s"] = round(engine.wait_healthy(timeout=600), 1)
        step(f"engine healthy (pid {engine.pid})", t0)
        with httpx.Client(base_url=spec.base_url, timeout=120) as client:
            figures["first_request_ms"] = round(check_chat(client) * 1000)
            check_stream(client)
            check_adapters(client, lora)
            check_unknown(client)
        step("behaviour checks passed", t0)
        if not args.skip_load:
            figures["load_8_concurrent_60_tokens"] = throughput(spec.base_url)
            step("throughput measured", t0)
        stop_started = time.monotonic()
    figures["stop_s"] = round(time.monotonic() - stop_started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
