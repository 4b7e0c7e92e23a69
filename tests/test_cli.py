"""The `gateway` command as an operator runs it: a real subprocess against a real gateway."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.cli.admin import audit_line, audit_target
from gateway.cli.client import actor_name
from gateway.cli.main import main
from gateway.cli.run import GOLDEN_SET, demo_curl, demo_settings, golden_tools
from gateway.errors import ConfigError
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN, CLIENT_TOKEN, GatewayFactory, RunningGateway, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent


def gateway_cmd(
    *args: str, gw: RunningGateway | None = None, drop: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k not in drop}
    full_env.update(env)
    if gw is not None:
        full_env.setdefault("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
        full_env.setdefault("GATEWAY_DATA_DIR", str(gw.settings.data_dir))
        admin = ("kill", "revive", "status", "audit", "reload", "adapters", "lineage", "shadow")
        args = (*args, "--url", gw.url) if args[0] in admin else args
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        cwd=ROOT,
    )


def test_the_gateway_refuses_to_start_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GATEWAY_AUTH=off"):
        create_app(
            Settings(policies_dir=ROOT / "loadtests" / "sim" / "policies", data_dir=tmp_path, keys_file=None)
        )
    result = gateway_cmd("serve", GATEWAY_DATA_DIR=str(tmp_path), GATEWAY_PORT="0")
    assert result.returncode == 2
    assert "GATEWAY_KEYS_FILE" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_bad_policy(tmp_path: Path, workers: str) -> None:
    (tmp_path / "bad.toml").write_text('route = "x"\n[variants.a]\nmodel = "m"\nweight = -5\n')
    result = gateway_cmd(
        "serve",
        "--workers",
        workers,
        "--port",
        str(free_port()),
        GATEWAY_POLICIES_DIR=str(tmp_path),
        GATEWAY_AUTH="off",
        GATEWAY_DATA_DIR=str(tmp_path),
    )
    assert result.returncode == 2 and "bad.toml" in result.stderr and "weight" in result.stderr


def test_serve_refuses_a_bad_engine_url_naming_the_engine_and_the_url(tmp_path: Path) -> None:
    engines = '{"default": ["http://10.0.0.5:8001", "ftp://10.0.0.6"]}'
    result = gateway_cmd("serve", GATEWAY_ENGINES=engines, GATEWAY_AUTH="off", GATEWAY_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "gateway: configuration rejected: GATEWAY_ENGINES: engine 'default': 'ftp://10.0.0.6' is not an http(s) URL"
    )


def test_kill_status_revive_audit_from_the_command_line(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    killed = gateway_cmd(
        "kill", "crm-assistant", "formatter", "--reason", "canary regressed", gw=gw, USER="ops-bob"
    )
    assert killed.returncode == 0, killed.stderr
    status = gateway_cmd("status", "--json", gw=gw)
    assert json.loads(status.stdout)["routes"]["crm-assistant"]["variants"]["formatter"]["killed"] is True
    table = gateway_cmd("status", gw=gw).stdout
    assert "formatter" in table and "KILLED" in table
    member = next(line for line in table.splitlines() if gw.settings.engine_pools["default"][0] in line)
    assert member.split()[0] == "default" and "healthy" in member  # each pool member, its health
    assert (
        gateway_cmd("kill", "crm-assistant", "baseline", "--reason", "x", gw=gw).returncode == 1
    )  # last live
    assert (
        gateway_cmd(
            "revive", "crm-assistant", "formatter", "--reason", "fixed", gw=gw, USER="ops-bob"
        ).returncode
        == 0
    )
    audit = gateway_cmd("audit", "--json", gw=gw)
    entries = json.loads(audit.stdout)["entries"]
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("revive_variant", "ops-bob"),
        ("kill_variant", "ops-bob"),
    ]
    assert "canary regressed" in gateway_cmd("audit", gw=gw).stdout
    assert gateway_cmd("kill", "--reason", "x", gw=gw).returncode == 1  # names nothing


def test_the_cli_without_an_admin_token_says_so(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    result = gateway_cmd("status", "--url", gw.url)
    assert result.returncode == 1 and "GATEWAY_ADMIN_TOKEN" in result.stderr


def test_report_reads_the_request_log(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_TOKEN, max_retries=0)
    for i in range(30):
        c.chat.completions.create(
            model="crm-assistant",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-user-id": f"u{i}"},
        )
    gw.records()  # flush
    result = gateway_cmd("report", "--json", gw=gw)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert sum(r["requests"] for r in rows) == 30
    assert {r["variant"] for r in rows} <= {"baseline", "formatter"}
    text = gateway_cmd("report", "--route", "crm-assistant", "--since", "1h", gw=gw).stdout
    assert "baseline" in text


def test_shadow_start_stop_clear_and_status_from_the_command_line(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()  # CRM_POLICY: baseline 90, formatter 10, no [shadow]
    started = gateway_cmd(
        "shadow", "start", "crm-assistant", "formatter", "--reason", "try it", gw=gw, USER="ops-bob"
    )
    assert started.returncode == 0, started.stderr
    assert started.stdout.splitlines()[:3] == [
        "shadow_start: done",
        "crm-assistant: copies 100% to formatter (max_in_flight 8, budget none, stream as_sent)",
        "  policy: no shadow",
    ]
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_TOKEN, max_retries=0)
    for i in range(12):
        c.chat.completions.create(
            model="crm-assistant",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-user-id": f"u{i}"},
        )
    records = gw.records()
    copied = {r.primary_id for r in records if r.shadow}
    assert copied == {r.request_id for r in records if not r.shadow and r.variant == "baseline"} != set()
    shared = gateway_cmd(
        "shadow", "start", "crm-assistant", "formatter", "--share", "25", "--reason", "less", "--json", gw=gw
    )
    assert json.loads(shared.stdout)["shadow"]["share"] == 25.0
    status = gateway_cmd("shadow", "status", "crm-assistant", gw=gw).stdout
    assert "copies 25% to formatter" in status and "  override: start formatter 25% by " in status
    assert f"  formatter: {len(copied)} pairs" in status and "copies in flight here: 0" in status
    assert "  crm-assistant: start formatter 25% by " in gateway_cmd("status", gw=gw).stdout
    wrong = gateway_cmd("shadow", "stop", "crm-assistant", "baseline", "--reason", "x", gw=gw)
    assert (
        wrong.returncode == 1 and "409: The shadow in force on 'crm-assistant' is 'formatter'" in wrong.stderr
    )
    stopped = gateway_cmd(
        "shadow", "stop", "crm-assistant", "formatter", "--reason", "enough", "--json", gw=gw
    )
    assert json.loads(stopped.stdout)["override"]["mode"] == "stop"
    unexplained = gateway_cmd("shadow", "clear", "crm-assistant", gw=gw)
    assert unexplained.returncode == 2 and "--reason" in unexplained.stderr
    cleared = gateway_cmd("shadow", "clear", "crm-assistant", "--reason", "back to the file", gw=gw)
    assert cleared.returncode == 0 and cleared.stdout.splitlines()[-1] == "  override: none"
    too_much = gateway_cmd(
        "shadow", "start", "crm-assistant", "formatter", "--share", "150", "--reason", "x", gw=gw
    )
    assert too_much.returncode == 1 and "'share' must be between 0 and 100" in too_much.stderr
    entries = json.loads(gateway_cmd("audit", "--json", gw=gw).stdout)["entries"]
    assert [(e["action"], e["reason"]) for e in entries] == [
        ("shadow_clear", "back to the file"),
        ("shadow_stop", "enough"),
        ("shadow_start", "less"),
        ("shadow_start", "try it"),
    ]
    assert entries[-1]["actor"] == "ops-bob"


def test_adapters_list_swap_rollback_and_lineage_from_the_command_line(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    from tests.adapter_factory import adapter_policy, make_adapter

    root = tmp_path / "adapters"
    make_adapter(root, version="1")
    make_adapter(root, version="2", seed=2)
    gw = make_gateway({"crm.toml": adapter_policy("1", weight=50)}, adapters_dir=root, reconcile_s=0.2)
    listing = gateway_cmd("adapters", "list", gw=gw)
    assert (
        listing.returncode == 0
        and "crm-formatter@1" in listing.stdout
        and "crm-assistant/formatter" in listing.stdout
    )
    swap = gateway_cmd(
        "adapters", "swap", "crm-assistant", "formatter", "crm-formatter@2", "--reason", "fixes", gw=gw
    )
    assert swap.returncode == 0, swap.stderr
    assert "crm-formatter@1 -> crm-formatter@2" in swap.stdout
    back = gateway_cmd("adapters", "rollback", "crm-assistant", "formatter", "--reason", "regressed", gw=gw)
    assert back.returncode == 0 and "crm-formatter@2 -> crm-formatter@1" in back.stdout
    again = gateway_cmd(
        "adapters",
        "swap",
        "crm-assistant",
        "formatter",
        "crm-formatter@2",
        "--reason",
        "retry",
        "--json",
        gw=gw,
    )
    assert json.loads(again.stdout)["previous"] == "crm-formatter@1"  # --json prints the answer as it came
    reload = gateway_cmd("reload", "--json", gw=gw)
    assert json.loads(reload.stdout)["routes"] == ["crm-assistant"]
    lineage = gateway_cmd("lineage", "crm-assistant", "--since", "1h", gw=gw)
    assert (
        lineage.returncode == 0 and "adapter_swap" in lineage.stdout and "adapter_rollback" in lineage.stdout
    )


# -- the demo's suggested request ---------------------------------------------------------------------------


def curl_body(command: str) -> tuple[str, dict[str, object]]:
    """The URL and the JSON body of a curl command line, split as a POSIX shell splits it."""
    argv = shlex.split(command)
    assert argv[0] == "curl"
    return next(a for a in argv if a.startswith("http")), json.loads(argv[argv.index("-d") + 1])


def test_the_demos_curl_sends_the_golden_sets_tool() -> None:
    golden = json.loads(GOLDEN_SET.read_text().splitlines()[0])
    command = demo_curl("http://127.0.0.1:8080", golden_tools(GOLDEN_SET))
    url, body = curl_body(command)
    assert url == "http://127.0.0.1:8080/v1/chat/completions"
    assert body["model"] == "crm-assistant"
    assert body["tools"] == golden["tools"]  # update_crm with its JSON Schema, apostrophes and all
    assert "\n" not in command  # one line, to paste
    assert shlex.split(command)[1] == "-si"  # -i: the x-gateway-* headers are shown


def test_the_demos_curl_gets_a_checked_tool_call(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(keys_file=None, auth="off")  # as the demo runs
    url, body = curl_body(demo_curl(gw.url, golden_tools(GOLDEN_SET)))
    response = httpx.post(url, json=body, timeout=30.0)
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-tool-calls"] in {"valid", "invalid"}


def test_golden_tools_without_the_golden_set_is_none(tmp_path: Path) -> None:
    assert golden_tools(tmp_path / "missing.jsonl") is None
    assert "tools" not in curl_body(demo_curl("http://h:1", None))[1]


def test_the_demo_takes_the_environments_settings_and_fills_in_the_rest() -> None:
    before = dict(os.environ)
    keys = ROOT / "keys.toml"
    env = Settings(keys_file=keys, max_lora_rank=32)  # as GATEWAY_KEYS_FILE and GATEWAY_MAX_LORA_RANK would
    settings = demo_settings(env, engines={"default": "http://127.0.0.1:9"}, max_lora_rank=8)
    assert (settings.auth, settings.keys_file, settings.max_lora_rank) == ("on", keys, 32)
    assert settings.engines == {"default": "http://127.0.0.1:9"}
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "demo-admin-token"
    bare = demo_settings(Settings(admin_token="mine"))
    assert (
        bare.auth == "off" and bare.admin_token is not None and bare.admin_token.get_secret_value() == "mine"
    )
    assert dict(os.environ) == before  # nothing written to the process's environment


def test_the_sim_demo_serves_without_keys_and_prints_its_admin_token(tmp_path: Path) -> None:
    engine_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_PORT=str(port), GATEWAY_DATA_DIR=str(tmp_path), GATEWAY_DRAIN_S="1")
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "demo", "--sim", "--engine-port", str(engine_port)],
        env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/readyz"), timeout=30.0)
        models = httpx.get(url + "/v1/models", timeout=5.0)  # no client key: the demo runs without them
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["crm-assistant"]
        status = httpx.get(
            url + "/admin/status", headers={"Authorization": "Bearer demo-admin-token"}, timeout=5.0
        )
        assert status.status_code == 200
        console = httpx.get(url + "/console/sign-in", timeout=5.0)  # the console it points to answers
        assert console.status_code == 200 and 'name="token"' in console.text
    finally:
        demo.send_signal(signal.SIGINT)  # as Ctrl-C: the gateway drains, then the demo stops its engine
        _, stderr = demo.communicate(timeout=30)
    where = (
        f"demo: engine http://127.0.0.1:{engine_port}; gateway on {url} (policies: loadtests/sim/policies)"
    )
    assert where in stderr
    assert "admin token: demo-admin-token  (gateway status / kill / revive / audit)" in stderr
    assert f"console: {url}/console  (sign in with the admin token)" in stderr
    assert demo.returncode == 0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


# -- one error type, printed once by main ----------------------------------------------------------------------


def test_each_command_group_fails_with_its_name_and_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["loadtest", "compare", str(tmp_path / "a.json")]) == 1
    assert capsys.readouterr().err == (
        "gateway loadtest: compare takes two result files: gateway loadtest compare A.json B.json\n"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.a]\nerror_rate = 2")
    assert main(["sim-engine", "--port", "0", "--behaviour", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gateway sim-engine: ") and "models.a.error_rate" in err
    unset = gateway_cmd("canary", "status", "--url", "http://127.0.0.1:9")
    assert (unset.returncode, unset.stderr) == (1, "gateway: GATEWAY_ADMIN_TOKEN is not set\n")


# -- who the audit log names ------------------------------------------------------------------------------


def test_the_actor_is_the_flag_then_user_then_logname_then_the_login_name() -> None:
    def login() -> str:
        return "from-passwd"

    env = {"USER": "ops-bob", "LOGNAME": "bob"}
    assert actor_name("release-bot", env, login) == "release-bot"
    assert actor_name(None, env, login) == "ops-bob"
    assert actor_name(None, {"LOGNAME": "bob"}, login) == "bob"
    assert actor_name(None, {}, login) == "from-passwd"  # USER unset: no longer "cli"
    assert actor_name(None, {}, lambda: None) == "cli"


def test_without_user_the_cli_records_the_login_name(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    flip = ("kill", "crm-assistant", "formatter", "--reason", "r")
    assert gateway_cmd(*flip, gw=gw, drop=("USER", "LOGNAME")).returncode == 0
    assert gateway_cmd("revive", *flip[1:], "--actor", "release-bot", gw=gw).returncode == 0
    entries = json.loads(gateway_cmd("audit", "--json", gw=gw).stdout)["entries"]
    assert [e["actor"] for e in entries] == ["release-bot", pwd.getpwuid(os.getuid()).pw_name]


# -- audit lines --------------------------------------------------------------------------------------------


def entry(action: str, **fields: object) -> dict[str, object]:
    base = {"at": 0.0, "actor": "ops", "action": action, "route": None, "variant": None, "reason": None,
            "policy_version": "abc123", "detail": None}  # fmt: skip
    return {**base, **fields}


@pytest.mark.parametrize(
    ("e", "target"),
    [
        (entry("kill_variant", route="crm", variant="ft"), "crm/ft"),
        (entry("revive_route", route="crm"), "crm"),
        (entry("kill_all"), "all routes"),
        (entry("adapter_load", detail={"adapter": "crm-formatter@2", "engine": "default"}),
         "crm-formatter@2 on engine default"),
        (entry("adapter_unload", detail={"adapter": "crm-formatter@1", "engine": "gpu"}),
         "crm-formatter@1 on engine gpu"),
        (entry("adapter_rejected", detail={"adapter": "crm-formatter@9", "engine": "default"}),
         "crm-formatter@9 on engine default"),
        (entry("adapter_load", detail={"adapter": "crm-formatter@2", "engine": "gpu", "member": "http://b:8001"}),
         "crm-formatter@2 on engine gpu at http://b:8001"),
        (entry("adapter_swap", route="crm", variant="ft", detail={"adapter": "crm-formatter@2"}),
         "crm/ft -> crm-formatter@2"),
        (entry("reload", detail={"previous_version": "0ld", "routes": ["crm"]}), "policies (was 0ld)"),
        (entry("reload_rejected"), "policies"),
        (entry("canary_kill", route="crm", variant="ft", detail={"step": 1}), "crm/ft"),
    ],
)  # fmt: skip
def test_each_audit_line_names_its_target(e: dict[str, object], target: str) -> None:
    assert audit_target(e) == target
    assert target in audit_line(e)


def test_an_audit_line_says_when_who_what_why_and_the_policy() -> None:
    line = audit_line(entry("kill_variant", route="crm", variant="ft", reason="invalid calls up"))
    assert line.startswith("1970-01-01 00:00:00Z  ops")
    assert "kill_variant" in line and "invalid calls up" in line and line.endswith("[policy abc123]")
    assert "policy" not in audit_line(entry("adapter_unload", policy_version=None))
