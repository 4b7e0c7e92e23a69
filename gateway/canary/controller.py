"""The canary controller: inside every gateway process (a lifespan task, every `canary_interval_s`) it reads each
declared canary's records from the shared request log, looks at them (`canary.analysis.look`) and writes what the
look decides (`canary.machine.after_look`) through the state store, whose compare-and-set lets exactly one process make
each decision. It also carries out the operators' actions and answers their status requests.

Reading: one `_Feed` per canary holds its evidence and the last rowid read, so a tick reads only new rows
(`request_log.Tail`: rowids follow commit order, so nothing is skipped whichever process wrote them). When the
canary's key, epoch, step or phase changes (here or in another process), the feed is rebuilt from the log: every
process decides on all the records of the step, whoever wrote them. In a served step the evidence counts requests
per arm (`canary.analysis`); in the shadow phase it pairs the candidate's copies with the requests they copied
(`canary.paired`). The blocking work runs in a thread; the caller publishes the returned `Update` to the live view
on the event loop (the kill then applies to the next request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from gateway.canary import paired
from gateway.canary.analysis import Evidence, Look, describe, look, observation
from gateway.canary.machine import (
    ACTIVE,
    CanaryState,
    Operation,
    Transition,
    after_look,
    canary_key,
    initial,
    operate,
)
from gateway.canary.spec import CanarySpec
from gateway.control.live import LiveView
from gateway.errors import Conflict, NotFound
from gateway.policy import Route, Switches
from gateway.records import Record
from gateway.store.api import Entry, StateStore
from gateway.store.request_log import Tail, Where

_FIELDS: Final = [
    "ts",
    "request_id",
    "primary_id",  # the shadow phase pairs a copy with the request it copied
    "variant",
    "fallback_from",
    "fallback_reason",
    "outcome",
    "tool_verdict",
    "share",
    "e2e_s",
    "output_tokens",
    "cost",
    "forced",
    "bucket",
    "shadow",  # a served step leaves shadow copies out (`analysis.observation`); the shadow phase pairs them
]
ACTOR: Final = "canary"  # the actor of automatic decisions in the audit log


class _Served:
    """A served step's evidence: each request counts for the arm the policy routed it to."""

    def __init__(self, spec: CanarySpec, state: CanaryState) -> None:
        self.spec = spec
        self.evidence = Evidence(spec, step_start=state.step_started_at)

    def add(self, record: Record) -> None:
        obs = observation(self.spec, record)
        if obs is not None:
            self.evidence.add(obs)

    def look(self, state: CanaryState, now: float) -> Look:
        return look(self.spec, self.evidence, state.step, now)

    def describe(self, seen: Look) -> dict[str, Any]:
        return describe(self.spec, self.evidence, seen)


class _Shadow:
    """The shadow phase's evidence: the candidate's copies paired with the requests they copied."""

    def __init__(self, spec: CanarySpec, route: Route) -> None:
        self.spec = spec
        # A copy and its request commit within a request's lifetime of each other: wait twice that for the other.
        self.evidence = paired.PairedEvidence(
            spec, max_wait_s=max(paired.MAX_WAIT_S, 2 * route.timeouts.total)
        )

    def add(self, record: Record) -> None:
        self.evidence.add(record)

    def look(self, state: CanaryState, now: float) -> Look:
        return paired.look(self.spec, self.evidence, state.epoch, now)

    def describe(self, seen: Look) -> dict[str, Any]:
        return paired.describe(self.spec, self.evidence, seen)


@dataclass(slots=True)
class _Feed:
    key: str
    epoch: float
    step_started_at: float
    status: str
    spec: CanarySpec
    phase: _Served | _Shadow
    last_rowid: int = 0

    @classmethod
    def new(cls, route: Route, spec: CanarySpec, state: CanaryState) -> _Feed:
        phase = _Shadow(spec, route) if state.status == "shadow" else _Served(spec, state)
        return cls(state.key, state.epoch, state.step_started_at, state.status, spec, phase)

    def same(self, spec: CanarySpec, state: CanaryState) -> bool:
        """Whether this feed is still the evidence of `state` (else it is rebuilt from the log)."""
        mine = (self.key, self.epoch, self.step_started_at, self.status == "shadow", self.spec)
        return mine == (state.key, state.epoch, state.step_started_at, state.status == "shadow", spec)


@dataclass(frozen=True, slots=True)
class Update:
    """What a tick changed, for the live view: the canaries' states, and the switches when it killed."""

    states: dict[str, CanaryState]
    switches: Switches | None


class CanaryController:
    def __init__(
        self,
        state: StateStore,
        live: LiveView,
        records: Where,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = state
        self._live = live
        self._clock = clock
        self._feeds: dict[str, _Feed] = {}
        self._tail = Tail(records, _FIELDS)
        self._lock = threading.Lock()  # ticks and operators' calls run in worker threads

    def close(self) -> None:
        with self._lock:
            self._tail.close()

    def tick(self) -> Update:
        """One look at every canary of the live policy (blocking: run it in a thread)."""
        with self._lock:
            now = self._clock()
            policy = self._live.view.policy
            states = self._store.canary_states()
            killed = False
            for name, route in policy.routes.items():
                if route.canary is not None:
                    killed |= self._look(route, route.canary, states.get(name), now, policy.version)
            return Update(self._store.canary_states(), self._store.switches() if killed else None)

    def _look(
        self, route: Route, spec: CanarySpec, state: CanaryState | None, now: float, version: str
    ) -> bool:
        """Look at one canary and write its transition; True when this process wrote a kill."""
        key = canary_key(route)
        if state is None or state.key != key:
            self._start(route, spec, key, state, now, version)
            return False
        if state.status not in ACTIVE:
            self._feeds.pop(route.name, None)
            return False
        feed = self._feed(route, spec, state)
        seen = feed.phase.look(state, now)
        move = after_look(spec, state, seen, now)
        if move is None:
            return False
        detail = {**feed.phase.describe(seen), "from": _brief(state), "to": _brief(move.state)}
        entry = _entry(move, route.name, spec.candidate, ACTOR, detail, version)
        return self._store.move_canary(state, move, spec.candidate, entry) and move.kill

    def _start(
        self, route: Route, spec: CanarySpec, key: str, previous: CanaryState | None, now: float, version: str
    ) -> None:
        new = initial(route.name, key, now, spec, previous.revision + 1 if previous is not None else 0)
        detail = {
            "candidate": spec.candidate,
            "baseline": spec.baseline,
            "steps": list(spec.steps),
            "unit": spec.unit,
            "on_fail": spec.on_fail,
            "shadow_requests": spec.shadow_requests,
            "replaces": previous.key if previous is not None else None,
        }
        entry = Entry(
            "canary_start",
            ACTOR,
            route=route.name,
            variant=spec.candidate,
            reason=f"canary {key} started",
            policy_version=version,
            detail=detail,
        )
        self._store.start_canary(new, previous, entry)

    def _feed(self, route: Route, spec: CanarySpec, state: CanaryState) -> _Feed:
        feed = self._feeds.get(route.name)
        if feed is None or not feed.same(spec, state):
            feed = self._feeds[route.name] = _Feed.new(route, spec, state)
        _read_into(self._tail, route.name, feed)
        return feed

    # -- operators ----------------------------------------------------------------------------------------------

    def operate(self, route_name: str, op: Operation, *, actor: str, reason: str) -> Update:
        """pause / resume / promote / abort, audited; NotFound without a canary, Conflict when it does not apply."""
        with self._lock:
            route, spec = self._declared(route_name)
            version = self._live.view.policy.version
            for _ in range(5):  # another process may move the canary between the read and the write
                now = self._clock()
                state = self._current(route, spec, now, version)
                try:
                    move = operate(spec, state, op, now, reason)
                except ValueError as err:
                    raise Conflict(f"Route {route_name!r}: {err}.", code="canary_state") from None
                detail = {"operation": op, "from": _brief(state), "to": _brief(move.state)}
                entry = _entry(move, route_name, spec.candidate, actor, detail, version)
                if self._store.move_canary(state, move, spec.candidate, entry):
                    return Update(self._store.canary_states(), None)
            raise Conflict(f"Route {route_name!r}: the canary kept changing; try again.", code="canary_busy")

    def _declared(self, route_name: str) -> tuple[Route, CanarySpec]:
        route = self._live.view.policy.routes.get(route_name)
        if route is None:
            raise NotFound(f"No route {route_name!r}.")
        if route.canary is None:
            raise NotFound(f"Route {route_name!r} has no [canary] in its policy.", code="no_canary")
        return route, route.canary

    def _current(self, route: Route, spec: CanarySpec, now: float, version: str) -> CanaryState:
        state = self._store.canary_states().get(route.name)
        if state is None or state.key != canary_key(route):
            self._start(route, spec, canary_key(route), state, now, version)
            state = self._store.canary_states()[route.name]
        return state

    def status(self, route_name: str | None = None) -> dict[str, Any]:
        """Every canary (or one): its spec, state, shares and, while it is active, the current look."""
        with self._lock:
            policy = self._live.view.policy
            names = [route_name] if route_name is not None else sorted(policy.routes)
            out: dict[str, Any] = {}
            for name in names:
                if route_name is not None:
                    self._declared(name)
                route = policy.routes[name]
                if route.canary is not None:
                    out[name] = self._describe(route, route.canary)
            return out

    def _describe(self, route: Route, spec: CanarySpec) -> dict[str, Any]:
        now = self._clock()
        state = self._store.canary_states().get(route.name)
        if state is not None and state.key != canary_key(route):
            state = None  # an older canary's row: this one starts at the next tick
        body: dict[str, Any] = {
            "candidate": spec.candidate,
            "baseline": spec.baseline,
            "steps": list(spec.steps),
            "unit": spec.unit,
            "on_fail": spec.on_fail,
            "shadow_requests": spec.shadow_requests,
            "key": canary_key(route),
            "state": _brief(state) if state else None,
            "weights": {v.name: v.weight for v in route.variants},
        }
        if state is not None and state.status in ACTIVE:
            phase = self._feed(route, spec, state).phase
            body["look"] = phase.describe(phase.look(state, now))
        return body


def _read_into(tail: Tail, route: str, feed: _Feed) -> None:
    for rowid, record in tail.after(route, feed.epoch, feed.last_rowid):
        feed.last_rowid = rowid
        feed.phase.add(record)


def _entry(
    move: Transition, route: str, candidate: str, actor: str, detail: dict[str, Any], version: str
) -> Entry:
    return Entry(
        move.action,
        actor,
        route=route,
        variant=candidate,
        reason=move.reason,
        policy_version=version,
        detail=detail,
    )


def current_look(
    records: Where, route: Route, spec: CanarySpec, state: CanaryState, now: float
) -> dict[str, Any]:
    """The look at an active canary's step (or shadow phase) in progress, from the request log alone (read-only, no
    gateway needed): the same numbers a gateway process would decide on now (`gateway report` shows them)."""
    feed = _Feed.new(route, spec, state)
    tail = Tail(records, _FIELDS)
    try:
        _read_into(tail, route.name, feed)
    finally:
        tail.close()
    return feed.phase.describe(feed.phase.look(state, now))


def _brief(state: CanaryState) -> dict[str, Any]:
    return {
        "status": state.status,
        "step": state.step,
        "step_started_at": state.step_started_at,
        "epoch": state.epoch,
        "started_at": state.started_at,
        "revision": state.revision,
    }
