"""`Operations`: the one path for every change to what is served, whoever asks (the admin API, the CLI through it,
the canary controller, later the console): kill and revive, policy reload, adapter swap and rollback, canary
operations and ticks, drills, shadow overrides, console sign-outs, and picking up what another gateway process
changed.

Each change is checked against the live view first (unknown route or variant → `NotFound`; a kill that would
leave a route dark → `Conflict` unless forced; a version that fails the route's release gate → `Conflict`), then
written to the state store in one transaction with its audit entry, and only then published to the live view, so
the next request sees it and no request sees a change that is not on record. A store that refuses the write
gives `audit_failed` and nothing changes. Adapters a change needs are loaded on the engines before it goes live.
Changes in one process are serialised by `lock`, which the adapter reconciler holds too: a version loaded for a
change not yet live must not look unreferenced and be unloaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

from gateway.canary.controller import CanaryController
from gateway.canary.machine import Operation
from gateway.control.adapters import AdapterRejected, Catalog, release_gate
from gateway.control.live import LiveView
from gateway.errors import BadRequest, ConfigError, Conflict, EngineError, NotDurable, NotFound
from gateway.policy import (
    Flip,
    PolicySnapshot,
    View,
    apply_flip,
    build_view,
    newly_dark,
    served_adapters,
    with_pins,
)
from gateway.shadow.overrides import ShadowOverride, check_clear, check_start, check_stop, shadow_of
from gateway.store.api import Entry, StateStore, StoreError

P = ParamSpec("P")
T = TypeVar("T")


class Prepare(Protocol):
    """Loads the adapters a policy references on the engines before it goes live (`LoraManager.ensure`);
    returns the versions it loaded, raises `AdapterRejected` or `EngineError`."""

    async def __call__(self, policy: PolicySnapshot, *, actor: str = ...) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Pinned:
    """What a swap or rollback did: the variant's version before and after, under the policy version now."""

    action: str
    route: str
    variant: str
    previous: str | None
    adapter: str
    policy_version: str


class Operations:
    def __init__(
        self,
        live: LiveView,
        store: StateStore,
        canaries: CanaryController,
        *,
        reload: Callable[[], PolicySnapshot],
        prepare: Prepare,
        catalog: Callable[[], Catalog],
    ) -> None:
        self.live = live
        self.store = store
        self.canaries = canaries
        self._reload = reload  # rescan, load policies/; raises ConfigError (blocking: in a thread)
        self._prepare = prepare
        self._catalog = catalog
        self.lock = asyncio.Lock()

    # -- kill switches -------------------------------------------------------------------------------------

    async def flip(self, flip: Flip, *, actor: str, reason: str, force: bool = False) -> View:
        async with self.lock:
            view = self.live.view
            _check_target(view, flip)
            dark = newly_dark(view, build_view(view.policy, apply_flip(view.switches, flip)))
            if dark and not force:
                raise Conflict(
                    f"This would leave {', '.join(repr(r) for r in dark)} with no live variant; "
                    'send "force": true to do it anyway (their requests then get 503).',
                    code="last_live_variant",
                )
            entry = Entry(
                flip.action,
                actor,
                route=flip.route,
                variant=flip.variant,
                reason=reason,
                policy_version=view.policy.version,
            )
            switches = await _written(self.store.flip, flip, entry)
            return self.live.set_switches(switches)

    # -- policy reload ---------------------------------------------------------------------------------------

    async def reload(self, *, actor: str, reason: str | None) -> tuple[str, View]:
        """Load the policy files again; (the version before, the view now). The old policy stays in force
        when the new one is rejected (its rejection is audited) or its audit entry cannot be written."""
        async with self.lock:
            before = self.live.view.policy.version
            try:
                policy = await asyncio.to_thread(self._reload)
                # New adapter versions are loaded before traffic moves to them (pinned versions stay pinned).
                await self._prepare(with_pins(policy, self.live.pins), actor=actor)
            except (ConfigError, AdapterRejected, EngineError) as err:
                rejected = Entry("reload_rejected", actor, reason=err.message, policy_version=before)
                await _written(self.store.record, rejected)
                raise
            entry = Entry(
                "reload",
                actor,
                reason=reason,
                policy_version=policy.version,
                detail={"previous_version": before, "routes": sorted(policy.routes)},
            )
            await _written(self.store.record, entry, served_adapters(with_pins(policy, self.live.pins)))
            return before, self.live.set_policy(policy)

    # -- adapter versions --------------------------------------------------------------------------------------

    async def swap(self, route: str, variant: str, ref: str, *, actor: str, reason: str) -> Pinned:
        """Pin a variant to `ref`, which must pass the route's release gate."""
        if "@" not in ref:
            raise BadRequest(
                "'adapter' must name a version, as name@version.", param="adapter", code="invalid_value"
            )
        async with self.lock:
            _adapter_variant(self.live.files, route, variant)
            _gate(self._catalog(), self.live.files, route, ref)
            return await self._pin(route, variant, ref, action="adapter_swap", actor=actor, reason=reason)

    async def rollback(self, route: str, variant: str, *, actor: str, reason: str) -> Pinned:
        """Pin the version the variant served before this one; never gated: getting back to known ground must
        not be blocked by the checks that guard getting away from it."""
        async with self.lock:
            _adapter_variant(self.live.files, route, variant)
            current = served_adapters(self.live.view.policy).get((route, variant))
            history = await asyncio.to_thread(self.store.history, route, variant)
            previous = next((ref for _, ref, _, _ in history if ref != current), None)
            if previous is None:
                raise Conflict(
                    f"{route}/{variant} has served no other adapter version than {current}.",
                    code="no_previous",
                )
            return await self._pin(
                route, variant, previous, action="adapter_rollback", actor=actor, reason=reason
            )

    async def _pin(
        self, route: str, variant: str, ref: str, *, action: str, actor: str, reason: str
    ) -> Pinned:
        before = served_adapters(self.live.view.policy).get((route, variant))
        preview = self.live.preview_pins({**self.live.pins, (route, variant): ref})
        await self._prepare(preview, actor=actor)  # loaded before any request is routed to it
        version = self.live.view.policy.version
        entry = Entry(
            action,
            actor,
            route=route,
            variant=variant,
            reason=reason,
            policy_version=version,
            detail={"adapter": ref},
        )
        pins = await _written(self.store.pin, route, variant, ref, entry, served_adapters(preview))
        view = self.live.set_pins(pins)
        return Pinned(action, route, variant, before, ref, view.policy.version)

    # -- canaries and drills ---------------------------------------------------------------------------------

    async def canary(self, route: str, op: Operation, *, actor: str, reason: str) -> None:
        """pause / resume / promote / abort, audited (`NotFound`, or `Conflict` when it does not apply)."""
        async with self.lock:
            update = await _written(self.canaries.operate, route, op, actor=actor, reason=reason)
            self.live.set_canaries(update.states)

    async def canary_tick(self) -> None:
        """One look at every canary; a decision applies to this process's next request at once (not under
        `lock`, like `sync`)."""
        update = await _written(self.canaries.tick)
        if update.switches is not None:
            self.live.set_switches(update.switches)
        self.live.set_canaries(update.states)

    async def drill(
        self, route: str, variant: str, detail: dict[str, Any], *, actor: str, reason: str
    ) -> None:
        """Record the result of a drill (the CLI kills and revives through `flip`)."""
        view = self.live.view
        _check_target(view, Flip("variant", True, route, variant), variant_param="variant")
        entry = Entry(
            "drill",
            actor,
            route=route,
            variant=variant,
            reason=reason,
            policy_version=view.policy.version,
            detail=detail,
        )
        await _written(self.store.record, entry)

    # -- shadow overrides (`shadow.overrides`) ---------------------------------------------------------------

    async def shadow_start(
        self, route: str, variant: str, share: float | None, *, actor: str, reason: str
    ) -> View:
        """From now on copy `share` percent of the route's requests (None: the default) to `variant`, in place of
        the policy's `[shadow]`, until cleared."""
        async with self.lock:
            check_start(self.live.declared, route, variant, share)
            override = ShadowOverride(route, "start", variant, share, actor, reason)
            spec = shadow_of(self.live.declared.routes[route], override)
            detail = {"share": spec.share if spec else None}
            return await self._set_shadow("shadow_start", route, override, variant, actor, reason, detail)

    async def shadow_stop(self, route: str, variant: str, *, actor: str, reason: str) -> View:
        """No copies for the route until cleared; `variant` must name the shadow in force."""
        async with self.lock:
            check_stop(self.live.view.policy, self.live.shadow_overrides, route, variant)
            override = ShadowOverride(route, "stop", variant, None, actor, reason)
            return await self._set_shadow("shadow_stop", route, override, variant, actor, reason, None)

    async def shadow_clear(self, route: str, *, actor: str, reason: str) -> View:
        """Remove the route's override (a stale one too): the policy's `[shadow]`, or none, applies again."""
        async with self.lock:
            held = check_clear(self.live.declared, self.live.shadow_overrides, route)
            detail = {"cleared": held.mode}
            return await self._set_shadow("shadow_clear", route, None, held.variant, actor, reason, detail)

    async def _set_shadow(
        self,
        action: str,
        route: str,
        override: ShadowOverride | None,
        variant: str,
        actor: str,
        reason: str,
        detail: dict[str, Any] | None,
    ) -> View:
        version = self.live.view.policy.version
        entry = Entry(
            action, actor, route=route, variant=variant, reason=reason, policy_version=version, detail=detail
        )
        overrides = await _written(self.store.set_shadow_override, route, override, entry)
        return self.live.set_shadow_overrides(overrides)

    # -- console sessions ------------------------------------------------------------------------------------

    async def end_session(self, sid: str, expires: float) -> None:
        """Sign a console session out on every replica: recorded in the store until its expiry, refused here at
        once and by the others from their next `sync`. `NotDurable` when it could not be recorded."""
        try:
            self.live.ended_sessions = await asyncio.to_thread(self.store.end_session, sid, expires)
        except StoreError as err:
            raise NotDurable(
                f"The sign-out could not be recorded ({err}): the session is still valid; sign out again.",
                code="sign_out_failed",
            ) from None

    # -- other processes -----------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Publish what another gateway process sharing the store changed: switches, canary states, shadow
        overrides and console sign-outs at once, not under `lock` (a reload may hold it while adapters load: a kill
        from elsewhere must apply within a poll); then adapter pins (a swap or rollback made elsewhere), once their
        versions are loaded here too."""
        self.live.set_switches(await asyncio.to_thread(self.store.switches))
        self.live.set_canaries(await asyncio.to_thread(self.store.canary_states))
        self.live.set_shadow_overrides(await asyncio.to_thread(self.store.shadow_overrides))
        self.live.ended_sessions = await asyncio.to_thread(self.store.ended_sessions)
        pins = await asyncio.to_thread(self.store.pins)
        if pins != self.live.pins:
            async with self.lock:
                await self._prepare(self.live.preview_pins(pins), actor="sync")
                self.live.set_pins(pins)


async def _written(write: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a store write in a thread; a store that refuses it is `audit_failed`, and nothing changed."""
    try:
        return await asyncio.to_thread(write, *args, **kwargs)
    except StoreError as err:
        raise NotDurable(
            f"The change's audit entry could not be written ({err}); what is served did not change."
        ) from None


def _check_target(view: View, flip: Flip, *, variant_param: str | None = None) -> None:
    if flip.scope == "global":
        return
    route = view.policy.routes.get(flip.route)
    if route is None:
        raise NotFound(f"No route {flip.route!r}.")
    if flip.scope == "variant" and route.variant(flip.variant) is None:
        raise NotFound(f"Route {flip.route!r} has no variant {flip.variant!r}.", param=variant_param)


def _adapter_variant(policy: PolicySnapshot, route: str, variant: str) -> None:
    r = policy.routes.get(route)
    v = r.variant(variant) if r else None
    if v is None:
        raise NotFound(f"No variant {route}/{variant}.")
    if v.adapter is None:
        raise BadRequest(f"{route}/{variant} serves the model {v.model!r}, not an adapter: nothing to swap.")


def _gate(catalog: Catalog, policy: PolicySnapshot, route: str, ref: str) -> None:
    version = catalog.get(ref)
    if version is None or version.lineage is None or version.problem:
        raise NotFound(
            f"Adapter {ref} is not usable: {version.problem if version else 'not in the catalog'}."
        )
    problem = release_gate(policy.routes[route].release, version.lineage)
    if problem:
        raise Conflict(f"{ref} does not pass the release gate of {route!r}: {problem}", code="release_gate")
