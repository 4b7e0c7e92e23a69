"""The `[canary]` table of a route's policy file: strict pydantic models, the checks against the route, and the
conversion into a frozen `CanarySpec`. Loaded by `control.policies`; everything here is validation, no I/O.

Checks beyond the field types: steps strictly increase, lie in (0, 100] and end at 100, with at least one step
below 100; candidate and baseline are two different variants of the route; no other variant has a weight (so the
candidate's share is exactly the step); the candidate is not a fallback (a fallback must be trusted); `unit =
"user"` needs a sticky key; a cost guardrail needs both variants priced in one currency; at least one guardrail;
`shadow_requests` needs the route's `[shadow]` to name the candidate with a share above 0 (the shadow phase's pairs
are its copies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.canary.spec import CanarySpec, Guardrails, RateGuardrail, RatioGuardrail

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateGuardrailModel(_Strict):
    alpha: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.05


class RatioGuardrailModel(_Strict):
    # A tolerance below 1 would fail a candidate identical to its baseline half the time.
    max_ratio: Annotated[float, Field(ge=1, allow_inf_nan=False)]
    min_samples: Annotated[int, Field(ge=1)] = 100


class GuardrailsModel(_Strict):
    invalid_call_rate: RateGuardrailModel | None = None
    error_rate: RateGuardrailModel | None = None
    latency_per_output_token: RatioGuardrailModel | None = None
    cost_per_request: RatioGuardrailModel | None = None


class CanaryModel(_Strict):
    candidate: Annotated[str, Field(pattern=_NAME)]
    baseline: Annotated[str, Field(pattern=_NAME)]
    steps: Annotated[list[Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]], Field(min_length=2)]
    min_requests_per_step: Annotated[int, Field(ge=1)] = 400
    min_minutes_per_step: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    unit: Literal["request", "user"] = "request"
    on_fail: Literal["kill", "hold"] = "kill"
    guardrails: GuardrailsModel = GuardrailsModel()
    shadow_requests: Annotated[int, Field(strict=True, ge=1)] | None = None

    @model_validator(mode="after")
    def _check(self) -> CanaryModel:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"steps must increase strictly, got {self.steps}")
        if self.steps[-1] != 100:
            raise ValueError(f"steps must end at 100 (the promotion), got {self.steps}")
        if self.candidate == self.baseline:
            raise ValueError("candidate and baseline must be two different variants")
        if not any(g is not None for g in self.guardrails.__dict__.values()):
            raise ValueError("a canary needs at least one guardrail in [canary.guardrails]")
        return self


class _VariantLike(Protocol):
    @property
    def weight(self) -> float: ...
    @property
    def price(self) -> Any: ...


class _ShadowLike(Protocol):
    @property
    def variant(self) -> str: ...
    @property
    def share(self) -> float: ...


def check_canary(
    canary: CanaryModel,
    variants: Mapping[str, _VariantLike],
    fallback: list[str],
    sticky: str,
    shadow: _ShadowLike | None = None,
) -> None:
    """Cross-checks against the route; raises ValueError naming the field."""
    for role in ("candidate", "baseline"):
        name = getattr(canary, role)
        if name not in variants:
            raise ValueError(f"canary.{role}: {name!r} is not a variant of this route")
    others = sorted(
        n for n, v in variants.items() if v.weight > 0 and n not in (canary.candidate, canary.baseline)
    )
    if others:
        raise ValueError(
            f"canary: variants {others} have a weight; while a canary runs only its candidate and baseline take "
            "traffic (set their weight to 0)"
        )
    if canary.candidate in fallback:
        raise ValueError(f"canary.candidate: {canary.candidate!r} cannot also be a fallback of the route")
    if canary.unit == "user" and sticky == "none":
        raise ValueError(
            "canary.unit: 'user' needs a sticky key (sticky = 'header:<name>' or 'body:<field>')"
        )
    if canary.guardrails.cost_per_request is not None:
        prices = [variants[canary.candidate].price, variants[canary.baseline].price]
        if any(p is None for p in prices) or prices[0].currency != prices[1].currency:
            raise ValueError(
                "canary.guardrails.cost_per_request: candidate and baseline need a price in the same currency"
            )
    if canary.shadow_requests is not None:
        _check_shadow_phase(canary.candidate, shadow)


def _check_shadow_phase(candidate: str, shadow: _ShadowLike | None) -> None:
    if shadow is None or shadow.variant != candidate:
        raise ValueError(
            f"canary.shadow_requests: the shadow phase pairs copies answered by the candidate: add a [shadow] "
            f"table with variant = {candidate!r}"
        )
    if shadow.share <= 0:
        raise ValueError(
            "canary.shadow_requests: the route's [shadow] share is 0, so no copy would ever be paired"
        )


def canary_spec(model: CanaryModel) -> CanarySpec:
    g = model.guardrails
    return CanarySpec(
        candidate=model.candidate,
        baseline=model.baseline,
        steps=tuple(float(s) for s in model.steps),
        min_requests_per_step=model.min_requests_per_step,
        min_minutes_per_step=model.min_minutes_per_step,
        unit=model.unit,
        on_fail=model.on_fail,
        guardrails=Guardrails(
            invalid_call_rate=_rate(g.invalid_call_rate),
            error_rate=_rate(g.error_rate),
            latency_per_output_token=_ratio(g.latency_per_output_token),
            cost_per_request=_ratio(g.cost_per_request),
        ),
        shadow_requests=model.shadow_requests,
    )


def _rate(model: RateGuardrailModel | None) -> RateGuardrail | None:
    return None if model is None else RateGuardrail(model.alpha)


def _ratio(model: RatioGuardrailModel | None) -> RatioGuardrail | None:
    return None if model is None else RatioGuardrail(model.max_ratio, model.min_samples)
