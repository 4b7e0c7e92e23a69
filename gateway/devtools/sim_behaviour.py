"""The simulated engine's behaviour file, validated into a frozen `Behaviour`: the served base models
(`[models.<name>]`, the first one the parent of loaded adapters), how adapters loaded at runtime answer
(`[adapters.<name>]`), the adapters loaded at start (`[lora_modules]`), `[defaults]` and the `seed`. Any problem
is a ValueError that names the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

FLAW_NAMES = ("unknown_tool", "malformed_json", "schema_violation", "missing_tool_call", "truncated")
DEFAULT_MODEL = "crm-base"


@dataclass(frozen=True, slots=True)
class Flaws:
    """Probability of each flaw in a tool-call answer; at most one flaw is drawn per answer (they add up)."""

    unknown_tool: float = 0.0
    malformed_json: float = 0.0
    schema_violation: float = 0.0
    missing_tool_call: float = 0.0
    truncated: float = 0.0

    def draw(self, u: float) -> str | None:
        edge = 0.0
        for name in FLAW_NAMES:
            edge += getattr(self, name)
            if u < edge:
                return name
        return None


@dataclass(frozen=True, slots=True)
class ModelBehaviour:
    """How one served name answers. Non-stream answers take `latency_ms`; streams take `ttft_ms` then one
    piece every 1/`tokens_per_s` seconds (0: as fast as possible)."""

    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    output_tokens: int = 16
    error_rate: float = 0.0
    midstream_error_rate: float = 0.0
    invalid: Flaws = Flaws()


@dataclass(frozen=True, slots=True)
class Behaviour:
    """The simulated engine's setup: served base models, adapter behaviours, adapters loaded at start."""

    models: Mapping[str, ModelBehaviour] = field(
        default_factory=lambda: MappingProxyType({DEFAULT_MODEL: ModelBehaviour()})
    )
    adapters: Mapping[str, ModelBehaviour] = field(default_factory=lambda: MappingProxyType({}))
    lora_modules: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    defaults: ModelBehaviour = ModelBehaviour()
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a behaviour serves at least one base model")

    def for_adapter(self, name: str) -> ModelBehaviour:
        """Adapter `name` or `name@version` takes `[adapters.name]`, else `[models.name]`, else defaults."""
        for key in (name, name.split("@", 1)[0]):
            found = self.adapters.get(key) or self.models.get(key)
            if found is not None:
                return found
        return self.defaults


_RATE_KEYS = frozenset({"error_rate", "midstream_error_rate"})
_MODEL_KEYS = frozenset({"latency_ms", "ttft_ms", "tokens_per_s", "output_tokens", "invalid"}) | _RATE_KEYS
_TOP_KEYS = frozenset({"seed", "defaults", "models", "adapters", "lora_modules"})


def _number(value: Any, where: str, *, rate: bool = False, integer: bool = False) -> float:
    ok_type = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a {'whole ' if integer else ''}number, got {value!r}")
    low, high = (1, math.inf) if integer else (0, 1 if rate else math.inf)
    if not low <= value <= high:
        raise ValueError(f"{where}: {value!r} is outside {low}..{high}")
    return value if integer else float(value)


def _table(value: Any, where: str, allowed: frozenset[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a table, got {type(value).__name__}")
    unknown = set(value) - allowed if allowed is not None else set()
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed or ())}")
    return value


def _flaws(value: Any, base: Flaws, where: str) -> Flaws:
    table = _table(value, where, frozenset(FLAW_NAMES))
    flaws = dataclasses.replace(base, **{k: _number(v, f"{where}.{k}", rate=True) for k, v in table.items()})
    if sum(getattr(flaws, name) for name in FLAW_NAMES) > 1 + 1e-9:
        raise ValueError(f"{where}: flaw probabilities add up to more than 1")
    return flaws


def _model_behaviour(value: Any, base: ModelBehaviour, where: str) -> ModelBehaviour:
    values: dict[str, Any] = {}
    for key, raw in _table(value, where, _MODEL_KEYS).items():
        if key == "invalid":
            values[key] = _flaws(raw, base.invalid, f"{where}.invalid")
        else:
            is_int = key == "output_tokens"
            values[key] = _number(raw, f"{where}.{key}", rate=key in _RATE_KEYS, integer=is_int)
    return dataclasses.replace(base, **values)


def _named(value: Any, where: str, base: ModelBehaviour) -> dict[str, ModelBehaviour]:
    out = {}
    for name, table in _table(value, where).items():
        if not name:
            raise ValueError(f"{where}: empty name")
        out[name] = _model_behaviour(table, base, f"{where}.{name}")
    return out


def parse_behaviour(data: Mapping[str, Any], source: str = "behaviour") -> Behaviour:
    """Validate a parsed behaviour document (the TOML file's tables) into a frozen `Behaviour`."""
    top = _table(dict(data), source, _TOP_KEYS)
    seed = top.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{source}.seed: expected an integer, got {seed!r}")
    defaults = _model_behaviour(top.get("defaults", {}), ModelBehaviour(), f"{source}.defaults")
    models = _named(top.get("models", {}), f"{source}.models", defaults) or {DEFAULT_MODEL: defaults}
    adapters = _named(top.get("adapters", {}), f"{source}.adapters", defaults)
    modules = _table(top.get("lora_modules", {}), f"{source}.lora_modules")
    for name, path in modules.items():
        if not isinstance(path, str) or not path or name in models:
            raise ValueError(f"{source}.lora_modules.{name}: expected a path string and a name no model has")
    return Behaviour(
        models=MappingProxyType(models),
        adapters=MappingProxyType(adapters),
        lora_modules=MappingProxyType(dict(modules)),
        defaults=defaults,
        seed=seed,
    )


def load_behaviour(path: Path | None) -> Behaviour:
    """Read and validate a behaviour TOML file; None gives the default (one model `crm-base`, no delays, no
    flaws). Any problem is a ValueError that names the file and the key."""
    if path is None:
        return Behaviour()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read behaviour file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    return parse_behaviour(data, str(path))
