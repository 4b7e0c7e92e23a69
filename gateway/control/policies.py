"""Loads `policies/*.toml` into one validated `PolicySnapshot` (`control.live` holds the view requests read).

Loading is all-or-nothing: every file is parsed into strict pydantic models (unknown keys are errors, so a typo
never silently changes routing), cross-checked (engines exist, fallbacks name variants of the route, no two files
claim one route, some weight is positive, a `[shadow]` names a variant of the route, priced when it has a budget), and only then turned into frozen `policy` objects. Any failure raises
`ConfigError` naming the file and field; the caller keeps the old snapshot. The version is a content hash of the
files, so the same files always give the same version on every gateway process.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.canary.config import CanaryModel, canary_spec, check_canary
from gateway.control.adapters import Catalog, release_gate
from gateway.errors import ConfigError
from gateway.policy import (
    PolicySnapshot,
    ReleaseGate,
    Route,
    ShadowSpec,
    Sticky,
    Timeouts,
    Variant,
)
from gateway.pricing import Price
from gateway.retrieval import Index, Retrieval
from gateway.rewrite import CONTEXT
from gateway.settings import Settings

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
Name = Annotated[str, Field(pattern=_NAME)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceModel(_Strict):
    input_per_mtok: NonNegative
    output_per_mtok: NonNegative
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"


class RetrievalModel(_Strict):
    documents: Annotated[str, Field(min_length=1)]  # a directory, relative to the working directory
    top_k: Annotated[int, Field(ge=1, le=20)] = 3


class VariantModel(_Strict):
    model: Annotated[str, Field(min_length=1)] | None = None
    adapter: (
        Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9._-]*$")] | None
    ) = None
    engine: Name = "default"
    weight: NonNegative = 0.0
    system_prompt: str | None = None
    retrieval: RetrievalModel | None = None
    price: PriceModel | None = None

    @model_validator(mode="after")
    def _one_model(self) -> VariantModel:
        if (self.model is None) == (self.adapter is None):
            raise ValueError(
                "give exactly one of 'model' (an engine model name) and 'adapter' (name@version)"
            )
        if (self.retrieval is not None) != (CONTEXT in (self.system_prompt or "")):
            raise ValueError(
                "'retrieval' needs a system_prompt with a {context} placeholder, and the other way round"
            )
        return self


class ReleaseModel(_Strict):
    """A route's release gate: what an adapter version's lineage must show before it may take traffic."""

    max_invalid_call_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    min_eval_n: Annotated[int, Field(ge=0)] = 0
    require_approvers: bool = False


class TimeoutsModel(_Strict):
    connect: Positive | None = None
    first_byte: Positive | None = None
    total: Positive | None = None


class ShadowModel(_Strict):
    """A route's `[shadow]`: a variant that answers copies of a share of the route's requests (`policy.ShadowSpec`)."""

    variant: Name
    share: Annotated[float, Field(strict=True, ge=0, le=100, allow_inf_nan=False)]  # percent of requests
    max_in_flight: Annotated[int, Field(strict=True, ge=1)] = 8  # per gateway process
    max_cost_per_hour: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | None = None
    stream: Literal["as_sent", "non_stream"] = "as_sent"


class PolicyModel(_Strict):
    route: Name
    sticky: str = "none"
    tool_calls: Literal["observe", "annotate", "enforce"] = "observe"
    fallback: list[Name] = Field(default_factory=list)
    salt: str | None = None
    description: str | None = None
    timeouts: TimeoutsModel = TimeoutsModel()
    release: ReleaseModel = ReleaseModel()
    variants: dict[Name, VariantModel] = Field(min_length=1)
    canary: CanaryModel | None = None
    shadow: ShadowModel | None = None

    @field_validator("sticky")
    @classmethod
    def _sticky(cls, value: str) -> str:
        parse_sticky(value)
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> PolicyModel:
        for name in self.fallback:
            if name not in self.variants:
                raise ValueError(f"fallback {name!r} is not a variant of this route")
        if not any(v.weight > 0 for v in self.variants.values()):
            raise ValueError("at least one variant needs a positive weight")
        if self.canary is not None:
            check_canary(self.canary, self.variants, self.fallback, self.sticky, self.shadow)
        if self.shadow is not None:
            _check_shadow(self.shadow, self.variants)
        return self


def _check_shadow(shadow: ShadowModel, variants: Mapping[str, VariantModel]) -> None:
    """Cross-checks against the route; raises ValueError naming the field."""
    variant = variants.get(shadow.variant)
    if variant is None:
        raise ValueError(f"shadow.variant: {shadow.variant!r} is not a variant of this route")
    if shadow.max_cost_per_hour is not None and variant.price is None:
        raise ValueError(
            f"shadow.max_cost_per_hour: variant {shadow.variant!r} has no price, so its cost cannot be counted"
        )


def parse_sticky(spec: str) -> Sticky:
    if spec == "none":
        return Sticky()
    source, _, name = spec.partition(":")
    if source not in ("header", "body") or not name:
        raise ValueError(f"sticky must be 'header:<name>', 'body:<field>' or 'none', not {spec!r}")
    return Sticky(
        source="header" if source == "header" else "body", name=name.lower() if source == "header" else name
    )


def load_configured(settings: Settings, catalog: Catalog) -> PolicySnapshot:
    """`load_policies` as the settings name them: their directory, engines and default timeouts."""
    defaults = Timeouts(settings.connect_timeout, settings.first_byte_timeout, settings.total_timeout)
    return load_policies(settings.policies_dir, settings.engines, defaults, catalog)


def load_policies(
    directory: Path, engines: Mapping[str, object], defaults: Timeouts, catalog: Catalog | None = None
) -> PolicySnapshot:
    """Parse and validate every `*.toml` in `directory` (not recursive). Raises `ConfigError`.

    Variants that name an adapter are checked against `catalog` (it must list a usable version) and against the
    route's release gate."""
    if not directory.is_dir():
        raise ConfigError(f"policies directory {str(directory)!r} does not exist")
    files = sorted(directory.glob("*.toml"))
    digest = hashlib.sha256()
    routes: dict[str, Route] = {}
    sources: dict[str, str] = {}
    for path in files:
        raw = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        route = _route_from(path, raw, engines, defaults, catalog or Catalog({}))
        for variant in route.variants:  # a knowledge-base change is a policy change
            if isinstance(variant.retrieval, Retrieval):
                digest.update(variant.retrieval.index.content_hash.encode())
        if route.name in routes:
            raise ConfigError(f"{path}: route {route.name!r} is already defined in {sources[route.name]}")
        routes[route.name] = route
        sources[route.name] = str(path)
    return PolicySnapshot(MappingProxyType(routes), digest.hexdigest()[:16], MappingProxyType(sources))


def _route_from(
    path: Path, raw: bytes, engines: Mapping[str, object], defaults: Timeouts, catalog: Catalog
) -> Route:
    try:
        model = PolicyModel.model_validate(tomllib.loads(raw.decode()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_error(exc)}") from None
    for name, variant in model.variants.items():
        if variant.engine not in engines:
            raise ConfigError(
                f"{path}: variants.{name}.engine: {variant.engine!r} is not in GATEWAY_ENGINES ({sorted(engines)})"
            )
        if variant.adapter is not None:
            _check_adapter(path, model, name, variant.adapter, catalog)
    indexes = {name: _index(path, name, v.retrieval) for name, v in model.variants.items() if v.retrieval}
    return _route(model, defaults, indexes)


def _index(path: Path, variant: str, spec: RetrievalModel) -> Retrieval:
    try:
        return Retrieval(Index.from_directory(Path(spec.documents)), spec.top_k)
    except ConfigError as err:
        raise ConfigError(f"{path}: variants.{variant}.retrieval: {err.message}") from None


def _check_adapter(path: Path, policy: PolicyModel, variant: str, ref: str, catalog: Catalog) -> None:
    version = catalog.get(ref)
    where = f"{path}: variants.{variant}.adapter"
    if version is None:
        raise ConfigError(f"{where}: {ref} is not in the adapter catalog")
    if version.problem is not None or version.lineage is None:
        raise ConfigError(f"{where}: {ref} cannot be used: {version.problem}")
    spec = policy.variants[variant]
    candidate = policy.canary is not None and policy.canary.candidate == variant
    if spec.weight > 0 or variant in policy.fallback or candidate:  # it would take traffic: the gate applies
        problem = release_gate(_gate(policy.release), version.lineage)
        if problem:
            raise ConfigError(f"{where}: {ref} does not pass the route's release gate: {problem}")


def _gate(model: ReleaseModel) -> ReleaseGate:
    return ReleaseGate(model.max_invalid_call_rate, model.min_eval_n, model.require_approvers)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "policy"
    return f"{where}: {err['msg']}"


def _route(model: PolicyModel, defaults: Timeouts, indexes: Mapping[str, Retrieval]) -> Route:
    variants = tuple(
        Variant(
            name=name,
            model=v.model or v.adapter or "",  # an adapter is served under its ref as the engine's model name
            adapter=v.adapter,
            retrieval=indexes.get(name),
            engine=v.engine,
            weight=v.weight,
            system_prompt=v.system_prompt,
            price=Price(v.price.input_per_mtok, v.price.output_per_mtok, v.price.currency)
            if v.price
            else None,
        )
        for name, v in model.variants.items()
    )
    t = model.timeouts
    timeouts = Timeouts(
        connect=t.connect or defaults.connect,
        first_byte=t.first_byte or defaults.first_byte,
        total=t.total or defaults.total,
    )
    return Route(
        name=model.route,
        variants=variants,
        fallback=tuple(model.fallback),
        sticky=parse_sticky(model.sticky),
        tool_calls=model.tool_calls,
        timeouts=timeouts,
        salt=model.salt if model.salt is not None else model.route,
        release=_gate(model.release),
        canary=canary_spec(model.canary) if model.canary is not None else None,
        shadow=_shadow(model.shadow) if model.shadow is not None else None,
    )


def _shadow(model: ShadowModel) -> ShadowSpec:
    return ShadowSpec(
        variant=model.variant,
        share=float(model.share),
        max_in_flight=model.max_in_flight,
        max_cost_per_hour=model.max_cost_per_hour,
        stream=model.stream,
    )
