"""A variant's price table and what one request cost. Pure: plain data and arithmetic, no I/O.

`Price` is part of a variant's definition (`policy.Variant.price`, read from the policy files and from a load
test's scenario); `cost()` turns a request's token usage into money with it, for the request log and the load
test's figures alike. It lives apart from `records`, which owns the request log's writer thread, so that the
pure core (`policy`) imports nothing that does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Price:
    """A variant's price table, per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    currency: str


def cost(price: Price | None, input_tokens: int | None, output_tokens: int | None) -> float | None:
    """Cost of one request, or None when it cannot be known: (input × input price + output × output price) / 10⁶.

    A missing price or a missing token count gives None rather than a partial figure: a cost that silently
    leaves out one side would make a variant look cheaper than it is.
    """
    if price is None or input_tokens is None or output_tokens is None:
        return None
    return (input_tokens * price.input_per_mtok + output_tokens * price.output_per_mtok) / 1_000_000
