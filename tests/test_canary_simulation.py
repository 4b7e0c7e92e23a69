"""The issue's evidence that the canary's decisions are sound, over the gateway's own decision code
(loadtests/canary_rollouts.py drives `Evidence`, `look` and `after_look` as the controller does):
- 1,000 healthy canaries through steps 5 → 10 → 25 → 50 → 100 % with the issue's minimums and both rate guardrails:
  automatic kills at most 5 %;
- a candidate with twice the baseline's invalid rate at a 10 % share: killed within 2,500 route requests at the
  median;
- what a shadow phase buys (loadtests/canary_simulation.py, figure 3): a doubled invalid rate exposes fewer users
  before its kill, a long enough phase kills most such candidates before anyone is served, and it kills healthy
  candidates at most about α of the time.
The figures are printed (outside pytest's capture) so CI logs show them."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.canary_rollouts import doubled_median, healthy_kill_share
from loadtests.canary_simulation import Setup, exposure, exposure_percentiles, healthy_shadow_kills


def test_healthy_canaries_are_killed_at_most_5_percent_and_a_doubled_rate_within_2500_requests(
    capsys: pytest.CaptureFixture[str],
) -> None:
    share, outcomes = healthy_kill_share(1000, seed=4)
    median, doubled = doubled_median(400, seed=5)
    promoted = sum(o.end == "promoted" for o in outcomes)
    with capsys.disabled():
        print(
            f"\ncanary simulation: {share:.1%} of 1,000 healthy canaries killed automatically "
            f"({promoted} promoted); doubled invalid rate at 10 %: killed after a median {median:,.0f} requests "
            f"({sum(o.end == 'killed' for o in doubled)}/400 killed)"
        )
    assert share <= 0.05
    assert promoted == 1000 - round(share * 1000)  # every healthy canary that was not killed got promoted
    assert median is not None and median <= 2500


def test_a_shadow_phase_spares_users_a_doubled_invalid_rate(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(13)
    setup = Setup(rate=0.05, share=0.2)
    runs = 200
    without = [exposure(rng, setup, 0.10, None) for _ in range(runs)]
    short = [exposure(rng, setup, 0.10, 300) for _ in range(runs)]
    long = [exposure(rng, setup, 0.10, 1000) for _ in range(runs)]
    healthy = healthy_shadow_kills(rng, setup, 1000, 400)
    medians = [exposure_percentiles(o)[50] for o in (without, short, long)]
    caught = [sum(o.killed_in_shadow for o in outcomes) for outcomes in (short, long)]
    with capsys.disabled():
        print(
            f"\nshadow phase against a doubled invalid rate ({runs} canaries): median users exposed "
            f"{medians[0]:.0f} without, {medians[1]:.0f} with 300 pairs ({caught[0]} killed in the phase), "
            f"{medians[2]:.0f} with 1,000 pairs ({caught[1]} killed in the phase); healthy candidates killed in a "
            f"1,000-pair phase: {healthy:.1%}"
        )
    assert all(o.exposed is not None and o.exposed > 0 for o in without)  # every one killed, after exposure
    assert medians[1] < medians[0] and medians[2] == 0
    assert caught[1] >= 0.85 * runs  # killed before anyone was served
    assert healthy <= 0.08  # α = 5 % bounds it; 400 runs leave room for chance
