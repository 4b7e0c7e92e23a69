"""Routes, variants and the traffic decision: which variant serves a request. Pure: no I/O, no clock, no RNG.

A `PolicySnapshot` is the immutable, fully validated set of routes (built by `control.policies`). `Switches` is the
immutable set of kill switches in force (kept by `store`). `build_view` combines both into a `View` holding one
precomputed `Plan` per route, so the per-request work is a hash and a bisect.

Slices: a route's variants take contiguous slices of [0, 1) in declaration order, each as wide as its share of the
total weight. A sticky key's bucket (`bucket(key, salt)`) always falls in the same slice while the weights stand;
raising a variant's weight only widens its slice, so the users it had stay with it (with two variants, the only
users who move are the ones moving into it). A killed variant's slice is served by the route's first live fallback,
so killing and reviving never reshuffles anyone else.

Shadow copies: a route's `[shadow]` (`ShadowSpec`) names a variant that answers copies of a share of the route's
requests, never returned to anyone. `ShadowPlan.decide` is the per-request choice, from a draw of its own (never the
routing draw, so sticky buckets and the split are untouched): copy, no copy, or no copy because the kill switches
take the shadow variant out (the copy is then counted as dropped). The copy itself is `shadow.copies`'.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal, Protocol

from gateway.canary.spec import CanarySpec
from gateway.errors import NoLiveVariant, NotFound
from gateway.pricing import Price

ToolMode = Literal["observe", "annotate", "enforce"]
_TWO_64 = float(2**64)


@dataclass(frozen=True, slots=True)
class Sticky:
    """Where the sticky key comes from: a request header (lower-cased name) or a top-level body field."""

    source: Literal["header", "body", "none"] = "none"
    name: str = ""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    first_byte: float
    total: float


class Retriever(Protocol):
    """Retrieval-augmented prompting: the context text for a request's messages (see `retrieval.Retrieval`)."""

    def context_for(self, messages: list[dict[str, Any]]) -> str: ...


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    model: str  # the engine's served model name (a base model or a loaded adapter)
    engine: str
    weight: float
    system_prompt: str | None = None
    price: Price | None = None
    adapter: str | None = None  # "name@version" when the model is a LoRA adapter
    retrieval: Retriever | None = None  # fills `{context}` in the system prompt


@dataclass(frozen=True, slots=True)
class ReleaseGate:
    """What an adapter version's lineage must show before it may take traffic on a route."""

    max_invalid_call_rate: float | None = None
    min_eval_n: int = 0
    require_approvers: bool = False


ShadowStream = Literal["as_sent", "non_stream"]


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    """A route's `[shadow]`: `variant` answers copies of `share` percent of the route's requests, at most
    `max_in_flight` at once per process, within `max_cost_per_hour` (the variant's price currency; None: no budget).
    `stream`: a streamed request is copied as a stream (`as_sent`) or as a non-stream request."""

    variant: str
    share: float  # percent, 0..100
    max_in_flight: int = 8
    max_cost_per_hour: float | None = None
    stream: ShadowStream = "as_sent"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    variants: tuple[Variant, ...]
    fallback: tuple[str, ...] = ()
    sticky: Sticky = Sticky()
    tool_calls: ToolMode = "observe"
    timeouts: Timeouts = Timeouts(2.0, 60.0, 300.0)
    salt: str = ""
    release: ReleaseGate = ReleaseGate()
    canary: CanarySpec | None = None  # a candidate ramped through steps (canary_spec.py)
    shadow: ShadowSpec | None = None  # a variant answering copies of the route's requests

    def variant(self, name: str) -> Variant | None:
        for v in self.variants:
            if v.name == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    routes: Mapping[str, Route]
    version: str
    sources: Mapping[str, str] = field(default_factory=dict)  # route -> file it came from


@dataclass(frozen=True, slots=True)
class Switches:
    global_kill: bool = False
    routes: frozenset[str] = frozenset()
    variants: frozenset[tuple[str, str]] = frozenset()  # (route, variant)

    def route_down(self, route: str) -> bool:
        return self.global_kill or route in self.routes

    def variant_killed(self, route: str, variant: str) -> bool:
        return (route, variant) in self.variants


Scope = Literal["global", "route", "variant"]


@dataclass(frozen=True, slots=True)
class Flip:
    """One kill switch turned on (`killed`) or off: every route (global), one route, or one variant of a route."""

    scope: Scope
    killed: bool
    route: str = ""
    variant: str = ""

    @property
    def action(self) -> str:
        verb = "kill" if self.killed else "revive"
        return {"global": f"{verb}_all", "route": f"{verb}_route", "variant": f"{verb}_variant"}[self.scope]


def apply_flip(switches: Switches, flip: Flip) -> Switches:
    """The switches after `flip` (used to check a flip before it is written)."""
    if flip.scope == "global":
        return Switches(flip.killed, switches.routes, switches.variants)
    if flip.scope == "route":
        routes = switches.routes | {flip.route} if flip.killed else switches.routes - {flip.route}
        return Switches(switches.global_kill, routes, switches.variants)
    key = (flip.route, flip.variant)
    variants = switches.variants | {key} if flip.killed else switches.variants - {key}
    return Switches(switches.global_kill, switches.routes, variants)


@dataclass(frozen=True, slots=True)
class Decision:
    variant: Variant
    share: float  # the variant's effective share of the route's traffic when it was chosen


ShadowAction = Literal["copy", "killed"]


@dataclass(frozen=True, slots=True)
class ShadowPlan:
    """A route's shadow under one set of switches: the variant (pins applied) and whether a switch has it out."""

    spec: ShadowSpec
    variant: Variant
    killed: bool  # the variant, its route or every route is killed: no copies (each counted as dropped)

    def decide(self, u: float, served: str) -> ShadowAction | None:
        """For a request routed to `served`, with `u` drawn in [0, 1) for this decision alone: copy it, drop the
        copy (`killed`), or None (not drawn, or the shadow variant is the one that serves it: nothing to compare)."""
        if u * 100.0 >= self.spec.share or served == self.spec.variant:
            return None
        return "killed" if self.killed else "copy"


@dataclass(frozen=True, slots=True)
class Plan:
    """The effective routing of one route under one set of switches."""

    route: Route
    bounds: tuple[float, ...]  # upper bound of each slice
    targets: tuple[Variant, ...]  # who serves each slice (a killed variant's slice → its fallback)
    shares: Mapping[str, float]  # effective share per serving variant
    fallback: Variant | None  # the first live fallback variant
    down: bool  # the route is killed (or everything is): all traffic goes to `fallback`
    alive: frozenset[str]  # variants that may serve now (a zero-weight one only when forced or as fallback)
    shadow: ShadowPlan | None = None  # the route's `[shadow]`, if any

    @property
    def live(self) -> bool:
        return bool(self.targets)

    def decide(self, u: float, forced: str | None = None) -> Decision:
        if not self.targets:
            raise NoLiveVariant(
                f"Route {self.route.name!r} has no live variant: it was taken out of traffic."
            )
        if forced is not None:
            return self._forced(forced)
        i = bisect.bisect_right(self.bounds, u)
        target = self.targets[min(i, len(self.targets) - 1)]
        return Decision(target, self.shares[target.name])

    def _forced(self, name: str) -> Decision:
        variant = self.route.variant(name)
        if variant is None:
            raise NotFound(f"Route {self.route.name!r} has no variant {name!r}.", param="x-gateway-variant")
        if not self.serves(name) and self.fallback is not None:
            # A killed variant is never served, forced or not: its traffic goes where its slice goes.
            variant = self.fallback
        elif not self.serves(name):
            raise NoLiveVariant(
                f"Variant {name!r} of route {self.route.name!r} is killed and has no live fallback."
            )
        return Decision(variant, self.shares.get(variant.name, 0.0))

    def serves(self, name: str) -> bool:
        """Whether `name` may serve traffic now (it may still have a zero share)."""
        return name in self.alive

    def fallback_for(self, failed: str) -> Variant | None:
        """Where a request goes when `failed` broke before its first byte."""
        if self.fallback is None or self.fallback.name == failed:
            return None
        return self.fallback


@dataclass(frozen=True, slots=True)
class View:
    """What one request reads, once: the policy and the switches as of one instant, with plans precomputed."""

    policy: PolicySnapshot
    switches: Switches
    plans: Mapping[str, Plan]


def bucket(key: str, salt: str) -> float:
    """A stable position in [0, 1) for a sticky key; the salt (the route's, by default its name) keeps one user's
    buckets independent across routes. blake2b: well mixed, and about 1 µs in C."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


def with_pins(policy: PolicySnapshot, pins: Mapping[tuple[str, str], str]) -> PolicySnapshot:
    """The policy with operator-pinned adapter versions in place of the files' (swap / rollback). The version
    says so: `<files' version>+<hash of the pins>`, so records and audit entries tell the two apart."""
    applied = {key: ref for key, ref in pins.items() if _pinnable(policy, key)}
    if not applied:
        return policy
    routes = {}
    for name, route in policy.routes.items():
        variants = tuple(
            replace(v, model=applied[name, v.name], adapter=applied[name, v.name])
            if (name, v.name) in applied
            else v
            for v in route.variants
        )
        routes[name] = replace(route, variants=variants)
    digest = hashlib.sha256(repr(sorted(applied.items())).encode()).hexdigest()[:8]
    return PolicySnapshot(MappingProxyType(routes), f"{policy.version}+{digest}", policy.sources)


def _pinnable(policy: PolicySnapshot, key: tuple[str, str]) -> bool:
    route = policy.routes.get(key[0])
    variant = route.variant(key[1]) if route else None
    return variant is not None and variant.adapter is not None


def served_adapters(policy: PolicySnapshot) -> dict[tuple[str, str], str]:
    """(route, variant) → the adapter version it serves."""
    return {
        (name, v.name): v.adapter
        for name, route in policy.routes.items()
        for v in route.variants
        if v.adapter
    }


def switches_digest(switches: Switches) -> str:
    """A short, stable name for a set of kill switches: the same on every replica that has the same switches."""
    text = repr((switches.global_kill, sorted(switches.routes), sorted(switches.variants)))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_view(policy: PolicySnapshot, switches: Switches) -> View:
    plans = {name: plan(route, switches) for name, route in policy.routes.items()}
    return View(policy, switches, MappingProxyType(plans))


def plan(route: Route, switches: Switches) -> Plan:
    routing = _routing(route, switches)
    if route.shadow is None:
        return routing
    return replace(routing, shadow=_shadow_plan(route, route.shadow, switches))


def _shadow_plan(route: Route, spec: ShadowSpec, switches: Switches) -> ShadowPlan:
    variant = route.variant(spec.variant)
    if variant is None:  # control.policies refuses such a file; only a route built by hand gets here
        raise ValueError(f"route {route.name!r}: shadow variant {spec.variant!r} is not one of its variants")
    killed = switches.route_down(route.name) or switches.variant_killed(route.name, spec.variant)
    return ShadowPlan(spec, variant, killed)


def _routing(route: Route, switches: Switches) -> Plan:
    fallback = _first_live_fallback(route, switches)
    down = switches.route_down(route.name)
    if down:
        targets = (fallback,) if fallback is not None else ()
        alive = frozenset(t.name for t in targets)
        return _plan(route, [(1.0, t) for t in targets], fallback, down, alive)
    slices: list[tuple[float, Variant]] = []
    for v in route.variants:
        target = fallback if switches.variant_killed(route.name, v.name) else v
        if v.weight > 0 and target is not None:
            slices.append((v.weight, target))
    # Without a live fallback, a killed variant's share is spread over the live ones by weight.
    total = sum(w for w, _ in slices)
    return _plan(route, [(w / total, t) for w, t in slices], fallback, down, _alive_names(route, switches))


def _alive_names(route: Route, switches: Switches) -> frozenset[str]:
    return frozenset(v.name for v in route.variants if not switches.variant_killed(route.name, v.name))


def _plan(
    route: Route,
    slices: list[tuple[float, Variant]],
    fallback: Variant | None,
    down: bool,
    alive: frozenset[str],
) -> Plan:
    if not slices:
        return Plan(route, (), (), MappingProxyType({}), fallback, down, frozenset())
    bounds: list[float] = []
    shares: dict[str, float] = dict.fromkeys(alive, 0.0)
    edge = 0.0
    for width, target in slices:
        edge += width
        bounds.append(edge)
        shares[target.name] = shares.get(target.name, 0.0) + width
    bounds[-1] = 1.0  # absorb rounding so that every u in [0, 1) lands in a slice
    targets = tuple(t for _, t in slices)
    return Plan(route, tuple(bounds), targets, MappingProxyType(shares), fallback, down, alive)


def _first_live_fallback(route: Route, switches: Switches) -> Variant | None:
    for name in route.fallback:
        if not switches.variant_killed(route.name, name):
            return route.variant(name)
    return None


def newly_dark(before: View, after: View) -> list[str]:
    """Routes that had a live variant in `before` and have none in `after` (a kill that needs `force`)."""
    return [
        name
        for name, p in after.plans.items()
        if not p.live and name in before.plans and before.plans[name].live
    ]
