"""Load-test scenarios: the TOML file, validated whole into frozen models, and the request set it names.

Owns the scenario schema (`Scenario` and its tables: `[target]`, `[requests]`, `[load]`, `[compare]`,
`[expect.<variant>]`), the golden set reader (`GoldenItem`: one JSONL row `{"id", "messages", "tools",
"expected": {"name", "arguments"}}`) and the price tables read from the route's policy file. Everything that can
be wrong with a scenario is found here, before any request is sent, and raised as `ConfigError` naming the file
and the key. Paths in a scenario are relative to the scenario file. `load_scenario` is the only I/O (reading the
files); `parse_scenario` validates a parsed document.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.errors import ConfigError
from gateway.pricing import Price

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
Name = Annotated[str, Field(pattern=_NAME)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    url: Annotated[str, Field(pattern=r"^https?://")] = "http://127.0.0.1:8080"
    route: Name
    api_key: str | None = None  # prefer api_key_env: a key in a file ends up in version control
    api_key_env: str | None = "GATEWAY_LOADTEST_KEY"
    # The route's policy file: its variants' price tables give each request's cost (usage × price), the same
    # arithmetic the gateway's records use. Without it, costs are not reported.
    prices: str | None = None
    timeout_s: Positive = 120.0

    def key(self) -> str | None:
        """The API key: `api_key`, else the variable `api_key_env` names (None: send no Authorization)."""
        key = self.api_key or (os.environ.get(self.api_key_env, "") if self.api_key_env else "")
        key = key.strip()
        if any(c in key for c in "\r\n"):
            raise ConfigError("the API key contains a line break")
        return key or None


class Requests(_Strict):
    golden: Annotated[str, Field(min_length=1)]
    stream: bool = False
    body: dict[str, Any] = Field(default_factory=dict)  # merged into every request body (e.g. temperature)
    # as_served: send the route's sticky header (x-user-id) drawn from this many users; 0: send none, so the
    # gateway draws independently per request.
    users: Annotated[int, Field(ge=0)] = 0
    user_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]+$")] = "x-user-id"

    @model_validator(mode="after")
    def _body(self) -> Requests:
        owned = {"model", "messages", "tools", "stream", "stream_options"} & set(self.body)
        if owned:
            raise ValueError(f"body: {sorted(owned)} are set by the runner, not the scenario")
        return self


class Load(_Strict):
    arrival: Literal["fixed", "poisson", "concurrent"] = "concurrent"
    rate: Positive | None = None  # requests per second: fixed and poisson
    concurrency: Annotated[int, Field(ge=1, le=10_000)] | None = None  # concurrent clients
    requests: Annotated[int, Field(ge=1)] | None = None  # measured requests (not counting warm-up)
    duration_s: Positive | None = None
    warmup: Annotated[int, Field(ge=0)] = 0  # requests sent and answered before measuring; not counted
    seed: int = 1
    # Open loop: at most this many requests in flight; a start that must wait for a free slot is late (counted).
    max_inflight: Annotated[int, Field(ge=1)] = 2048
    late_after_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] = (
        10.0  # a start this late is counted late
    )

    @model_validator(mode="after")
    def _shape(self) -> Load:
        if self.arrival == "concurrent":
            if self.rate is not None:
                raise ValueError("rate: only for arrival 'fixed' or 'poisson' (use concurrency)")
            if self.concurrency is None:
                raise ValueError("concurrency: required for arrival 'concurrent'")
        else:
            if self.concurrency is not None:
                raise ValueError("concurrency: only for arrival 'concurrent' (use rate)")
            if self.rate is None:
                raise ValueError(f"rate: required for arrival {self.arrival!r}")
        if self.requests is not None and self.duration_s is not None:
            raise ValueError("give requests or duration_s, not both")
        return self


class Compare(_Strict):
    mode: Literal["as_served", "paired"] = "as_served"
    variants: list[Name] = Field(default_factory=list)
    baseline: Name | None = None  # the reference of the paired tests (default: the first variant)

    @model_validator(mode="after")
    def _variants(self) -> Compare:
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants: a variant is listed twice")
        if self.mode == "paired" and len(self.variants) < 2:
            raise ValueError("variants: paired mode compares at least two variants")
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the variants")
        return self

    @property
    def reference(self) -> str | None:
        return self.baseline or (self.variants[0] if self.variants else None)


class Band(_Strict):
    """What a variant is expected to show: a [low, high] band per rate, checked in the report."""

    invalid_rate: tuple[Rate, Rate] | None = None
    success_rate: tuple[Rate, Rate] | None = None
    error_rate: tuple[Rate, Rate] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Band:
        for name in ("invalid_rate", "success_rate", "error_rate"):
            band = getattr(self, name)
            if band is not None and band[0] > band[1]:
                raise ValueError(f"{name}: low {band[0]} is above high {band[1]}")
        return self


class Scenario(_Strict):
    name: Name
    description: str = ""
    target: Target
    requests: Requests
    load: Load
    compare: Compare = Compare()
    expect: dict[Name, Band] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_check(self) -> Scenario:
        if self.compare.variants:
            unknown = set(self.expect) - set(self.compare.variants)
            if unknown:
                raise ValueError(f"expect: {sorted(unknown)} not among compare.variants")
        return self


@dataclass(frozen=True, slots=True)
class GoldenItem:
    id: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    expected: Mapping[str, Any] | None  # {"name", "arguments"}: the one call a correct answer makes


@dataclass(frozen=True, slots=True)
class Loaded:
    """A scenario with what its files hold: the request set and the price tables (variant → price)."""

    scenario: Scenario
    path: Path
    golden: tuple[GoldenItem, ...]
    prices: Mapping[str, Price]


def parse_scenario(data: Mapping[str, Any], source: str = "scenario") -> Scenario:
    try:
        return Scenario.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_errors(exc)}") from None


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "scenario"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def with_overrides(scenario: Scenario, **overrides: Any) -> Scenario:
    """The scenario with command-line overrides (`url`, `requests`, `duration_s`, `rate`, `concurrency`,
    `warmup`, `stream`), validated again as a whole: an override that makes it inconsistent is an error."""
    data = scenario.model_dump()
    tables = {"url": "target", "stream": "requests"}
    for key, value in overrides.items():
        if value is None:
            continue
        table = data[tables.get(key, "load")]
        table[key] = value
        if key == "requests":
            table["duration_s"] = None
        elif key == "duration_s":
            table["requests"] = None
    return parse_scenario(data, "scenario with command-line overrides")


def load_scenario(path: Path, **overrides: Any) -> Loaded:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the scenario: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    scenario = with_overrides(parse_scenario(data, str(path)), **overrides)
    base = path.parent
    golden = read_golden(base / scenario.requests.golden)
    prices = (
        read_prices(base / scenario.target.prices, scenario.target.route) if scenario.target.prices else {}
    )
    unpriced = [v for v in scenario.compare.variants if prices and v not in prices]
    if unpriced:
        raise ConfigError(f"{path}: target.prices: no variant {unpriced} in {scenario.target.prices}")
    return Loaded(scenario, path, golden, prices)


def read_golden(path: Path) -> tuple[GoldenItem, ...]:
    """The request set: one JSON object per line (blank lines skipped); any bad row is an error naming it."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the request set: {exc.strerror or exc}") from None
    items = [_item(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise ConfigError(f"{path}: the request set is empty")
    return tuple(items)


def _item(path: Path, line_no: int, line: bytes) -> GoldenItem:
    where = f"{path}:{line_no}"
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON: {exc}") from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise ConfigError(f"{where}: expected an object with a non-empty 'messages' list")
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ConfigError(f"{where}: 'tools' must be a list")
    expected = row.get("expected")
    if expected is not None and not (
        isinstance(expected, dict)
        and isinstance(expected.get("name"), str)
        and isinstance(expected.get("arguments"), dict)
    ):
        raise ConfigError(f'{where}: \'expected\' must be {{"name": str, "arguments": object}}')
    return GoldenItem(str(row.get("id", line_no)), row["messages"], tools, expected)


def read_prices(path: Path, route: str) -> dict[str, Price]:
    """Variant → price from the route's policy file (only its TOML and price tables are read here)."""
    from gateway.control.policies import PolicyModel

    try:
        policy = PolicyModel.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the policy: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"{path}: not a valid policy file: {exc}") from None
    if policy.route != route:
        raise ConfigError(f"{path}: is the policy of route {policy.route!r}, not {route!r}")
    return {
        name: Price(v.price.input_per_mtok, v.price.output_per_mtok, v.price.currency)
        for name, v in policy.variants.items()
        if v.price is not None
    }


def planned_requests(scenario: Scenario, golden_size: int) -> int | None:
    """Measured requests the run will send; None when it runs for a duration with concurrent clients.

    Paired mode sends whole groups (one request per variant for a golden item), so counts round up to a
    multiple of the number of variants. Without `requests` or `duration_s`: one pass over the request set.
    """
    load = scenario.load
    group = len(scenario.compare.variants) if scenario.compare.mode == "paired" else 1
    if load.requests is not None:
        count = load.requests
    elif load.duration_s is not None:
        if load.arrival == "concurrent":
            return None
        assert load.rate is not None
        count = math.ceil(load.rate * load.duration_s)
    else:
        count = golden_size * group
    return math.ceil(count / group) * group
