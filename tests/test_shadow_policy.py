"""`[shadow]` in a route's policy: the issue's example loads as written; every bad value is refused naming the file
and the field; the per-request decision copies the policy's share, never the variant that serves the request, and
never a killed one; and the routing itself (slices, shares, sticky buckets) is exactly what it is without a shadow."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.control.adapters import scan
from gateway.control.policies import load_policies
from gateway.errors import ConfigError
from gateway.policy import PolicySnapshot, ShadowSpec, Switches, Timeouts, bucket, plan, with_pins
from tests.adapter_factory import adapter_policy, make_adapter
from tests.conftest import CRM_POLICY

ENGINES = {"default": "http://127.0.0.1:8001"}
DEFAULTS = Timeouts(2.0, 60.0, 300.0)

# Exactly as in issue 13.
ISSUE_SHADOW = """
[shadow]
variant = "formatter"        # gets copies; must be a variant of this route (weight 0 is typical)
share = 20                   # percent of the route's requests copied, decided per request
max_in_flight = 8            # per gateway process; over it the copy is dropped and counted, never queued
max_cost_per_hour = 0.50     # in the variant's price currency; over it copies stop until the hour turns
stream = "as_sent"           # "as_sent" (a streamed request is shadowed as a stream) or "non_stream"
"""


def load(tmp_path: Path, text: str) -> PolicySnapshot:
    (tmp_path / "crm.toml").write_text(text)
    return load_policies(tmp_path, ENGINES, DEFAULTS)


def test_the_issue_example_loads_as_written(tmp_path: Path) -> None:
    route = load(tmp_path, CRM_POLICY + ISSUE_SHADOW).routes["crm-assistant"]
    assert route.shadow == ShadowSpec("formatter", 20.0, 8, 0.50, "as_sent")
    minimal = load(tmp_path, CRM_POLICY + '[shadow]\nvariant = "formatter"\nshare = 2.5\n')
    assert minimal.routes["crm-assistant"].shadow == ShadowSpec("formatter", 2.5, 8, None, "as_sent")
    assert load(tmp_path, CRM_POLICY).routes["crm-assistant"].shadow is None


BAD = [
    ('variant = "formatter"', 'variant = "nope"', "shadow.variant: 'nope' is not a variant of this route"),
    ('variant = "formatter"', 'variant = "bad name"', "shadow.variant"),
    ("share = 20", "share = 101", "shadow.share"),
    ("share = 20", "share = -1", "shadow.share"),
    ("share = 20", 'share = "20"', "shadow.share"),
    ("share = 20", "share = true", "shadow.share"),
    ("share = 20", "share = nan", "shadow.share"),
    ("max_in_flight = 8", "max_in_flight = 0", "shadow.max_in_flight"),
    ("max_in_flight = 8", "max_in_flight = 2.5", "shadow.max_in_flight"),
    ("max_cost_per_hour = 0.50", "max_cost_per_hour = 0", "shadow.max_cost_per_hour"),
    ("max_cost_per_hour = 0.50", "max_cost_per_hour = inf", "shadow.max_cost_per_hour"),
    ('stream = "as_sent"', 'stream = "always"', "shadow.stream"),
    ('stream = "as_sent"', 'stream = "as_sent"\nburst = 3', "shadow.burst"),
    ('variant = "formatter"        #', "#", "shadow.variant: Field required"),
    ("share = 20", "#", "shadow.share: Field required"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD)
def test_bad_values_are_refused_naming_the_file_and_field(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in ISSUE_SHADOW
    with pytest.raises(ConfigError) as err:
        load(tmp_path, CRM_POLICY + ISSUE_SHADOW.replace(old, new, 1))
    assert message in err.value.message and "crm.toml" in err.value.message


def test_a_budget_needs_a_priced_shadow_variant(tmp_path: Path) -> None:
    unpriced = CRM_POLICY.replace(
        'price = { input_per_mtok = 0.30, output_per_mtok = 0.90, currency = "EUR" }', ""
    )
    with pytest.raises(ConfigError, match=r"shadow\.max_cost_per_hour: variant 'formatter' has no price"):
        load(tmp_path, unpriced + ISSUE_SHADOW)
    no_budget = ISSUE_SHADOW.replace("max_cost_per_hour = 0.50", "")
    assert load(tmp_path, unpriced + no_budget).routes["crm-assistant"].shadow is not None


def test_a_shadow_adapter_is_not_release_gated(tmp_path: Path) -> None:
    """A copy reaches nobody: a version the gate refuses for traffic may still answer copies (that is the point)."""
    adapters = tmp_path / "adapters"
    make_adapter(adapters, "crm-formatter", "3", invalid_rate=0.6)
    shadow = '[shadow]\nvariant = "formatter"\nshare = 10\n'
    (tmp_path / "crm.toml").write_text(adapter_policy("3", weight=0) + shadow)
    route = load_policies(tmp_path, ENGINES, DEFAULTS, scan(adapters)).routes["crm-assistant"]
    assert route.shadow is not None and route.variant("formatter") is not None
    (tmp_path / "crm.toml").write_text(adapter_policy("3", weight=5) + shadow)
    with pytest.raises(ConfigError, match="release gate"):  # taking traffic, it is gated as ever
        load_policies(tmp_path, ENGINES, DEFAULTS, scan(adapters))


GRID = [i / 10_000 for i in range(10_000)]  # draws spread evenly over [0, 1)


def test_the_decision_copies_the_policys_share_of_requests(tmp_path: Path) -> None:
    shadowed = load(tmp_path, CRM_POLICY + ISSUE_SHADOW).routes["crm-assistant"]
    shadow = plan(shadowed, Switches()).shadow
    assert shadow is not None and shadow.variant.name == "formatter" and not shadow.killed
    assert sum(shadow.decide(u, "baseline") == "copy" for u in GRID) == 2_000  # 20 %
    # A request the shadow variant serves itself is not copied: there would be nothing to compare.
    assert {shadow.decide(u, "formatter") for u in GRID} == {None}
    for share, expected in ((0, 0), (100, 10_000), (0.5, 50)):
        text = CRM_POLICY + ISSUE_SHADOW.replace("share = 20", f"share = {share}")
        p = plan(load(tmp_path, text).routes["crm-assistant"], Switches()).shadow
        assert p is not None and sum(p.decide(u, "baseline") == "copy" for u in GRID) == expected


def test_kill_switches_stop_the_copies_and_say_so(tmp_path: Path) -> None:
    route = load(tmp_path, CRM_POLICY + ISSUE_SHADOW).routes["crm-assistant"]
    for switches in (
        Switches(variants=frozenset({("crm-assistant", "formatter")})),
        Switches(routes=frozenset({"crm-assistant"})),
        Switches(global_kill=True),
    ):
        shadow = plan(route, switches).shadow
        assert shadow is not None and shadow.killed
        assert {shadow.decide(u, "baseline") for u in GRID} == {"killed", None}
        assert sum(shadow.decide(u, "baseline") == "killed" for u in GRID) == 2_000
    other = plan(route, Switches(variants=frozenset({("crm-assistant", "baseline")}))).shadow
    assert other is not None and not other.killed


def test_the_routing_is_the_same_with_or_without_a_shadow(tmp_path: Path) -> None:
    """The split, the shares and every sticky user's variant do not depend on a `[shadow]`."""
    without = load(tmp_path, CRM_POLICY).routes["crm-assistant"]
    shadowed = load(tmp_path, CRM_POLICY + ISSUE_SHADOW.replace("share = 20", "share = 100")).routes[
        "crm-assistant"
    ]
    for switches in (Switches(), Switches(variants=frozenset({("crm-assistant", "formatter")}))):
        a, b = plan(without, switches), plan(shadowed, switches)
        assert (a.bounds, a.shares, a.alive, a.fallback) == (b.bounds, b.shares, b.alive, b.fallback)
        assert [a.decide(u).variant.name for u in GRID] == [b.decide(u).variant.name for u in GRID]
        users = [bucket(f"user-{i}", shadowed.salt) for i in range(1000)]
        assert [a.decide(u).variant.name for u in users] == [b.decide(u).variant.name for u in users]


def test_a_shadow_follows_an_adapter_swap(tmp_path: Path) -> None:
    """The copy goes to what the variant serves now: a pinned adapter version, not the file's."""
    adapters = tmp_path / "adapters"
    for version in ("2", "3"):
        make_adapter(adapters, "crm-formatter", version, invalid_rate=0.0 if version == "2" else 0.6)
    (tmp_path / "crm.toml").write_text(
        adapter_policy("2", weight=0) + '[shadow]\nvariant = "formatter"\nshare = 5\n'
    )
    policy = load_policies(tmp_path, ENGINES, DEFAULTS, scan(adapters))
    pinned = with_pins(policy, {("crm-assistant", "formatter"): "crm-formatter@3"})
    shadow = plan(pinned.routes["crm-assistant"], Switches()).shadow
    assert shadow is not None and shadow.variant.adapter == "crm-formatter@3"
