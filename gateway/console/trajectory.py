"""Each canary guardrail's statistic over time, for the console's canary chart: the canary's records replayed in
time order through the controller's own evidence (`canary.analysis`), with the guardrails checked at up to
`POINTS` moments. The rate tests accumulate over the whole canary (from its epoch) and are compared with 1/alpha;
the ratio checks cover the current step and are compared with `max_ratio`. Pure: the caller reads the records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from gateway.canary.analysis import Evidence, checks, observation
from gateway.canary.spec import CanarySpec
from gateway.records import Record

POINTS: Final = 60


@dataclass(slots=True)
class Trajectory:
    guardrail: str
    bound: float
    points: list[tuple[float, float]] = field(default_factory=list)  # (time, statistic), finite only


def trajectories(
    spec: CanarySpec, records: Iterable[Record], *, epoch: float, step_started_at: float
) -> list[Trajectory]:
    """One per guardrail, in the spec's order, over the records at or after `epoch`."""
    evidence = Evidence(spec, step_start=step_started_at)
    seen = [(r.ts, obs) for r in records if r.ts >= epoch and (obs := observation(spec, r)) is not None]
    seen.sort(key=lambda pair: pair[0])
    every = max(1, math.ceil(len(seen) / POINTS))
    found = {c.guardrail: Trajectory(c.guardrail, c.bound) for c in checks(spec, evidence)}
    for i, (ts, obs) in enumerate(seen, start=1):
        evidence.add(obs)
        if i % every == 0 or i == len(seen):
            for check in checks(spec, evidence):
                if math.isfinite(check.statistic):
                    found[check.guardrail].points.append((ts, check.statistic))
    return list(found.values())
