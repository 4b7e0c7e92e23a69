"""The store's interfaces. `StateStore`: what the gateway reads and writes of operator state that must survive a
restart (kill switches, adapter pins and history, canary rows, shadow overrides, the audit log, the console
sessions signed out);
`store.state.TableStore` implements it on a `Database`: one SQLite file (`store.sqlite`) or a Postgres database
shared by every replica (`store.postgres`). `RequestLog`: where requests' records go.

Every write that changes what is served is one transaction with its audit entry: there is never a flip, pin,
shadow override or canary decision without its entry, nor an entry for a change that did not happen. Methods
are synchronous and thread-safe; async callers run them with `asyncio.to_thread`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.canary.machine import CanaryState, Transition
from gateway.policy import Flip, Switches
from gateway.records import Record
from gateway.shadow.overrides import ShadowOverride

Pins = dict[tuple[str, str], str]  # (route, variant) → the adapter version an operator pinned
Served = tuple[float, str, str, str]  # a version a variant served: (at, ref, actor, action)
ShadowOverrides = dict[str, ShadowOverride]  # route → the operators' override of its `[shadow]`


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    route: str | None
    variant: str | None
    reason: str | None
    policy_version: str | None
    detail: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry to append (the row's id and time come from the database and the transaction)."""

    action: str
    actor: str
    route: str | None = None
    variant: str | None = None
    reason: str | None = None
    policy_version: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Replica:
    """A running gateway process as its heartbeat last described it (`switches`: `policy.switches_digest`)."""

    id: str
    host: str
    pid: int
    started_at: float
    policy_version: str
    switches: str
    last_seen: float
    adapters: tuple[str, ...] = ()  # the adapter versions its live policy references


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which audit entries: every filter optional. `actions` are LIKE patterns (`canary_%`); newest first
    unless `oldest_first`."""

    limit: int | None = 100
    route: str | None = None
    since: float | None = None
    actions: tuple[str, ...] = ()
    oldest_first: bool = False


class RequestLog(Protocol):
    """Where the request path puts its one record per request (`store.request_log.RecordWriter` on SQLite).
    `submit` never waits on I/O; `close` writes everything submitted before it."""

    def submit(self, record: Record) -> None: ...

    def start(self) -> None: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self, timeout: float | None = 30.0) -> None: ...


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """What the table modules run their statements on: SQLite's connection, or Postgres's through an adapter
    that takes the same `?` placeholders. Statements use the SQL both dialects share."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...


class Database(Protocol):
    """One backend's connections: reads, write transactions, and a change counter other processes move."""

    def reading(self) -> AbstractContextManager[Conn]:
        """A connection to read from; `MissingTable` when a read-only file predates a table."""
        ...

    def writing(self, *, notify: bool = True) -> AbstractContextManager[Conn]:
        """One write transaction: committed when the block ends, rolled back when it raises; `StoreError` when
        the database refuses it. `notify=False`: other processes need not re-read state for it (heartbeats)."""
        ...

    def data_version(self) -> int:
        """A counter that moves when state is committed (by any process): cheap, no I/O, no lock."""
        ...

    def close(self) -> None: ...


class MissingTable(Exception):
    """A read-only database from before a table existed: the table reads as empty."""


class StoreError(Exception):
    """A write the store could not make (disk full, database locked too long, refused); nothing was written."""


class StateStore(Protocol):
    def close(self) -> None: ...

    def data_version(self) -> int:
        """A counter that moves when another connection commits: poll it, reload on a change (cheap, no lock)."""
        ...

    # -- kill switches -------------------------------------------------------------------------------------
    def switches(self) -> Switches: ...

    def flip(self, flip: Flip, entry: Entry) -> Switches:
        """Write the flip and its audit entry; return the switches now in force."""
        ...

    # -- adapter versions served per variant -----------------------------------------------------------------
    def pins(self) -> Pins: ...

    def pin(
        self, route: str, variant: str, ref: str | None, entry: Entry, served: Mapping[tuple[str, str], str]
    ) -> Pins:
        """Pin (ref None: unpin) a variant's version, with its audit entry and the versions now served."""
        ...

    def note_served(self, served: Mapping[tuple[str, str], str], *, actor: str, action: str) -> None:
        """Append to each variant's history the version it now serves, when that changed."""
        ...

    def history(self, route: str, variant: str) -> list[Served]:
        """(at, ref, actor, action) of the versions a variant served, newest first."""
        ...

    # -- shadow overrides ----------------------------------------------------------------------------------
    def shadow_overrides(self) -> ShadowOverrides: ...

    def set_shadow_override(
        self, route: str, override: ShadowOverride | None, entry: Entry
    ) -> ShadowOverrides:
        """Set (None: clear) a route's shadow override with its audit entry (the row's time is the entry's);
        return the overrides now in force."""
        ...

    # -- console sessions signed out ------------------------------------------------------------------------
    def ended_sessions(self) -> frozenset[str]:
        """The ids of the console sessions signed out that have not expired yet."""
        ...

    def end_session(self, sid: str, expires: float) -> frozenset[str]:
        """Record that console session `sid`, valid until `expires`, was signed out (not audited: it changes
        nothing served), forgetting those past their expiry; return the ids ended now."""
        ...

    # -- audit log -----------------------------------------------------------------------------------------
    def record(self, entry: Entry, served: Mapping[tuple[str, str], str] | None = None) -> None:
        """Append an entry for an action that is not a flip or a pin (reload, drill, ...), with the versions
        served after it when it changed them."""
        ...

    def audit(self, query: AuditQuery | None = None) -> list[AuditEntry]:
        """The entries `query` selects (by default the 100 newest)."""
        ...

    # -- replicas ------------------------------------------------------------------------------------------
    def heartbeat(self, replica: Replica) -> None:
        """Record that `replica` is alive and what it serves now."""
        ...

    def replicas(self, since: float) -> list[Replica]:
        """The replicas whose last heartbeat is at or after `since`."""
        ...

    def leave(self, replica_id: str) -> None:
        """A replica shutting down removes its row."""
        ...

    # -- canaries ------------------------------------------------------------------------------------------
    def canary_states(self) -> dict[str, CanaryState]: ...

    def start_canary(self, new: CanaryState, previous: CanaryState | None, entry: Entry) -> bool:
        """Start a canary (replacing an older canary's row); False, nothing written, if another process did."""
        ...

    def move_canary(self, before: CanaryState, move: Transition, candidate: str, entry: Entry) -> bool:
        """Write `move` (with the candidate's kill switch when it kills) if the row is still `before`; False,
        nothing written, if another process moved it first."""
        ...
