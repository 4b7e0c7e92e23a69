"""Each canary guardrail's statistic over time, for the console's canary chart: the canary's records replayed in
time order through the controller's own evidence (`canary.analysis`), with the guardrails checked at up to
`POINTS` moments. The rate tests accumulate over the whole canary (from its epoch) and are compared with 1/alpha;
the ratio checks cover the current step and are compared with `max_ratio`. In a canary's shadow phase the records
are paired instead (`canary.paired`): the same guardrails, tested on the pairs. Pure: the caller reads the records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from gateway.canary import paired
from gateway.canary.analysis import Check, Evidence, checks, observation
from gateway.canary.spec import CanarySpec
from gateway.records import Record

POINTS: Final = 60


@dataclass(slots=True)
class Trajectory:
    guardrail: str
    bound: float
    points: list[tuple[float, float]] = field(default_factory=list)  # (time, statistic), finite only


def trajectories(
    spec: CanarySpec, records: Iterable[Record], *, epoch: float, step_started_at: float, shadow: bool = False
) -> list[Trajectory]:
    """One per guardrail, in the spec's order, over the records at or after `epoch` (`shadow`: the canary is in
    its shadow phase, whose evidence is the pairs)."""
    rows = sorted((r for r in records if r.ts >= epoch), key=lambda r: r.ts)
    if shadow:
        pairs = paired.PairedEvidence(spec)
        return _replay(rows, pairs.add, lambda: paired.checks(spec, pairs))
    evidence = Evidence(spec, step_start=step_started_at)

    def add(rec: Record) -> None:
        obs = observation(spec, rec)
        if obs is not None:
            evidence.add(obs)

    return _replay(rows, add, lambda: checks(spec, evidence))


def _replay(
    rows: list[Record], add: Callable[[Record], None], look: Callable[[], tuple[Check, ...]]
) -> list[Trajectory]:
    """Feed `rows` one at a time, checking the guardrails at up to `POINTS` moments."""
    every = max(1, math.ceil(len(rows) / POINTS))
    found = {c.guardrail: Trajectory(c.guardrail, c.bound) for c in look()}
    for i, rec in enumerate(rows, start=1):
        add(rec)
        if i % every == 0 or i == len(rows):
            for check in look():
                if math.isfinite(check.statistic):
                    found[check.guardrail].points.append((rec.ts, check.statistic))
    return list(found.values())
