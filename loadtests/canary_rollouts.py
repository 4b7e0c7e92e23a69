"""Whole canaries simulated through the gateway's own decision code (gateway/canary_analysis.py, gateway/canary.py).

Where loadtests/canary_simulation.py exercises the count test alone, this runs what the gateway runs: `Evidence`
collects the requests, `look` decides fail / pass / hold, `after_look` advances, promotes or kills, with the
issue's canary (steps 5 → 10 → 25 → 50 → 100 %, 400 candidate requests and 2 minutes per step, guardrails on
invalid calls and errors at α = 0.05 each). Traffic arrives at `--rps` requests a second and is looked at every
`--look` requests. Two figures, seeded:
  1. Healthy canaries (both arms 5 % invalid, 1 % errors): the share killed by any guardrail (target ≤ 5 %).
  2. A candidate with twice the baseline's invalid rate held at a 10 % share: the median number of route
     requests until the gateway kills it (target ≤ 2,500).
Random draws are made with numpy for a whole canary at once; the requests between two looks are fed as counts per arm
(`Evidence.add_counts`, the same update as one `add` per request), so a thousand canaries take seconds.

    .venv/bin/python loadtests/canary_rollouts.py [--runs 1000] [--seed 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from gateway.canary.analysis import Evidence, look
from gateway.canary.machine import CanaryState, after_look, initial
from gateway.canary.spec import CanarySpec, Guardrails, RateGuardrail

ISSUE_SPEC = CanarySpec(
    candidate="candidate",
    baseline="baseline",
    steps=(5.0, 10.0, 25.0, 50.0, 100.0),
    min_requests_per_step=400,
    min_minutes_per_step=2.0,
    unit="request",
    on_fail="kill",
    guardrails=Guardrails(invalid_call_rate=RateGuardrail(0.05), error_rate=RateGuardrail(0.05)),
)
# The doubled-rate figure holds the candidate at 10 %: a step that never ends.
HELD_AT_10 = replace(ISSUE_SPEC, steps=(10.0, 100.0), min_requests_per_step=10**9)


@dataclass(frozen=True, slots=True)
class Rates:
    invalid: float
    errors: float


@dataclass(frozen=True, slots=True)
class Outcome:
    end: str  # killed | promoted | cap
    requests: int  # route requests until the end
    guardrail: str | None  # which one killed it


def run_canary(
    rng: np.random.Generator,
    spec: CanarySpec,
    baseline: Rates,
    candidate: Rates,
    *,
    rps: float = 20.0,
    look_every: int = 50,
    cap: int = 40_000,
) -> Outcome:
    """One canary from its first step to a kill, the promotion, or `cap` route requests."""
    cap -= cap % look_every
    draws = rng.random((3, cap))
    traffic: dict[int, _Traffic] = {}
    evidence = Evidence(spec, step_start=0.0)
    state: CanaryState = initial("sim", "sim", 0.0)
    for start in range(0, cap, look_every):
        end = start + look_every
        now = end / rps
        if state.step not in traffic:
            traffic[state.step] = _Traffic(draws, spec.share(state.step), baseline, candidate, look_every)
        traffic[state.step].feed(evidence, start, now)
        seen = look(spec, evidence, state.step, now)
        moved = after_look(spec, state, seen, now)
        if moved is None:
            continue
        if moved.kill or moved.state.status == "promoted":
            failed = seen.failed.guardrail if seen.failed else None
            return Outcome("killed" if moved.kill else "promoted", end, failed)
        state = moved.state
        evidence.next_step(now)
    return Outcome("cap", cap, None)


class _Traffic:
    """Every request of the canary as it would go at one step's share: request i is routed by draws[0, i], is
    invalid by draws[1, i] and fails by draws[2, i] (the same draws at every step: a step changes the share).
    Counted per arm between two looks, so each look's requests are two `Evidence.add_counts` calls."""

    def __init__(self, draws: np.ndarray, rho: float, base: Rates, cand: Rates, look_every: int) -> None:
        self.rho = rho
        self.look_every = look_every
        to_candidate = draws[0] < rho
        invalid = draws[1] < np.where(to_candidate, cand.invalid, base.invalid)
        error = draws[2] < np.where(to_candidate, cand.errors, base.errors)
        columns = []
        for mask in (to_candidate, ~to_candidate):
            columns += [mask, mask & invalid, mask & error]
        per_look = np.stack(columns).reshape(6, -1, look_every).sum(axis=2, dtype=np.int64)
        self.counts: list[list[int]] = per_look.T.tolist()  # [look][cand n, invalid, errors, base n, ...]

    def feed(self, evidence: Evidence, start: int, now: float) -> None:
        c = self.counts[start // self.look_every]
        evidence.add_counts("candidate", self.rho, c[0], c[1], c[2], now)
        evidence.add_counts("baseline", self.rho, c[3], c[4], c[5], now)


def healthy_kill_share(runs: int, seed: int, rates: Rates = Rates(0.05, 0.01)) -> tuple[float, list[Outcome]]:
    rng = np.random.default_rng(seed)
    outcomes = [run_canary(rng, ISSUE_SPEC, rates, rates) for _ in range(runs)]
    return sum(o.end == "killed" for o in outcomes) / runs, outcomes


def doubled_median(
    runs: int, seed: int, base: Rates = Rates(0.05, 0.01)
) -> tuple[float | None, list[Outcome]]:
    """Median route requests to the kill (survivors count as infinite; None when more than half survive)."""
    rng = np.random.default_rng(seed)
    doubled = Rates(2 * base.invalid, base.errors)
    outcomes = [run_canary(rng, HELD_AT_10, base, doubled) for _ in range(runs)]
    times = [float(o.requests) if o.end == "killed" else float("inf") for o in outcomes]
    middle = statistics.median(times)
    return (None if middle == float("inf") else middle), outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=4)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    share, outcomes = healthy_kill_share(args.runs, args.seed)
    by = {g: sum(o.guardrail == g for o in outcomes) for g in ("invalid_call_rate", "error_rate")}
    print(
        f"healthy canaries: {share:.1%} killed of {args.runs} ({by}); "
        f"{sum(o.end == 'promoted' for o in outcomes)} promoted [{time.perf_counter() - started:.1f} s]"
    )
    started = time.perf_counter()
    median, outcomes = doubled_median(args.runs, args.seed + 1)
    survived = sum(o.end != "killed" for o in outcomes) / len(outcomes)
    print(
        f"doubled invalid rate at a 10 % share: median {median} route requests to the kill; "
        f"{survived:.1%} not killed within 40,000 [{time.perf_counter() - started:.1f} s]"
    )
    return 0 if share <= 0.05 and median is not None and median <= 2500 else 1


if __name__ == "__main__":
    raise SystemExit(main())
