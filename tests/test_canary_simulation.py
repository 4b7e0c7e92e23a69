"""The issue's evidence that the canary's decisions are sound, over the gateway's own decision code
(loadtests/canary_rollouts.py drives `Evidence`, `look` and `after_look` as the controller does):
- 1,000 healthy canaries through steps 5 → 10 → 25 → 50 → 100 % with the issue's minimums and both rate guardrails:
  automatic kills at most 5 %;
- a candidate with twice the baseline's invalid rate at a 10 % share: killed within 2,500 route requests at the
  median.
Both figures are printed (outside pytest's capture) so CI logs show them."""

from __future__ import annotations

import pytest

from loadtests.canary_rollouts import doubled_median, healthy_kill_share


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
