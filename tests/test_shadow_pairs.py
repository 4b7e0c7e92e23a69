"""The shadow comparison on hand-made records: which records pair, and each figure against a value worked out by
hand (the formulas themselves: tests/test_stats.py)."""

from __future__ import annotations

import math

import orjson
import pytest

from gateway.records import Record
from gateway.shadow.pairs import as_dict, format_text, summarize, to_json
from gateway.stats import Paired, paired_difference_ci, wilson


def served(i: int, **fields: object) -> Record:
    base: dict[str, object] = {"ts": 100.0 + i, "request_id": f"r{i}", "route": "crm", "variant": "baseline"}
    return Record(**{**base, **fields})  # type: ignore[arg-type]


def copy(i: int, **fields: object) -> Record:
    base: dict[str, object] = {
        "ts": 100.0 + i + 0.001,
        "request_id": f"r{i}-shadow",
        "route": "crm",
        "variant": "candidate",
        "shadow": True,
        "primary_id": f"r{i}",
    }
    return Record(**{**base, **fields})  # type: ignore[arg-type]


def verdict(invalid: bool) -> str:
    return "invalid" if invalid else "valid"


# 20 pairs: both invalid in 1, only served in 1, only the shadow in 10, neither in 8.
INVALID = [(True, True), (True, False)] + [(False, True)] * 10 + [(False, False)] * 8


def known() -> list[Record]:
    records = []
    for i, (p, s) in enumerate(INVALID):
        records.append(served(i, tool_verdict=verdict(p), e2e_s=0.1 * (i + 1), cost=0.002, currency="EUR"))
        records.append(copy(i, tool_verdict=verdict(s), e2e_s=0.2 * (i + 1), cost=0.001, currency="EUR"))
    return records


def test_the_figures_on_a_known_table() -> None:
    (s,) = summarize(known())
    assert (s.route, s.variant, s.pairs, s.copies, s.unpaired, s.checked_pairs) == (
        "crm",
        "candidate",
        20,
        20,
        0,
        20,
    )
    assert s.table == {"n11": 1, "n10": 1, "n01": 10, "n00": 8}
    assert (s.served.invalid, s.served.invalid_rate, s.shadow.invalid, s.shadow.invalid_rate) == (
        2,
        0.1,
        11,
        0.55,
    )
    assert s.served.invalid_ci == wilson(2, 20) and s.shadow.invalid_ci == wilson(11, 20)
    assert s.difference == pytest.approx(0.45)  # (10 − 1) / 20
    assert s.difference_ci == paired_difference_ci(Paired(1, 1, 10, 8))
    assert 0 < s.difference_ci[0] < 0.45 < s.difference_ci[1]
    # 11 discordant pairs: the exact test, 2 × (C(11, 0) + C(11, 1)) / 2^11.
    assert s.mcnemar_method == "exact" and s.mcnemar_p == pytest.approx(2 * 12 / 2048)
    # e2e 0.1 … 2.0 s served, twice that shadowed: p50 1.05 s (type 7), every ratio 2.
    assert s.served.e2e["p50"] == pytest.approx(1.05) and s.shadow.e2e["p50"] == pytest.approx(2.1)
    assert s.latency_ratio == {
        "p50": pytest.approx(2.0),
        "p95": pytest.approx(2.0),
        "p99": pytest.approx(2.0),
    }
    assert s.served.cost_per_1k == {"EUR": pytest.approx(2.0)} and s.shadow.cost_per_1k == {
        "EUR": pytest.approx(1.0)
    }
    assert (s.served.errors, s.shadow.errors, s.drops, s.served_by) == (0, 0, {}, {"baseline": 20})


def test_what_pairs_and_what_does_not() -> None:
    records = [
        served(0, tool_verdict="valid"),
        copy(0, tool_verdict="invalid"),
        copy(1, tool_verdict="invalid"),  # its primary is outside the records read (before the window)
        served(2, route="other"),
        copy(2, tool_verdict="invalid"),  # an id of another route's request is no pair
        copy(3, outcome="shadow_dropped", error_code="in_flight_limit"),
        copy(4, outcome="shadow_dropped", error_code="in_flight_limit"),
        copy(5, outcome="shadow_dropped", error_code="killed"),
        # A caller reused a request id: the copy pairs with the request closest to it in time.
        served(7, request_id="same", ts=50.0, tool_verdict="invalid"),
        served(8, request_id="same", ts=200.0, tool_verdict="valid"),
        copy(8, primary_id="same", ts=200.002, tool_verdict="valid"),
    ]
    (s,) = summarize(records)
    assert (s.copies, s.pairs, s.unpaired) == (4, 2, 2)
    assert s.drops == {"in_flight_limit": 2, "killed": 1}
    assert s.table == {"n11": 0, "n10": 0, "n01": 1, "n00": 1}  # the reused id paired with the valid request


def test_a_pair_counts_for_a_figure_only_when_both_sides_have_it() -> None:
    records = [
        served(0, tool_verdict="valid", e2e_s=0.1),
        copy(0, tool_verdict="none", e2e_s=0.2),  # no tool call: not in the invalid comparison
        served(1, tool_verdict="invalid", e2e_s=0.1),
        copy(1, outcome="engine_error", e2e_s=0.05),  # failed: an error, and no latency sample
        served(2, tool_verdict="valid", e2e_s=0.3, outcome="client_disconnected"),
        copy(2, tool_verdict="invalid", e2e_s=0.6),
    ]
    (s,) = summarize(records)
    assert (s.pairs, s.checked_pairs, s.latency_pairs) == (3, 1, 1)
    assert (s.served.errors, s.shadow.errors) == (0, 1)
    assert s.served.e2e["p50"] == 0.1 and s.shadow.e2e["p50"] == 0.2
    assert s.difference == 1.0 and s.mcnemar_p == 1.0  # one discordant pair proves nothing
    assert s.served.cost_per_1k == {}


def test_routes_and_shadow_variants_are_summarized_apart_and_in_order() -> None:
    records = [served(0), copy(0, variant="v2"), served(1, route="a"), copy(1, route="a"), served(2), copy(2)]
    assert [(s.route, s.variant, s.pairs) for s in summarize(records)] == [
        ("a", "candidate", 1),
        ("crm", "candidate", 1),
        ("crm", "v2", 1),
    ]
    assert summarize([served(0), served(1)]) == []


def test_no_pairs_gives_no_figures_rather_than_zeros() -> None:
    (s,) = summarize([copy(0), copy(1, outcome="shadow_dropped", error_code="budget")])
    assert (s.pairs, s.difference, s.difference_ci, s.served.invalid_rate) == (0, None, (-1.0, 1.0), None)
    assert s.latency_ratio == {"p50": None, "p95": None, "p99": None}
    text = format_text([s])
    assert "0 pairs (1 copies, 1 unpaired" in text and "dropped: budget 1" in text and "n/a" in text


def test_renderings() -> None:
    (s,) = summarize(known())
    text = format_text([s])
    assert text.startswith("shadow crm: candidate, 20 pairs (20 copies, 0 unpaired; served by baseline 20)")
    assert "2/20 10.0%" in text and "11/20 55.0%" in text and "2.00×" in text and "2.00 EUR" in text
    assert (
        "+45.0 points" in text
        and "McNemar p = 0.012 (exact; 1 pairs invalid only served, 10 only shadow)" in text
    )
    data = as_dict(s)
    assert data["difference_ci"] == list(s.difference_ci) and data["table"]["n01"] == 10
    assert orjson.loads(to_json([s])) == [data]
    assert not any(isinstance(v, float) and math.isnan(v) for v in data.values())
    assert format_text([]) == ""
