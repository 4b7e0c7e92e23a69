"""What a load test will send, and when: prepared request bodies, the job order, the arrival times. Pure.

- `Prepared`: every request serialized once before the run, as the bytes that go on the wire (the runner must not
  spend its CPU on JSON or header objects while it measures): a head per forced variant, a body per golden item;
  only the request id (and the sticky key) is added per request.
- `job(k)`: the k-th measured request's golden item and forced variant. *As served*: the request set in order,
  no variant forced (the route's policy decides). *Paired*: each golden item is sent once through every listed
  variant, the variants in a seeded random order per item, so that drifts in time fall on all variants alike.
- `arrivals(...)`: the open-loop start offsets: a fixed rate (k / rate) or a Poisson process (exponential gaps,
  seeded). The random draws are injected (a `random.Random`), so the same seed gives the same schedule.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.loadtest.scenario import GoldenItem, Scenario


@dataclass(frozen=True, slots=True)
class Job:
    seq: int  # 0.. in the measured phase; negative for warm-up
    item: int  # index into the request set
    variant: str | None  # forced with x-gateway-variant (paired mode), else None


@dataclass(frozen=True, slots=True)
class Prepared:
    url: str
    bodies: tuple[bytes, ...]  # one per golden item
    heads: dict[str | None, bytes]  # forced variant (None: none) → request line and fixed headers
    lengths: tuple[bytes, ...]  # each body's Content-Length header line
    users: tuple[bytes, ...]  # sticky-key header lines to draw from (as served); empty: none sent
    stream: bool

    def request(self, item: int, variant: str | None, request_id: str, user: int | None = None) -> bytes:
        """One request's bytes: the prepared head, this request's id (and sticky key), the prepared body."""
        parts = [self.heads[variant], self.lengths[item], b"x-request-id: ", request_id.encode(), b"\r\n"]
        if user is not None:
            parts.append(self.users[user])
        parts += [b"\r\n", self.bodies[item]]
        return b"".join(parts)


def prepare(scenario: Scenario, golden: Sequence[GoldenItem], key: str | None) -> Prepared:
    req = scenario.requests
    url = urlsplit(scenario.target.url)
    path = url.path.rstrip("/") + "/v1/chat/completions"
    fixed = [f"POST {path} HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json", "Accept: */*"]
    if key:
        fixed.append(f"Authorization: Bearer {key}")
    heads: dict[str | None, list[str]] = {None: fixed}
    if scenario.compare.mode == "paired":
        heads.update({v: [*fixed, f"x-gateway-variant: {v}"] for v in scenario.compare.variants})
    bodies = tuple(orjson.dumps(_body(scenario, item)) for item in golden)
    return Prepared(
        url=scenario.target.url,
        bodies=bodies,
        heads={v: ("\r\n".join(lines) + "\r\n").encode("latin-1") for v, lines in heads.items()},
        lengths=tuple(b"Content-Length: %d\r\n" % len(body) for body in bodies),
        users=tuple(f"{req.user_header}: loadtest-user-{n:05d}\r\n".encode() for n in range(req.users)),
        stream=req.stream,
    )


def _body(scenario: Scenario, item: GoldenItem) -> dict[str, Any]:
    body: dict[str, Any] = {
        **scenario.requests.body,
        "model": scenario.target.route,
        "messages": item.messages,
    }
    if item.tools is not None:
        body["tools"] = item.tools
    if scenario.requests.stream:
        # Usage is what prices a request; the gateway relays a stream's usage chunk only when asked.
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


class Jobs:
    """The measured jobs in order; `job(k)` is pure in k (the paired orders are drawn from the seed)."""

    def __init__(self, scenario: Scenario, items: int) -> None:
        self.items = items
        self.paired = scenario.compare.mode == "paired"
        self.variants = tuple(scenario.compare.variants) if self.paired else (None,)
        self.seed = scenario.load.seed

    def job(self, k: int) -> Job:
        group, within = divmod(k, len(self.variants))
        item = group % self.items
        if not self.paired:
            return Job(k, item, None)
        order = list(self.variants)
        random.Random(f"{self.seed}:{group}").shuffle(order)
        return Job(k, item, order[within])

    def warmup(self, count: int) -> list[Job]:
        """Warm-up jobs: every variant in turn, items from the end of the set (negative seq: not measured)."""
        return [
            Job(
                -1 - n,
                (self.items - 1 - n // len(self.variants)) % self.items,
                self.variants[n % len(self.variants)],
            )
            for n in range(count)
        ]


def arrivals(arrival: str, rate: float, count: int | None, rng: random.Random) -> Iterator[float]:
    """Open-loop start offsets in seconds from the start of the measured phase (endless when count is None)."""
    t = 0.0
    k = 0
    while count is None or k < count:
        yield t
        k += 1
        t = k / rate if arrival == "fixed" else t + rng.expovariate(rate)


def request_id(prefix: str, seq: int) -> str:
    """Sent as x-request-id: the gateway records it (and hands it to the engine), so each answer can be
    matched to its record. Letters, digits and dashes only, as the gateway requires."""
    return f"{prefix}-{seq:07d}" if seq >= 0 else f"{prefix}-w{-seq:06d}"
