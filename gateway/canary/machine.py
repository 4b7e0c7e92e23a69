"""A canary's life: its state, the transitions a look or an operator makes, and the routing each state implies.
Pure: no I/O, no clock (`now` is passed in).

States: `shadow` (with `shadow_requests`, before the first step: the candidate serves nobody and answers copies;
a pass on the pairs moves it to the first step with fresh evidence, a fail kills it, whatever `on_fail` says: it
must end, and nobody was exposed to it), `running` (looks may advance, promote or fail it), `paused` (an operator
stopped the advance; guardrails still fail it, safety first), `held` (a guardrail failed with `on_fail = "hold"`:
the candidate keeps its share and nothing moves until an operator acts), and the final `killed`, `aborted`,
`promoted`. Passing the step before 100 % is the promotion. Resuming a held canary restarts its evidence (the
sequential tests start again from zero: the old evidence already crossed its bound). A canary in its shadow phase
may be promoted or aborted, not paused (it serves nobody, and it advances only on a pass). A canary is identified by
`canary_key`: the route, the candidate's and the baseline's served models, and the steps; a new candidate version
(or other steps) starts a new canary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, Literal

from gateway.canary.analysis import Look
from gateway.canary.spec import CanarySpec
from gateway.policy import PolicySnapshot, Route

Status = Literal["shadow", "running", "paused", "held", "killed", "aborted", "promoted"]
Operation = Literal["pause", "resume", "promote", "abort"]
ACTIVE: Final = frozenset({"shadow", "running", "paused"})  # looked at every tick


@dataclass(frozen=True, slots=True)
class CanaryState:
    route: str
    key: str
    status: Status
    step: int  # index into the spec's steps
    step_started_at: float
    epoch: float  # evidence counts from here: the canary's start, or the last resume of a held canary
    started_at: float
    revision: int = (
        0  # bumped by every transition: the compare-and-set that makes several processes decide once
    )


@dataclass(frozen=True, slots=True)
class Transition:
    state: CanaryState
    action: str  # the audit action: canary_advance | canary_promote | canary_kill | canary_hold | canary_<operation>
    reason: str
    kill: bool = False  # also flip the candidate's kill switch


def canary_key(route: Route) -> str:
    spec = route.canary
    if spec is None:
        return ""
    candidate, baseline = route.variant(spec.candidate), route.variant(spec.baseline)
    steps = ",".join(f"{s:g}" for s in spec.steps)
    models = (candidate.model if candidate else "", baseline.model if baseline else "")
    parts = (route.name, spec.candidate, models[0], spec.baseline, models[1], steps)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def initial(
    route: str, key: str, now: float, spec: CanarySpec | None = None, revision: int = 0
) -> CanaryState:
    """A new canary: in its shadow phase when `spec` has one, else at its first step."""
    status: Status = "shadow" if spec is not None and spec.shadow_requests is not None else "running"
    return CanaryState(route, key, status, 0, now, now, now, revision)


def after_look(spec: CanarySpec, state: CanaryState, look: Look, now: float) -> Transition | None:
    """The transition a look makes, if any: fail → on_fail; pass while running → next step or promotion. In the
    shadow phase: fail → killed; pass → the first step."""
    if state.status == "shadow":
        return _after_shadow(spec, state, look, now)
    where = f"step {state.step + 1}/{len(spec.steps)} ({spec.steps[state.step]:g} %)"
    failed = look.failed
    if failed is not None:
        reason = f"{failed.guardrail}: {_compared(failed.statistic, failed.bound)} at {where}"
        if spec.on_fail == "kill":
            return Transition(_moved(state, status="killed"), "canary_kill", reason, kill=True)
        return Transition(_moved(state, status="held"), "canary_hold", reason)
    if look.outcome != "pass" or state.status != "running":
        return None
    if spec.is_last(state.step):
        moved = _moved(state, status="promoted", step=len(spec.steps) - 1, step_started_at=now)
        return Transition(moved, "canary_promote", f"{where} passed: promoted to 100 %")
    moved = _moved(state, step=state.step + 1, step_started_at=now)
    return Transition(moved, "canary_advance", f"{where} passed: now {spec.steps[state.step + 1]:g} %")


def _after_shadow(spec: CanarySpec, state: CanaryState, look: Look, now: float) -> Transition | None:
    pairs = f"{look.pairs or 0}/{spec.shadow_requests} pairs"
    failed = look.failed
    if failed is not None:
        served = (
            "no user was served by the candidate"
            if look.candidate_requests == 0
            else f"{look.candidate_requests} requests were routed to the candidate"
        )
        compared = _compared(failed.statistic, failed.bound)
        reason = f"{failed.guardrail}: {compared} in the shadow phase ({pairs}): {served}"
        return Transition(_moved(state, status="killed"), "canary_kill", reason, kill=True)
    if look.outcome != "pass":
        return None
    moved = _moved(state, status="running", step=0, step_started_at=now, epoch=now)
    return Transition(moved, "canary_advance", f"shadow phase passed ({pairs}): now {spec.steps[0]:g} %")


def _compared(statistic: float, bound: float) -> str:
    return f"{statistic:.4g} ≥ {bound:.4g}"


_ALLOWED: Final[Mapping[Operation, frozenset[str]]] = {
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused", "held"}),
    "promote": frozenset({"shadow", "running", "paused", "held"}),
    "abort": frozenset({"shadow", "running", "paused", "held", "promoted"}),
}


def operations(status: str) -> tuple[Operation, ...]:
    """The operators' transitions that apply to a canary in `status`."""
    return tuple(op for op, allowed in _ALLOWED.items() if status in allowed)


def operate(spec: CanarySpec, state: CanaryState, op: Operation, now: float, reason: str) -> Transition:
    """An operator's transition; ValueError when `op` does not apply to the state (the API answers 409)."""
    if state.status not in _ALLOWED[op]:
        raise ValueError(f"cannot {op} a canary that is {state.status}")
    if op == "pause":
        moved = _moved(state, status="paused")
    elif op == "resume" and state.status == "held":
        moved = _moved(state, status="running", step_started_at=now, epoch=now)
    elif op == "resume":
        moved = _moved(state, status="running")
    elif op == "promote":
        moved = _moved(state, status="promoted", step=len(spec.steps) - 1, step_started_at=now)
    else:
        moved = _moved(state, status="aborted")
    return Transition(moved, f"canary_{op}", reason)


def _moved(state: CanaryState, **changes: object) -> CanaryState:
    return replace(state, revision=state.revision + 1, **changes)  # type: ignore[arg-type]


def weights(spec: CanarySpec, state: CanaryState) -> tuple[float, float]:
    """(candidate, baseline) weights for the state, out of 100."""
    if state.status == "promoted":
        return 100.0, 0.0
    if state.status in ("killed", "aborted", "shadow"):
        return 0.0, 100.0
    share = spec.steps[state.step]
    return share, 100.0 - share


def with_canaries(
    policy: PolicySnapshot, states: Mapping[str, CanaryState], now: float = 0.0
) -> PolicySnapshot:
    """The policy with every canary's weights (and, once promoted, its fallback) as its state says; a route whose
    state is missing or belongs to another canary (another key) is at its start (`initial`). A canary with a shadow
    phase keeps the route's `[shadow]` of its candidate only during the phase: afterwards the candidate serves a
    share itself (or nobody, once it is ended), and copies to it would be load for nothing."""
    routes = dict(policy.routes)
    changed = False
    for name, route in policy.routes.items():
        if route.canary is None:
            continue
        state = state_for(route, states, now)
        routes[name] = _apply(route, route.canary, state)
        changed = True
    if not changed:
        return policy
    return PolicySnapshot(MappingProxyType(routes), policy.version, policy.sources)


def state_for(route: Route, states: Mapping[str, CanaryState], now: float) -> CanaryState:
    key = canary_key(route)
    state = states.get(route.name)
    if state is not None and state.key == key:
        return state
    return initial(route.name, key, now, route.canary)


def _apply(route: Route, spec: CanarySpec, state: CanaryState) -> Route:
    cand, base = weights(spec, state)
    named = {spec.candidate: cand, spec.baseline: base}
    variants = tuple(replace(v, weight=named.get(v.name, 0.0)) for v in route.variants)
    fallback = route.fallback
    if state.status == "promoted":
        fallback = (spec.baseline, *(f for f in route.fallback if f != spec.baseline))
    shadow = route.shadow
    if (
        spec.shadow_requests is not None
        and state.status != "shadow"
        and shadow
        and shadow.variant == spec.candidate
    ):
        shadow = None
    return replace(route, variants=variants, fallback=fallback, shadow=shadow)
