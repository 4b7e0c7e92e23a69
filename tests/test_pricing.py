"""gateway/pricing.py: what one request costs."""

from __future__ import annotations

import pytest

from gateway.pricing import Price, cost


def test_cost_is_tokens_times_price_per_million() -> None:
    price = Price(input_per_mtok=3.0, output_per_mtok=15.0, currency="USD")
    assert cost(price, 1_000, 2_000) == pytest.approx((1_000 * 3.0 + 2_000 * 15.0) / 1e6)
    assert cost(price, 1_000_000, 0) == pytest.approx(3.0)
    assert cost(price, 0, 0) == 0.0


@pytest.mark.parametrize(("input_tokens", "output_tokens"), [(None, 10), (10, None), (None, None)])
def test_cost_is_unknown_without_usage(input_tokens: int | None, output_tokens: int | None) -> None:
    assert cost(Price(1.0, 2.0, "USD"), input_tokens, output_tokens) is None


def test_cost_is_unknown_without_price() -> None:
    assert cost(None, 10, 10) is None
