"""The traffic decision: properties that users of sticky canary routing rely on."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import NoLiveVariant, NotFound
from gateway.policy import Route, Switches, Variant, bucket, plan

NAMES = ["baseline", "formatter", "v3", "v4", "v5"]


def route_of(weights: list[float], fallback: tuple[str, ...] = ("baseline",)) -> Route:
    variants = tuple(Variant(NAMES[i], f"m{i}", "default", w) for i, w in enumerate(weights))
    return Route("crm", variants, fallback=fallback)


weights_st = st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=5).filter(
    lambda w: sum(w) > 0
)
keys_st = st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50, unique=True)


@given(weights_st, st.data())
def test_a_killed_variant_is_never_chosen(weights: list[float], data: st.DataObject) -> None:
    route = route_of(weights)
    killed = data.draw(st.sets(st.sampled_from(NAMES[: len(weights)])))
    p = plan(route, Switches(variants=frozenset(("crm", k) for k in killed)))
    for u in data.draw(st.lists(st.floats(min_value=0, max_value=1, exclude_max=True), min_size=1)):
        try:
            decision = p.decide(u)
        except NoLiveVariant:
            assert all(n in killed for n, w in zip(NAMES, weights, strict=False) if w > 0)
            continue
        assert decision.variant.name not in killed


@given(weights_st, st.data())
def test_a_forced_killed_variant_is_never_served(weights: list[float], data: st.DataObject) -> None:
    route = route_of(weights)
    victim = data.draw(st.sampled_from(NAMES[: len(weights)]))
    p = plan(route, Switches(variants=frozenset({("crm", victim)})))
    with contextlib.suppress(NoLiveVariant):  # nothing left alive at all: refusing is right too
        assert p.decide(0.5, forced=victim).variant.name != victim


@given(weights_st, keys_st)
def test_the_same_key_always_gets_the_same_variant(weights: list[float], keys: list[str]) -> None:
    p = plan(route_of(weights), Switches())
    first = [p.decide(bucket(k, "salt")).variant.name for k in keys]
    again = [plan(route_of(weights), Switches()).decide(bucket(k, "salt")).variant.name for k in keys]
    assert first == again


def test_buckets_are_uniform_and_salted() -> None:
    values = [bucket(f"user-{i}", "crm") for i in range(20_000)]
    assert all(0 <= v < 1 for v in values)
    for lo in (0.0, 0.25, 0.5, 0.75):
        share = sum(lo <= v < lo + 0.25 for v in values) / len(values)
        assert share == pytest.approx(0.25, abs=0.015)
    assert bucket("user-1", "crm") != bucket("user-1", "other-route")


@settings(max_examples=40)
@given(weights_st)
def test_the_observed_split_follows_the_weights(weights: list[float]) -> None:
    p = plan(route_of(weights), Switches())
    rng = random.Random(7)
    n = 20_000
    counts: dict[str, int] = {}
    for _ in range(n):
        name = p.decide(rng.random()).variant.name
        counts[name] = counts.get(name, 0) + 1
    total = sum(weights)
    for name, w in zip(NAMES, weights, strict=False):
        expected = w / total
        # 4 sigma, plus a few counts: for a share of ~1e-5 the count is Poisson, not normal (3 hits where 0.2 are
        # expected is not a broken split).
        tolerance = 4 * (expected * (1 - expected) / n) ** 0.5 + 5 / n
        assert counts.get(name, 0) / n == pytest.approx(expected, abs=tolerance)


@given(weights_st, st.data(), keys_st)
def test_raising_a_variants_weight_keeps_its_users(
    weights: list[float], data: st.DataObject, keys: list[str]
) -> None:
    i = data.draw(st.integers(0, len(weights) - 1))
    raised = list(weights)
    raised[i] += data.draw(st.floats(min_value=0.1, max_value=1000))
    before = plan(route_of(weights), Switches())
    after = plan(route_of(raised), Switches())
    for k in keys:
        u = bucket(k, "s")
        if before.decide(u).variant.name == NAMES[i]:
            assert after.decide(u).variant.name == NAMES[i]


@given(st.floats(1, 99), st.floats(0.5, 50), keys_st)
def test_with_two_variants_raising_one_only_moves_users_into_it(
    w: float, step: float, keys: list[str]
) -> None:
    before = plan(route_of([100 - w, w]), Switches())
    after = plan(route_of([max(100 - w - step, 0.01), w + step]), Switches())
    for k in keys:
        u = bucket(k, "s")
        a, b = before.decide(u).variant.name, after.decide(u).variant.name
        assert a == b or b == "formatter"


@given(weights_st, st.data(), keys_st)
def test_kill_moves_only_the_killed_variants_users_and_revive_restores(
    weights: list[float], data: st.DataObject, keys: list[str]
) -> None:
    victim = data.draw(
        st.sampled_from(
            [n for n, w in zip(NAMES, weights, strict=False) if w > 0 and n != "baseline"] or ["baseline"]
        )
    )
    route = route_of(weights)
    normal = plan(route, Switches())
    killed = plan(route, Switches(variants=frozenset({("crm", victim)})))
    revived = plan(route, Switches())
    for k in keys:
        u = bucket(k, "s")
        was, now = normal.decide(u).variant.name, None
        try:
            now = killed.decide(u).variant.name
        except NoLiveVariant:
            continue
        if was != victim:
            assert now == was
        elif victim != "baseline":
            assert now == "baseline"  # the route's first live fallback
        assert revived.decide(u).variant.name == was


def test_effective_shares_move_a_killed_share_to_the_fallback() -> None:
    route = route_of([90, 10])
    p = plan(route, Switches(variants=frozenset({("crm", "formatter")})))
    assert p.shares["baseline"] == pytest.approx(1.0)
    assert "formatter" not in p.shares  # a killed variant serves nothing
    assert plan(route, Switches()).shares == {"baseline": pytest.approx(0.9), "formatter": pytest.approx(0.1)}


def test_route_and_global_kill_send_everything_to_the_fallback() -> None:
    route = route_of([50, 50])
    for switches in (Switches(routes=frozenset({"crm"})), Switches(global_kill=True)):
        p = plan(route, switches)
        assert {p.decide(u / 100).variant.name for u in range(100)} == {"baseline"}
        assert p.decide(0.9, forced="formatter").variant.name == "baseline"


def test_no_live_variant_raises_503() -> None:
    route = route_of([50, 50], fallback=())
    with pytest.raises(NoLiveVariant) as err:
        plan(route, Switches(routes=frozenset({"crm"}))).decide(0.3)
    assert err.value.status == 503
    both = Switches(variants=frozenset({("crm", "baseline"), ("crm", "formatter")}))
    with pytest.raises(NoLiveVariant):
        plan(route_of([50, 50]), both).decide(0.3)


def test_without_a_live_fallback_a_killed_share_spreads_over_the_live_variants() -> None:
    route = route_of([50, 25, 25])
    p = plan(route, Switches(variants=frozenset({("crm", "baseline")})))
    assert p.shares["formatter"] == pytest.approx(0.5)
    assert p.shares["v3"] == pytest.approx(0.5)


def test_forcing_an_unknown_variant_is_a_404() -> None:
    with pytest.raises(NotFound):
        plan(route_of([1]), Switches()).decide(0.1, forced="nope")


def test_a_zero_weight_variant_is_served_only_when_forced() -> None:
    p = plan(route_of([100, 0]), Switches())
    assert {p.decide(u / 50).variant.name for u in range(50)} == {"baseline"}
    assert p.decide(0.2, forced="formatter").variant.name == "formatter"
