"""Keeps each engine's loaded LoRA adapters equal to what the live policy references.

vLLM loads and unloads adapters at runtime (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`; plain-text 200
on success, OpenAI's envelope otherwise) and forgets them when it restarts. So the gateway:

- `ensure(policy)`: before a policy goes live, every adapter version it references is verified
  (`control.adapters.verify`) and loaded on its engine; a version that fails never reaches the engine, and the policy is
  refused. This is what makes a hot swap lose nothing: the new version serves before traffic moves to it.
- `reconcile(policy)`, periodically: reloads what an engine lost (a restart; meanwhile its requests get the
  engine's 404 and fall back), and unloads versions no policy references once their in-flight requests ended.
  Only versions from this gateway's catalog are ever unloaded.

Every load, unload and rejection is written to the audit log. This is the control plane: httpx, not the hot path.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.control.adapters import AdapterRejected, Catalog, EngineFacts, verify
from gateway.digests import sha256_file
from gateway.errors import EngineError
from gateway.policy import PolicySnapshot
from gateway.store.api import Entry, StateStore

log = logging.getLogger("gateway.control.lora")


@dataclass(frozen=True, slots=True)
class EngineState:
    base_model: str
    base_root: str | None
    adapters: frozenset[str]


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
        urls: Mapping[str, str],
        *,
        catalog: Callable[[], Catalog],
        state: StateStore,
        inflight: Counter[str],
        max_lora_rank: int = 16,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._urls = dict(urls)
        self._catalog = catalog
        self._state = state
        self._inflight = inflight
        self._max_rank = max_lora_rank
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0))
        self._base_digests: dict[str, str | None] = {}
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        await self._client.aclose()

    async def engine_state(self, engine: str) -> EngineState:
        try:
            response = await self._client.get(self._urls[engine] + "/v1/models", timeout=5.0)
            response.raise_for_status()
            cards = response.json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise EngineError(f"Engine {engine!r}: cannot list its models ({type(exc).__name__}).") from None
        bases = [c for c in cards if not c.get("parent")]
        adapters = frozenset(str(c["id"]) for c in cards if c.get("parent"))
        base = bases[0] if bases else {}
        return EngineState(str(base.get("id", "")), base.get("root"), adapters)

    async def ensure(self, policy: PolicySnapshot, *, actor: str = "gateway") -> list[str]:
        """Verify and load every referenced version that is not loaded yet; return the refs loaded.

        Raises AdapterRejected (a check failed) or EngineError (the engine refused or is unreachable)."""
        loaded: list[str] = []
        async with self._lock:
            for engine, refs in desired(policy).items():
                current = await self.engine_state(engine)
                facts = await self._facts(current)
                for ref in sorted(refs - current.adapters):
                    await self._load(engine, ref, facts, actor, policy.version)
                    loaded.append(ref)
        return loaded

    async def reconcile(self, policy: PolicySnapshot) -> None:
        """Reload what engines lost; unload unreferenced catalog versions with no request in flight."""
        try:
            await self.ensure(policy, actor="reconciler")
        except (AdapterRejected, EngineError) as err:
            log.warning("adapter reconcile: %s", err.message)
        wanted = desired(policy)
        catalog = self._catalog()
        async with self._lock:
            for engine in self._urls:
                try:
                    current = await self.engine_state(engine)
                except EngineError:
                    continue
                for ref in sorted(current.adapters - wanted.get(engine, set())):
                    if catalog.get(ref) is not None and self._inflight.get(ref, 0) <= 0:
                        await self._unload(engine, ref, policy.version)

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

    async def _load(self, engine: str, ref: str, facts: EngineFacts, actor: str, policy_version: str) -> None:
        version = self._catalog().get(ref)
        try:
            if version is None:
                raise AdapterRejected(ref, "files", "it is not in the adapter catalog")
            await asyncio.to_thread(verify, version, facts)
        except AdapterRejected as err:
            await self._audit("adapter_rejected", actor, ref, engine, err.message, policy_version)
            raise
        body = {"lora_name": ref, "lora_path": str(version.path.resolve())}
        await self._post(engine, "/v1/load_lora_adapter", body, ok_if="already")
        await self._audit("adapter_load", actor, ref, engine, None, policy_version)
        log.info("loaded adapter %s on engine %s", ref, engine)

    async def _unload(self, engine: str, ref: str, policy_version: str) -> None:
        try:
            await self._post(engine, "/v1/unload_lora_adapter", {"lora_name": ref}, ok_if="not found")
        except EngineError as err:
            log.warning("unloading %s: %s", ref, err.message)
            return
        await self._audit("adapter_unload", "reconciler", ref, engine, "no longer referenced", policy_version)
        log.info("unloaded adapter %s from engine %s", ref, engine)

    async def _post(self, engine: str, path: str, body: dict[str, Any], *, ok_if: str) -> None:
        try:
            response = await self._client.post(self._urls[engine] + path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"Engine {engine!r}: {path} failed: {type(exc).__name__}.") from None
        if response.status_code == 200:
            return  # vLLM answers success in plain text: nothing to parse
        message = _message(response)
        if ok_if in message.lower():  # already in the wanted state (a race with another gateway process)
            return
        raise EngineError(f"Engine {engine!r} refused {path} for {body['lora_name']}: {message}")

    async def _audit(
        self, action: str, actor: str, ref: str, engine: str, reason: str | None, policy_version: str
    ) -> None:
        entry = Entry(
            action,
            actor,
            reason=reason,
            policy_version=policy_version,
            detail={"adapter": ref, "engine": engine},
        )
        await asyncio.to_thread(self._state.record, entry)


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        return str(error.get("message") or response.text)[:300]
    except ValueError:
        return response.text[:300] or f"HTTP {response.status_code}"
