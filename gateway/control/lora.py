"""Keeps the loaded LoRA adapters of every member of every engine pool equal to what the live policy references.

vLLM loads and unloads adapters at runtime (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`; plain-text 200
on success, OpenAI's envelope otherwise) and forgets them when it restarts. So the gateway, member by member:

- `ensure(policy)`: before a policy goes live, every adapter version it references is verified
  (`control.adapters.verify`) and loaded on each member of its engine's pool that answers; a version that fails
  never reaches an engine, and the policy is refused, as it is when no member of a pool answers. This is what makes
  a hot swap lose nothing: the new version serves before traffic moves to it.
- `reconcile(policy)`, periodically: reloads what a member lost (a restart; meanwhile requests for the adapter go
  to members that hold it, or get the member's 404 and are retried or fall back), and unloads versions no policy
  references once their in-flight requests ended. Each member is reconciled on its own: one that is down or
  restarted does not hold up the others. Only versions from this gateway's catalog are ever unloaded.

What each member lists is published on its `pool.Member` (`adapters`), where the balancer prefers members that hold
a request's adapter. Every load, unload and rejection is written to the audit log, naming the member. This is the
control plane: httpx, not the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.control.adapters import AdapterRejected, Catalog, EngineFacts, verify
from gateway.digests import sha256_file
from gateway.errors import EngineError
from gateway.policy import PolicySnapshot
from gateway.pool import Member, Pool
from gateway.store.api import Entry, StateStore

log = logging.getLogger("gateway.control.lora")


@dataclass(frozen=True, slots=True)
class EngineState:
    base_model: str
    base_root: str | None
    adapters: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Where:
    """One member of one pool, as messages and audit entries name it."""

    engine: str
    member: Member
    label: str  # "Engine 'x'" (a pool of one) or "Engine 'x' at URL"


def desired(policy: PolicySnapshot) -> dict[str, set[str]]:
    """engine name → adapter refs the policy references on it."""
    out: dict[str, set[str]] = {}
    for route in policy.routes.values():
        for variant in route.variants:
            if variant.adapter is not None:
                out.setdefault(variant.engine, set()).add(variant.adapter)
    return out


class LoraManager:
    def __init__(
        self,
        pools: Mapping[str, Pool],
        *,
        catalog: Callable[[], Catalog],
        state: StateStore,
        inflight: Counter[str],
        max_lora_rank: int = 16,
        unload_grace_s: float = 15.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pools = pools
        self._catalog = catalog
        self._state = state
        self._inflight = inflight
        self._max_rank = max_lora_rank
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0))
        self._base_digests: dict[str, str | None] = {}
        self._lock = asyncio.Lock()
        self._unload_grace_s = unload_grace_s
        self._clock = clock
        self._unreferenced_since: dict[str, float] = {}  # version → when no replica referenced it any more

    async def close(self) -> None:
        await self._client.aclose()

    def _members(self, engine: str) -> list[_Where]:
        pool = self._pools[engine]
        return [_Where(engine, m, pool.describe(i)) for i, m in enumerate(pool.members)]

    async def member_state(self, where: _Where) -> EngineState:
        """What the member serves now (`GET /v1/models`); its adapters are published for the balancer."""
        try:
            response = await self._client.get(where.member.url + "/v1/models", timeout=5.0)
            response.raise_for_status()
            cards = response.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise EngineError(f"{where.label}: cannot list its models ({type(exc).__name__}).") from None
        bases = [c for c in cards if not c.get("parent")]
        adapters = frozenset(str(c["id"]) for c in cards if c.get("parent"))
        base = bases[0] if bases else {}
        where.member.adapters = adapters
        return EngineState(str(base.get("id", "")), base.get("root"), adapters)

    async def ensure(self, policy: PolicySnapshot, *, actor: str = "gateway") -> list[str]:
        """Verify and load every referenced version on each member of its pool that lacks it; return the refs
        loaded (once per member).

        Raises AdapterRejected (a check failed) or EngineError (a member refused, or no member of a pool
        answers)."""
        loaded: list[str] = []
        async with self._lock:
            for engine, refs in desired(policy).items():
                loaded += await self._ensure_pool(engine, refs, actor, policy.version)
        return loaded

    async def _ensure_pool(self, engine: str, refs: set[str], actor: str, policy_version: str) -> list[str]:
        loaded: list[str] = []
        down: list[EngineError] = []
        for where in self._members(engine):
            try:
                current = await self.member_state(where)
            except EngineError as err:
                log.warning("%s; its adapters are loaded once it answers", err.message)
                down.append(err)
                continue
            loaded += await self._load_missing(where, refs, current, actor, policy_version)
        if len(down) == len(self._pools[engine].members):
            raise down[0]
        return loaded

    async def _load_missing(
        self, where: _Where, refs: set[str], current: EngineState, actor: str, policy_version: str
    ) -> list[str]:
        missing = sorted(refs - current.adapters)
        if missing:
            facts = await self._facts(current)
            for ref in missing:
                await self._load(where, ref, facts, actor, policy_version)
        return missing

    async def reconcile(self, policy: PolicySnapshot, elsewhere: Set[str] | None = frozenset()) -> None:
        """Member by member: reload what it lost; unload the catalog versions that no replica has referenced for
        `unload_grace_s` and that have no request in flight. `elsewhere`: what the other live replicas' policies
        reference (None: unknown, the store is away, so nothing is unloaded). The grace covers a change another
        replica has loaded for but not yet published."""
        wanted = desired(policy)
        referenced = set().union(*wanted.values(), elsewhere or ())
        now = self._clock()
        for ref in referenced:
            self._unreferenced_since.pop(ref, None)
        async with self._lock:
            for engine in self._pools:
                for where in self._members(engine):
                    unload = elsewhere is not None
                    await self._reconcile_member(
                        where, wanted.get(engine, set()), referenced, unload, now, policy.version
                    )

    def _may_unload(self, ref: str, now: float) -> bool:
        since = self._unreferenced_since.setdefault(ref, now)
        return now - since >= self._unload_grace_s and self._inflight.get(ref, 0) <= 0

    async def _reconcile_member(
        self,
        where: _Where,
        refs: set[str],
        referenced: set[str],
        unload: bool,
        now: float,
        policy_version: str,
    ) -> None:
        try:
            current = await self.member_state(where)
        except EngineError:
            return  # down: its health is the pool's business; it is reconciled once it answers
        try:
            await self._load_missing(where, refs, current, "reconciler", policy_version)
        except (AdapterRejected, EngineError) as err:
            log.warning("adapter reconcile: %s", err.message)
        catalog = self._catalog()
        for ref in sorted(current.adapters - referenced):
            if unload and catalog.get(ref) is not None and self._may_unload(ref, now):
                await self._unload(where, ref, policy_version)

    async def _facts(self, current: EngineState) -> EngineFacts:
        return EngineFacts(current.base_model, self._max_rank, await self._base_digest(current.base_root))

    async def _base_digest(self, root: str | None) -> str | None:
        """The served base weights' SHA-256 when the engine's model directory is readable from here."""
        if root is None:
            return None
        if root not in self._base_digests:
            weights = Path(root) / "model.safetensors"
            self._base_digests[root] = (
                await asyncio.to_thread(sha256_file, weights) if weights.is_file() else None
            )
        return self._base_digests[root]

    async def _load(
        self, where: _Where, ref: str, facts: EngineFacts, actor: str, policy_version: str
    ) -> None:
        version = self._catalog().get(ref)
        try:
            if version is None:
                raise AdapterRejected(ref, "files", "it is not in the adapter catalog")
            await asyncio.to_thread(verify, version, facts)
        except AdapterRejected as err:
            await self._audit("adapter_rejected", actor, ref, where, err.message, policy_version)
            raise
        body = {"lora_name": ref, "lora_path": str(version.path.resolve())}
        await self._post(where, "/v1/load_lora_adapter", body, ok_if="already")
        where.member.adapters = where.member.adapters | {ref}
        await self._audit("adapter_load", actor, ref, where, None, policy_version)
        log.info("loaded adapter %s on engine %s at %s", ref, where.engine, where.member.url)

    async def _unload(self, where: _Where, ref: str, policy_version: str) -> None:
        try:
            await self._post(where, "/v1/unload_lora_adapter", {"lora_name": ref}, ok_if="not found")
        except EngineError as err:
            log.warning("unloading %s: %s", ref, err.message)
            return
        where.member.adapters = where.member.adapters - {ref}
        await self._audit("adapter_unload", "reconciler", ref, where, "no longer referenced", policy_version)
        log.info("unloaded adapter %s from engine %s at %s", ref, where.engine, where.member.url)

    async def _post(self, where: _Where, path: str, body: dict[str, Any], *, ok_if: str) -> None:
        try:
            response = await self._client.post(where.member.url + path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"{where.label}: {path} failed: {type(exc).__name__}.") from None
        if response.status_code == 200:
            return  # vLLM answers success in plain text: nothing to parse
        message = _message(response)
        if ok_if in message.lower():  # already in the wanted state (a race with another gateway process)
            return
        raise EngineError(f"{where.label} refused {path} for {body['lora_name']}: {message}")

    async def _audit(
        self, action: str, actor: str, ref: str, where: _Where, reason: str | None, policy_version: str
    ) -> None:
        entry = Entry(
            action,
            actor,
            reason=reason,
            policy_version=policy_version,
            detail={"adapter": ref, "engine": where.engine, "member": where.member.url},
        )
        await asyncio.to_thread(self._state.record, entry)


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") or response.text)[:300]
    except ValueError:
        return response.text[:300] or f"HTTP {response.status_code}"
