"""Engine pools: the identical vLLM replicas (members) behind one engine name, each member's health, and which
member takes a request. Pure: the clock is an argument; the HTTP side is `engine`, the adapters `control.lora`.

`GATEWAY_ENGINES` maps a name to one URL or a list of them (`parse_engines`); one URL is a pool of one.

A member is healthy, ejected or half-open (`Member.state`):
- `eject_after` failures in a row (no connection, a connection lost before the answer, a 5xx, a failed `/health`
  probe) eject it for a backoff that doubles with each ejection in a row (`backoff_s`, 2×, 4×, ... up to
  `max_backoff_s`). What happens to requests already sent while it is ejected changes nothing.
- Once the backoff has run out it is half-open: one trial at a time (a request, or the background `/health` probe)
  readmits it on success and ejects it again, for the next backoff, on failure.
- Any other answer (a 200, a 4xx, a 404 for a model it lacks) is success: the member is up. A first-byte timeout
  counts neither way (a long prompt is no sign of a broken member); the `/health` probe catches a hung one.
- An ejection forgets which adapters the member holds (it may have restarted and lost them) until the adapter
  reconciler lists them again.

Which member (`Pool.choose`): among the members that may take a request (healthy, or half-open with no trial under
way), those that hold the request's adapter, then the fewest requests outstanding; ties go round-robin. When no
member may, all are candidates: ejection alone never turns into errors, and a pool of one behaves as a single URL
always did. A retry (`Pool.another`) takes only a member that may, never the one that just failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

State = Literal["healthy", "ejected", "half_open"]


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    eject_after: int = 3  # failures in a row
    backoff_s: float = 1.0  # the first ejection; doubled for each one in a row
    max_backoff_s: float = 30.0
    probe_s: float = (
        5.0  # how often every member's /health is probed (an ejected one's when its backoff ends)
    )

    def backoff(self, ejections: int) -> float:
        """The backoff of the ejection that follows `ejections` ejections in a row."""
        return min(self.backoff_s * 2.0 ** min(ejections, 62), self.max_backoff_s)


@dataclass(slots=True, eq=False)
class Member:
    """One replica of a pool and what the gateway knows of it. Mutated on the event loop only."""

    url: str
    outstanding: int = 0  # requests sent and not finished (until their body is read or the response closed)
    failures: int = 0  # in a row, while admitted
    ejections: int = 0  # in a row, for the backoff
    ejected_until: float = 0.0  # monotonic seconds; 0.0: admitted
    trial: bool = False  # half-open: a trial (request or probe) is under way
    last_probe: float = -math.inf
    adapters: frozenset[str] = field(default_factory=frozenset)  # loaded, as the reconciler last listed them

    def state(self, now: float) -> State:
        if not self.ejected_until:
            return "healthy"
        return "ejected" if now < self.ejected_until else "half_open"

    def may_take(self, now: float) -> bool:
        return not self.ejected_until or (now >= self.ejected_until and not self.trial)

    def succeeded(self, now: float) -> bool:
        """The member answered; True when this readmitted it. Ignored while an ejection's backoff runs."""
        self.trial = False
        if self.ejected_until and now < self.ejected_until:
            return False
        readmitted = bool(self.ejected_until)
        self.failures = self.ejections = 0
        self.ejected_until = 0.0
        return readmitted

    def failed(self, now: float, policy: HealthPolicy) -> float | None:
        """A connection or 5xx failure; the backoff when this ejected the member, else None."""
        self.trial = False
        if self.ejected_until:
            return self._eject(now, policy) if now >= self.ejected_until else None  # a failed trial
        self.failures += 1
        return self._eject(now, policy) if self.failures >= policy.eject_after else None

    def settled(self) -> None:
        """An outcome that says nothing about the member's health (a timeout, a cancelled request)."""
        self.trial = False

    def _eject(self, now: float, policy: HealthPolicy) -> float:
        backoff = policy.backoff(self.ejections)
        self.ejections += 1
        self.failures = 0
        self.ejected_until = now + backoff
        self.adapters = frozenset()
        return backoff

    def status(self, now: float) -> dict[str, Any]:
        """What the admin and readiness views show of the member."""
        return {
            "url": self.url,
            "health": self.state(now),
            "outstanding": self.outstanding,
            "failures": self.failures,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3) if self.ejected_until else 0.0,
            "adapters": sorted(self.adapters),
        }


class Pool:
    """The members behind one engine name, in configuration order."""

    def __init__(self, name: str, urls: tuple[str, ...], policy: HealthPolicy = HealthPolicy()) -> None:
        if not urls:
            raise ValueError(f"engine {name!r} has no URL")
        self.name = name
        self.policy = policy
        self.members = tuple(Member(url) for url in urls)
        self.single = len(self.members) == 1
        self._turn = 0  # where the next scan starts: ties go round-robin

    def describe(self, index: int) -> str:
        """How messages name a member: the engine alone for a pool of one (as before pools), else with its URL."""
        return (
            f"Engine {self.name!r}" if self.single else f"Engine {self.name!r} at {self.members[index].url}"
        )

    def choose(self, adapter: str | None, now: float) -> int:
        """The member for a new request; a half-open one chosen carries the trial."""
        best = self._best(adapter, now, exclude=-1, only_available=True)
        if best < 0:
            best = self._best(adapter, now, exclude=-1, only_available=False)  # none may: all are candidates
        return self._taken(best)

    def another(self, adapter: str | None, now: float, exclude: int) -> int | None:
        """A member other than `exclude` that may take the request (a retry), or None."""
        best = self._best(adapter, now, exclude=exclude, only_available=True)
        return self._taken(best) if best >= 0 else None

    def _best(self, adapter: str | None, now: float, *, exclude: int, only_available: bool) -> int:
        members = self.members
        n = len(members)
        start = self._turn
        best, best_key = -1, (True, 0)
        for k in range(n):
            i = (start + k) % n
            m = members[i]
            if i == exclude or (only_available and not m.may_take(now)):
                continue
            key = (adapter is not None and adapter not in m.adapters, m.outstanding)
            if best < 0 or key < best_key:
                best, best_key = i, key
        return best

    def _taken(self, index: int) -> int:
        self._turn = (index + 1) % len(self.members)
        member = self.members[index]
        if member.ejected_until:
            member.trial = True
        return index

    def probes_due(self, now: float) -> list[int]:
        """Members whose `/health` probe is due: half-open ones with no trial under way, and admitted ones not
        probed for `probe_s`."""
        return [i for i, m in enumerate(self.members) if _probe_at(m, self.policy) <= now]

    def next_probe_at(self) -> float:
        return min(_probe_at(m, self.policy) for m in self.members)


def _probe_at(member: Member, policy: HealthPolicy) -> float:
    if not member.ejected_until:
        return member.last_probe + policy.probe_s
    return math.inf if member.trial else member.ejected_until


def parse_engines(raw: object) -> dict[str, tuple[str, ...]]:
    """`GATEWAY_ENGINES`: engine name → one URL or a list of URLs; each pool's URLs, without a trailing slash.
    Raises ValueError naming the engine and the URL."""
    if not isinstance(raw, Mapping):
        raise ValueError("expected a JSON object of engine name -> URL or list of URLs")
    return {str(name): _pool_urls(str(name), value) for name, value in raw.items()}


def _pool_urls(name: str, value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"engine {name!r}: expected a URL or a list of URLs, got {type(value).__name__}")
    if not items:
        raise ValueError(f"engine {name!r}: the list of URLs is empty")
    urls: list[str] = []
    for item in items:
        url = _url(name, item)
        if url in urls:
            raise ValueError(f"engine {name!r}: {url!r} is listed twice")
        urls.append(url)
    return tuple(urls)


def _url(name: str, item: object) -> str:
    if not isinstance(item, str) or not item.startswith(("http://", "https://")):
        raise ValueError(f"engine {name!r}: {item!r} is not an http(s) URL")
    try:
        parts = urlsplit(item)
        parts.port  # noqa: B018  # raises on a port that is not a number in range
    except ValueError:
        raise ValueError(f"engine {name!r}: {item!r} is not a valid URL") from None
    if not parts.hostname:
        raise ValueError(f"engine {name!r}: {item!r} has no host")
    return item.rstrip("/")


def pool_ready(answers: Sequence[str]) -> str:
    """A pool's readiness from its members' ("ok" or what failed): "ok" when at least one member is ready."""
    return "ok" if "ok" in answers else "; ".join(answers)
