"""Operators' runtime overrides of a route's `[shadow]` (`gateway shadow start|stop|clear`), and how they apply.
Pure: no I/O.

An override lives in the state database (one row per route), never in the policy files, and is applied on top of
what the files (with pins and canaries) declare each time the live view is composed: a reload keeps it, and
clearing it gives the policy file's `[shadow]` (or none) back.

- `start ROUTE VARIANT [share]`: the route copies `share` percent of its requests to VARIANT, in place of any
  `[shadow]` the policy declares. Without a share: the policy's when its `[shadow]` names that variant, else 100.
  The limits (`max_in_flight`, `max_cost_per_hour`, `stream`) are the policy's `[shadow]`'s when it has one, else
  the defaults (8, no budget, `as_sent`).
- `stop ROUTE VARIANT`: no copies for the route, whatever its policy declares, until cleared. VARIANT must be the
  shadow variant in force when the stop is asked for (the policy's or a started one): an operator stops what they
  see, and a typo never stops something else. The stop is the route's, so a reload that names another shadow
  variant stays stopped.
- `clear ROUTE`: the override goes; the policy's `[shadow]`, or none, applies again.

An override that no longer fits the policy (after a reload: its route is gone, a started variant is gone, or the
route's budget needs a price the started variant no longer has) is *stale*: it is not applied, nothing of it half
applies, and `problem` says why, for the status to show.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

from gateway.errors import BadRequest, Conflict, NotFound
from gateway.policy import PolicySnapshot, Route, ShadowSpec

Mode = Literal["start", "stop"]
DEFAULT_SHARE = 100.0  # a start without a share, on a variant the policy does not shadow


@dataclass(frozen=True, slots=True)
class ShadowOverride:
    """One route's override: who set it, when (the transaction's time) and why, as the audit log has it too."""

    route: str
    mode: Mode
    variant: str  # start: the variant copied to; stop: the shadow variant that was in force
    share: float | None = None  # start: percent; None: the policy's share if it shadows `variant`, else 100
    actor: str = ""
    reason: str = ""
    at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


def shadow_of(route: Route, override: ShadowOverride) -> ShadowSpec | None:
    """The route's shadow under `override` (None: stopped); the override must not be stale."""
    if override.mode == "stop":
        return None
    declared = route.shadow
    if declared is None:
        return ShadowSpec(override.variant, DEFAULT_SHARE if override.share is None else override.share)
    share = override.share
    if share is None:
        share = declared.share if declared.variant == override.variant else DEFAULT_SHARE
    return replace(declared, variant=override.variant, share=share)


def problem(route: Route | None, override: ShadowOverride) -> str | None:
    """Why `override` cannot apply to the policy's `route` (None: the route is gone), or None when it can."""
    if route is None:
        return f"the policy has no route {override.route!r}"
    if override.mode == "stop":
        return None
    variant = route.variant(override.variant)
    if variant is None:
        return f"{override.variant!r} is no longer a variant of {route.name!r}"
    budget = route.shadow.max_cost_per_hour if route.shadow else None
    if budget is not None and variant.price is None:
        return f"{override.variant!r} has no price, so the route's shadow budget ({budget:g}/h) cannot be counted"
    return None


def with_shadow_overrides(policy: PolicySnapshot, overrides: Mapping[str, ShadowOverride]) -> PolicySnapshot:
    """The policy with every override that is not stale applied to its route's `[shadow]`; the version stays the
    files' (an override changes what is copied, never what is served)."""
    routes = dict(policy.routes)
    applied = False
    for name, override in overrides.items():
        route = policy.routes.get(name)
        if route is not None and problem(route, override) is None:
            routes[name] = replace(route, shadow=shadow_of(route, override))
            applied = True
    if not applied:
        return policy
    return PolicySnapshot(MappingProxyType(routes), policy.version, policy.sources)


# -- checks before an override is written ----------------------------------------------------------------------


def check_start(declared: PolicySnapshot, route: str, variant: str, share: float | None) -> None:
    """`declared`: the policy before the overrides, which a start replaces (and is checked against)."""
    r = _route(declared, route)
    if r.variant(variant) is None:
        raise NotFound(f"Route {route!r} has no variant {variant!r}.", param="variant")
    if share is not None and not 0 < share <= 100:
        raise BadRequest(
            "'share' must be more than 0 and at most 100 (percent).", param="share", code="invalid_value"
        )
    stale = problem(r, ShadowOverride(route, "start", variant, share))
    if stale is not None:
        raise Conflict(f"Cannot shadow {route}/{variant}: {stale}.", code="shadow_unpriced")


def check_stop(
    live: PolicySnapshot, overrides: Mapping[str, ShadowOverride], route: str, variant: str
) -> None:
    """`live`: the policy with the overrides applied, whose shadow in force `variant` must name."""
    r = _route(live, route)
    if r.variant(variant) is None:
        raise NotFound(f"Route {route!r} has no variant {variant!r}.", param="variant")
    if r.shadow is None:
        held = overrides.get(route)
        why = f"stopped by {held.actor}: {held.reason}" if held and held.mode == "stop" else "none declared"
        raise Conflict(f"Route {route!r} has no shadow in force ({why}): nothing to stop.", code="no_shadow")
    if r.shadow.variant != variant:
        raise Conflict(
            f"The shadow in force on {route!r} is {r.shadow.variant!r}, not {variant!r}: nothing was stopped.",
            param="variant",
            code="shadow_mismatch",
        )


def check_clear(
    declared: PolicySnapshot, overrides: Mapping[str, ShadowOverride], route: str
) -> ShadowOverride:
    """The override to clear (a stale one too, even of a route the policy no longer has)."""
    held = overrides.get(route)
    if held is not None:
        return held
    _route(declared, route)
    raise Conflict(f"Route {route!r} has no shadow override: nothing to clear.", code="no_override")


def _route(policy: PolicySnapshot, name: str) -> Route:
    route = policy.routes.get(name)
    if route is None:
        raise NotFound(f"No route {name!r}.", param="route")
    return route


def status(route: Route | None, override: ShadowOverride) -> dict[str, Any]:
    """An override as the admin API shows it: its row, and whether it is stale (and why) against the policy's
    `route` before the overrides."""
    stale = problem(route, override)
    return {**override.as_dict(), "stale": stale is not None, "problem": stale}
