"""A route's canary as its policy declares it (`[canary]`, `[canary.guardrails]`), as frozen plain data. Pure.

How a step's share maps onto routing (applied by `canary.machine.with_canaries`): while a canary runs, the candidate's
weight is the current step's percentage and the baseline's is the rest (100 - step); every other variant of the
route must have weight 0 (checked at load), so the candidate's share of the route's traffic is exactly the step.
Slices stay contiguous in declaration order, so raising the candidate's weight only widens its slice: with
`unit = "user"` a sticky user who was on the candidate stays on it as the share grows (only users moving onto the
candidate move). Reaching the last step (100) is the promotion: the candidate serves the whole route and the
baseline is put first among the route's fallbacks. A killed or aborted canary gives the baseline the whole route.

With `shadow_requests`, a shadow phase comes before the first step: the candidate serves nobody (weight 0) and
answers copies of the route's requests (the route's `[shadow]`, which must name it), until that many copies are
paired with the answers users got and every guardrail passed on the pairs (`canary.paired`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Unit = Literal["request", "user"]
OnFail = Literal["kill", "hold"]


@dataclass(frozen=True, slots=True)
class RateGuardrail:
    """An anytime-valid test that the candidate's rate of an event is no worse than the baseline's."""

    alpha: float


@dataclass(frozen=True, slots=True)
class RatioGuardrail:
    """Candidate median / baseline median at most `max_ratio`, once each arm has `min_samples` in the step."""

    max_ratio: float
    min_samples: int


@dataclass(frozen=True, slots=True)
class Guardrails:
    invalid_call_rate: RateGuardrail | None = None
    error_rate: RateGuardrail | None = None
    latency_per_output_token: RatioGuardrail | None = None
    cost_per_request: RatioGuardrail | None = None


@dataclass(frozen=True, slots=True)
class CanarySpec:
    candidate: str
    baseline: str
    steps: tuple[float, ...]  # percent of the route's traffic, increasing, ending at 100
    min_requests_per_step: int  # candidate requests in the step before it may end
    min_minutes_per_step: float
    unit: Unit = "request"
    on_fail: OnFail = "kill"
    guardrails: Guardrails = Guardrails()
    shadow_requests: int | None = None  # pairs the shadow phase needs before step 1; None: no shadow phase

    def share(self, step: int) -> float:
        """The candidate's share (0..1) at step index `step`."""
        return self.steps[step] / 100.0

    def is_last(self, step: int) -> bool:
        """Whether passing step index `step` promotes (the next step is 100 %)."""
        return step + 1 >= len(self.steps) - 1
