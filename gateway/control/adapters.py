"""The adapter catalog: LoRA adapter versions on disk, their lineage, and the checks that run before any load.

An adapter version is an immutable directory `<adapters_dir>/<name>/<version>/` holding the peft files
(`adapter_config.json`, `adapter_model.safetensors`) and `lineage.toml` (what it was trained on, how it scored on
the golden set, who approved it). `scan()` reads every version once; a version whose files are missing or
malformed is still listed, with the reason, so `gateway adapters list` shows it and no policy can route to it.

`verify()` is the gate in front of the engine, since vLLM itself does not check that an adapter fits the served
base model (docs/vllm.md): files present, weights SHA-256 equal to the lineage's, `adapter_config.json` a LoRA
for the engine's base model with a rank within the engine's maximum, no bias, only target modules the engine
supports, and every tensor finite. The config is read as data (the same fields peft writes) rather than through
peft, which would pull torch into the gateway process. Each failure names the check.
"""

from __future__ import annotations

import json
import struct
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.digests import sha256_file
from gateway.errors import BadRequest
from gateway.policy import ReleaseGate

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LINEAGE_FILE = "lineage.toml"
# What vLLM serves LoRA on for Llama-family models (embeddings and lm_head need extra flags we do not set).
SUPPORTED_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


class AdapterRejected(BadRequest):
    """An adapter version failed a check; `check` names which one."""

    default_code = "adapter_rejected"

    def __init__(self, ref: str, check: str, message: str) -> None:
        super().__init__(f"Adapter {ref} failed the {check!r} check: {message}", code=f"adapter_{check}")
        self.ref = ref
        self.check = check


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Evaluation(_Strict):
    golden_set: str = ""
    n: Annotated[int, Field(ge=0)]
    invalid_call_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    task_success: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class Lineage(_Strict):
    name: str
    version: str
    base_model: str
    base_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    dataset_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    dataset_rows: Annotated[int, Field(ge=0)]
    adapter_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    created: str
    approvers: list[str] = Field(default_factory=list)
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: Evaluation


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What an adapter must fit: the engine's base model and its LoRA limits."""

    base_model: str
    max_lora_rank: int = 16
    base_sha256: str | None = None  # checked against the lineage when known
    modules: frozenset[str] = SUPPORTED_MODULES


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    name: str
    version: str
    path: Path
    lineage: Lineage | None
    problem: str | None = None  # why this version cannot be used, when it cannot
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "path": str(self.path),
            "problem": self.problem,
            "lineage": self.lineage.model_dump() if self.lineage else None,
        }


class Catalog:
    def __init__(self, versions: Mapping[str, AdapterVersion]) -> None:
        self.versions = dict(versions)

    def get(self, ref: str) -> AdapterVersion | None:
        return self.versions.get(ref)

    def __iter__(self) -> Iterator[AdapterVersion]:
        return iter(sorted(self.versions.values(), key=lambda v: (v.name, _version_key(v.version))))


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def scan(root: Path) -> Catalog:
    """Every `<root>/<name>/<version>/` directory, readable or not."""
    versions: dict[str, AdapterVersion] = {}
    if not root.is_dir():
        return Catalog(versions)
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for version_dir in sorted(
            p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
        ):
            version = read_version(name_dir.name, version_dir.name, version_dir)
            versions[version.ref] = version
    return Catalog(versions)


def read_version(name: str, version: str, path: Path) -> AdapterVersion:
    try:
        lineage = Lineage.model_validate(tomllib.loads((path / LINEAGE_FILE).read_text()))
    except FileNotFoundError:
        return AdapterVersion(name, version, path, None, f"{LINEAGE_FILE} is missing")
    except (tomllib.TOMLDecodeError, ValidationError, UnicodeDecodeError) as exc:
        return AdapterVersion(name, version, path, None, f"{LINEAGE_FILE} is malformed: {_short(exc)}")
    if (lineage.name, lineage.version) != (name, version):
        problem = f"{LINEAGE_FILE} names {lineage.name}@{lineage.version}, not {name}@{version}"
        return AdapterVersion(name, version, path, lineage, problem)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        return AdapterVersion(name, version, path, lineage, f"{CONFIG_FILE} is unreadable: {_short(exc)}")
    return AdapterVersion(name, version, path, lineage, None, config if isinstance(config, dict) else {})


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200]


def release_gate(gate: ReleaseGate, lineage: Lineage) -> str | None:
    """Why `lineage` fails a route's release gate, or None. Kill switches and rollbacks never come through here."""
    evaluation = lineage.evaluation
    if gate.max_invalid_call_rate is not None and evaluation.invalid_call_rate > gate.max_invalid_call_rate:
        return (
            f"max_invalid_call_rate = {gate.max_invalid_call_rate:g}, but its golden-set evaluation measured "
            f"{evaluation.invalid_call_rate:.3f}"
        )
    if evaluation.n < gate.min_eval_n:
        return f"min_eval_n = {gate.min_eval_n}, but it was evaluated on {evaluation.n} examples"
    if gate.require_approvers and not lineage.approvers:
        return "require_approvers = true, but its lineage names no approver"
    return None


# -- the checks -------------------------------------------------------------------------------------------------


def verify(version: AdapterVersion, engine: EngineFacts) -> None:
    """Raise `AdapterRejected` naming the first failed check; return when the version may be loaded."""
    ref = version.ref
    if version.lineage is None:
        raise AdapterRejected(ref, "lineage", version.problem or f"{LINEAGE_FILE} is missing")
    if version.problem:
        raise AdapterRejected(ref, "files", version.problem)
    weights = version.path / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterRejected(ref, "files", f"{WEIGHTS_FILE} is missing")
    digest = sha256_file(weights)
    if digest != version.lineage.adapter_sha256:
        raise AdapterRejected(
            ref,
            "weights_sha256",
            f"{WEIGHTS_FILE} is {digest[:12]}…, lineage says "
            f"{version.lineage.adapter_sha256[:12]}… (modified after it was recorded?)",
        )
    _check_config(ref, version.config, version.lineage, engine)
    _check_tensors(ref, weights)


def _check_config(ref: str, config: Mapping[str, Any], lineage: Lineage, engine: EngineFacts) -> None:
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterRejected(ref, "peft_type", f"peft_type is {config.get('peft_type')!r}, not LORA")
    _check_base(ref, config, lineage, engine)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1 or rank > engine.max_lora_rank:
        raise AdapterRejected(
            ref, "rank", f"rank {rank!r} is not within 1..{engine.max_lora_rank} (the engine's maximum)"
        )
    if config.get("bias", "none") != "none":
        raise AdapterRejected(
            ref, "bias", f"bias is {config.get('bias')!r}; the engine serves only bias 'none'"
        )
    modules = config.get("target_modules")
    names = {modules} if isinstance(modules, str) else set(modules or ())
    unsupported = sorted(names - engine.modules)
    if not names or unsupported:
        raise AdapterRejected(ref, "target_modules", f"unsupported target modules {unsupported or '(none)'}")


def _check_base(ref: str, config: Mapping[str, Any], lineage: Lineage, engine: EngineFacts) -> None:
    declared = Path(str(config.get("base_model_name_or_path") or "")).name
    if lineage.base_model != engine.base_model or (declared and declared != engine.base_model):
        raise AdapterRejected(
            ref,
            "base_model",
            f"trained on {lineage.base_model!r} ({declared!r} in {CONFIG_FILE}); "
            f"the engine serves {engine.base_model!r}",
        )
    if engine.base_sha256 is not None and lineage.base_sha256 != engine.base_sha256:
        raise AdapterRejected(
            ref, "base_model", "the base weights it was trained on differ from the engine's"
        )


_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def _check_tensors(ref: str, path: Path) -> None:
    try:
        for name, dtype, data in _tensors(path):
            if not _finite(dtype, data):
                raise AdapterRejected(ref, "tensors_finite", f"tensor {name!r} holds NaN or infinite values")
    except (ValueError, KeyError, struct.error) as exc:
        raise AdapterRejected(
            ref, "files", f"{WEIGHTS_FILE} is not a valid safetensors file: {_short(exc)}"
        ) from None


def _finite(dtype: str, data: bytes) -> bool:
    if dtype == "BF16":  # numpy has no bfloat16: widen to float32 (the same exponent bits)
        wide = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bool(np.isfinite(wide.view(np.float32)).all())
    kind = _FLOATS.get(dtype)
    if kind is None:
        return True  # integer and boolean tensors are always finite
    return bool(np.isfinite(np.frombuffer(data, dtype=np.dtype(kind).newbyteorder("<"))).all())


def _tensors(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """(name, dtype, raw bytes) of each tensor, one at a time: the safetensors layout is an 8-byte little-endian
    header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data."""
    total = path.stat().st_size
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > total - 8:
            raise ValueError("the header is longer than the file")
        header = json.loads(f.read(size))
        base = 8 + size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= total - base:
                raise ValueError(f"tensor {name!r} lies outside the file")
            f.seek(base + start)
            yield name, str(info["dtype"]), f.read(end - start)
