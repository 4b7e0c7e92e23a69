"""Simulated canaries for the anytime-valid count test (gateway/canary_stats.py, docs/canary-statistics.md §1).

Two figures, seeded and reproducible:
  1. Healthy canaries (candidate and baseline both `--rate` invalid, 5 % by default), routed on the step schedule
     5 → 10 → 25 → 50 → 100 % with `--per-step` (400) candidate requests per step, looked at every `--look`
     (50) requests, α = 0.05: the share killed, which Ville's inequality bounds by α (target ≤ 5 %).
  2. A candidate with twice the baseline's invalid rate at a fixed 10 % share, looked at every 50 requests up to
     `--cap` (40,000) requests: the median number of requests until the kill (target ≤ 2,500), and the share
     never killed within the cap.
Each request is routed by one uniform draw against the share in force, then is invalid by a second draw; every
invalid event updates the test once (`CountTest.observe`, O(grid) per event), so a run costs O(requests).

    .venv/bin/python loadtests/canary_simulation.py [--healthy-runs 1000] [--doubled-runs 1000] [--seed 20240611]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

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
    return 0 if share <= args.alpha and median is not None and median <= 2_500 else 1


if __name__ == "__main__":
    raise SystemExit(main())
