"""Simulated canaries for the anytime-valid count test (gateway/canary_stats.py, docs/canary-statistics.md §1).

Two figures, seeded and reproducible:
  1. Healthy canaries (candidate and baseline both `--rate` invalid, 5 % by default), routed on the step schedule
     5 → 10 → 25 → 50 → 100 % with `--per-step` (400) candidate requests per step, looked at every `--look`
     (50) requests, α = 0.05: the share killed, which Ville's inequality bounds by α (target ≤ 5 %).
  2. A candidate with twice the baseline's invalid rate at a fixed 10 % share, looked at every 50 requests up to
     `--cap` (40,000) requests: the median number of requests until the kill (target ≤ 2,500), and the share
     never killed within the cap.
  3. What a shadow phase (`[canary] shadow_requests`, gateway/canary/paired.py) buys against a doubled invalid rate:
     the candidate's served requests (users exposed to it) until the kill, over `--shadow-runs` (1,000) canaries on
     the schedule 5 → 10 → 25 → 50 % (400 candidate requests per step, passing the last one promotes), without a
     shadow phase and with one of `--shadow-requests` (300) pairs at a `--shadow-share` (20 %) copy share; and the
     share of healthy candidates the shadow phase kills, at `--shadow-requests` pairs and over `--long-pairs`
     (10,000) pairs copied at 100 %, both bounded by α.
Figures 1 and 2: each request is routed by one uniform draw against the share in force, then is invalid by a second
draw; every invalid event updates the test once (`CountTest.observe`, O(grid) per event), so a run costs
O(requests). Figure 3 draws the counts between two looks (every `--look` route requests) at once with numpy and adds
them in one update (`CountTest.observe_many`: M depends on the counts, not their order). In the shadow phase a pair's
two answers are drawn independently (the served one invalid at the baseline's rate, the copy at the candidate's);
the same prompt often troubles both, which makes discordant pairs rarer and the real paired test sharper, so the
phase's figures here are on the cautious side.

    .venv/bin/python loadtests/canary_simulation.py [--healthy-runs 1000] [--doubled-runs 1000] [--shadow-runs 1000]
        [--shadow-requests 300] [--shadow-share 0.2] [--seed 20240611]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.canary.paired import PAIRED_RHO
from gateway.canary.stats import CountTest

STEPS: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50, 1.00)


def healthy_run(rng: random.Random, rate: float, per_step: int, look: int, alpha: float) -> bool:
    """One healthy canary through the whole step schedule; True when the test killed it."""
    test = CountTest(alpha=alpha)
    requests = 0
    for rho in STEPS:
        routed = 0
        while routed < per_step:
            requests += 1
            to_candidate = rng.random() < rho
            routed += to_candidate
            if rng.random() < rate:
                test.observe(to_candidate, rho)
            if requests % look == 0 and test.rejects:
                return True
    return test.rejects  # the final look, at promotion


def requests_to_kill(
    rng: random.Random, rho: float, rate_a: float, rate_b: float, look: int, cap: int, alpha: float
) -> int | None:
    """Requests until the test kills a candidate at a fixed share, or None if it survives ``cap`` requests."""
    test = CountTest(alpha=alpha)
    for request in range(1, cap + 1):
        to_candidate = rng.random() < rho
        if rng.random() < (rate_b if to_candidate else rate_a):
            test.observe(to_candidate, rho)
        if request % look == 0 and test.rejects:
            return request
    return None


def median_or_none(values: Sequence[int | None]) -> float | None:
    """Median with survivors counted as +infinity; None when more than half survived."""
    caught = sorted(v for v in values if v is not None)
    ordered: list[float] = [float(v) for v in caught] + [float("inf")] * (len(values) - len(caught))
    middle = statistics.median(ordered)
    return None if middle == float("inf") else middle


@dataclass(frozen=True, slots=True)
class Setup:
    """Figure 3's canary: the baseline's invalid rate, the served steps' minimum and look, α, the copy share."""

    rate: float = 0.05
    per_step: int = 400
    look: int = 50  # route requests between two looks
    alpha: float = 0.05
    share: float = 0.2  # the [shadow] share: requests copied in the shadow phase


@dataclass(frozen=True, slots=True)
class Exposure:
    """One canary of a candidate: whether the shadow phase killed it, and the candidate's served requests until the
    kill (None: never killed, promoted)."""

    killed_in_shadow: bool
    exposed: int | None


def served_exposure(rng: np.random.Generator, setup: Setup, rate_b: float) -> int | None:
    """The candidate's served requests until the count test kills it on the steps 5 → 10 → 25 → 50 %, looked at
    every `look` route requests (a step ends at the first look with `per_step` candidate requests); None when it
    passes the 50 % step (the promotion)."""
    test = CountTest(alpha=setup.alpha)
    exposed = 0
    for rho in STEPS[:-1]:
        routed = 0
        while routed < setup.per_step:
            to_candidate = int(rng.binomial(setup.look, rho))
            test.observe_many(True, rho, int(rng.binomial(to_candidate, rate_b)))
            test.observe_many(False, rho, int(rng.binomial(setup.look - to_candidate, setup.rate)))
            routed += to_candidate
            exposed += to_candidate
            if test.rejects:
                return exposed
    return None


def shadow_phase_kills(
    rng: np.random.Generator, setup: Setup, rate_b: float, pairs_needed: int, share: float | None = None
) -> bool:
    """The shadow phase, looked at every `look` route requests, each copied with probability `share` (default: the
    setup's). A pair is discordant with the copy invalid (probability rate_b (1 − rate)) or the served answer
    invalid (rate (1 − rate_b)); each discordant pair is one event of the count test at rho = 1/2. True when the
    test kills the candidate before `pairs_needed` pairs (the pass)."""
    test = CountTest(alpha=setup.alpha)
    shares = [rate_b * (1 - setup.rate), setup.rate * (1 - rate_b)]
    shares.append(1.0 - sum(shares))
    copied = setup.share if share is None else share
    pairs = 0
    while pairs < pairs_needed:
        batch = int(rng.binomial(setup.look, copied))
        candidate_only, baseline_only, _ = (int(n) for n in rng.multinomial(batch, shares))
        test.observe_many(True, PAIRED_RHO, candidate_only)
        test.observe_many(False, PAIRED_RHO, baseline_only)
        pairs += batch
        if test.rejects:
            return True
    return False


def exposure(rng: np.random.Generator, setup: Setup, rate_b: float, shadow_requests: int | None) -> Exposure:
    """One canary of a candidate invalid at `rate_b`: its shadow phase (when `shadow_requests` is set), then its
    served steps with a fresh test (`canary.machine`: passing the phase restarts the evidence)."""
    if shadow_requests is not None and shadow_phase_kills(rng, setup, rate_b, shadow_requests):
        return Exposure(True, 0)
    return Exposure(False, served_exposure(rng, setup, rate_b))


def exposure_percentiles(outcomes: Sequence[Exposure]) -> dict[int, float]:
    """p50, p90 and p99 of the users exposed (a promoted candidate counts as infinitely many)."""
    values = sorted(math.inf if o.exposed is None else float(o.exposed) for o in outcomes)
    return {q: values[min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1)] for q in (50, 90, 99)}


def healthy_shadow_kills(
    rng: np.random.Generator, setup: Setup, pairs_needed: int, runs: int, share: float | None = None
) -> float:
    """The share of healthy candidates (invalid at the baseline's rate) the shadow phase kills."""
    return sum(shadow_phase_kills(rng, setup, setup.rate, pairs_needed, share) for _ in range(runs)) / runs


def _exposure_line(name: str, outcomes: Sequence[Exposure]) -> str:
    q = exposure_percentiles(outcomes)
    shown = {k: "promoted" if math.isinf(v) else f"{v:,.0f}" for k, v in q.items()}
    in_shadow = sum(o.killed_in_shadow for o in outcomes)
    promoted = sum(o.exposed is None for o in outcomes)
    return (
        f"  {name}: users exposed before the kill p50 {shown[50]}, p90 {shown[90]}, p99 {shown[99]}; "
        f"killed in the shadow phase (0 exposed) {in_shadow}/{len(outcomes)}; promoted {promoted}"
    )


def print_shadow_figures(args: argparse.Namespace) -> bool:
    """Figure 3; True when every healthy kill share is within α."""
    rng = np.random.default_rng(args.seed)
    setup = Setup(args.rate, args.per_step, args.look, args.alpha, args.shadow_share)
    runs, bad = args.shadow_runs, 2 * args.rate
    print(
        f"doubled invalid rate ({args.rate:.0%} → {bad:.0%}), steps 5 → 10 → 25 → 50 %, {runs} canaries each:\n"
        + _exposure_line("without a shadow phase", [exposure(rng, setup, bad, None) for _ in range(runs)])
    )
    shares = []
    for needed in args.shadow_requests:
        with_phase = [exposure(rng, setup, bad, needed) for _ in range(runs)]
        print(_exposure_line(f"with a shadow phase of {needed} pairs ({setup.share:.0%} copied)", with_phase))
        shares.append(healthy_shadow_kills(rng, setup, needed, runs))
        print(f"    healthy candidates killed in that shadow phase: {shares[-1]:.1%}")
    long = healthy_shadow_kills(rng, setup, args.long_pairs, runs, share=1.0)
    print(
        f"  healthy candidates killed over {args.long_pairs:,} pairs (100 % copied): {long:.1%} (α = {args.alpha:.0%})"
    )
    return max(shares, default=0.0) <= args.alpha and long <= args.alpha


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--healthy-runs", type=int, default=1000)
    parser.add_argument("--doubled-runs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--per-step", type=int, default=400)
    parser.add_argument("--look", type=int, default=50)
    parser.add_argument("--cap", type=int, default=40_000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--shadow-runs", type=int, default=1000)
    parser.add_argument("--shadow-requests", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--shadow-share", type=float, default=0.2)
    parser.add_argument("--long-pairs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20240611)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    started = time.perf_counter()
    killed = sum(
        healthy_run(rng, args.rate, args.per_step, args.look, args.alpha) for _ in range(args.healthy_runs)
    )
    share = killed / args.healthy_runs
    print(
        f"healthy canaries: {killed}/{args.healthy_runs} killed = {share:.1%} "
        f"(α = {args.alpha:.0%}, steps {'→'.join(f'{s:.0%}' for s in STEPS)}, {args.per_step} candidate "
        f"requests per step, look every {args.look}) [{time.perf_counter() - started:.1f} s]"
    )

    started = time.perf_counter()
    times = [
        requests_to_kill(rng, 0.10, args.rate, 2 * args.rate, args.look, args.cap, args.alpha)
        for _ in range(args.doubled_runs)
    ]
    median = median_or_none(times)
    survived = sum(t is None for t in times) / len(times)
    median_text = "not reached" if median is None else f"{median:,.0f}"
    print(
        f"doubled invalid rate ({args.rate:.0%} → {2 * args.rate:.0%}) at a 10% share: median requests to "
        f"kill = {median_text}, not killed within {args.cap:,} = {survived:.1%} "
        f"({args.doubled_runs} runs) [{time.perf_counter() - started:.1f} s]"
    )

    started = time.perf_counter()
    shadow_ok = print_shadow_figures(args)
    print(f"[{time.perf_counter() - started:.1f} s]")
    return 0 if share <= args.alpha and median is not None and median <= 2_500 and shadow_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
