"""The per-request record: the one row written per request, plain data filled in along the request path (its cost
comes from `pricing.cost`), and one per shadow copy (`shadow.copies`). Pure: the request log that stores it is
`store.request_log`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gateway.pricing import Price, cost

if TYPE_CHECKING:
    from gateway.toolcalls import Verdict


@dataclass(slots=True)
class Record:
    """The one row written per request; every exit path of the request path produces exactly one."""

    ts: float  # epoch seconds at request start
    request_id: str
    key_name: str | None = None  # the client API key's name
    tenant: str | None = None
    route: str | None = None
    variant: str | None = None
    engine_model: str | None = None
    adapter: str | None = None  # "name@version" when the variant serves an adapter
    stream: bool = False
    status: int = 0  # HTTP status sent to the client (200 for a stream even if it failed mid-way)
    # ok | client_error | engine_error | engine_timeout | no_live_variant | invalid_tool_call |
    # client_disconnected | stream_error | gateway_error | server_shutdown (cut at the drain deadline)
    outcome: str = "ok"
    error_code: str | None = None
    # The variant chosen first, when another one answered instead: it failed before its first byte (reason: the
    # error code) or, in enforce mode, returned an invalid tool call (reason: the verdict's reason).
    fallback_from: str | None = None
    fallback_reason: str | None = None
    engine_first_byte_s: float | None = None
    e2e_s: float | None = None
    ttft_s: float | None = None  # streams: time to first token
    tpot_s: float | None = None  # streams: mean time per output token after the first
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: float | None = None
    currency: str | None = None
    tool_verdict: str = "none"  # valid | invalid | none | truncated
    tool_reason: str | None = None
    tool_path: str | None = None
    tool_detail: str | None = None
    tool_calls: int = 0
    tool_choice: str | None = None
    share: float | None = None  # the variant's routing share at that moment (0..1)
    policy_version: str | None = None
    retrieval_s: float | None = None
    # Added by schema version 2 (the canary analysis): whether the client named the variant (x-gateway-variant),
    # so the request was not placed by policy; and the sticky key's bucket in [0, 1) (None without a key), which
    # identifies a user for a per-user analysis without storing the key.
    forced: bool = False
    bucket: float | None = None
    # Added by schema version 3 (engine pools): the URL of the pool member that answered, or the last one tried
    # when none did (None when no engine was asked).
    engine_url: str | None = None
    # Added by schema version 4 (shadow traffic): a shadow copy's answer (or a copy dropped, outcome
    # `shadow_dropped`), never returned to anyone, and the request id of the request it copied. Served-traffic
    # figures (reports, canaries, the metrics' shadow="false" series) never include these.
    shadow: bool = False
    primary_id: str | None = None

    def note_usage(self, price: Price | None, usage: object) -> None:
        """An answer came: the engine's token counts (when it gave them), their cost at `price`, status 200."""
        if isinstance(usage, dict):
            self.input_tokens = usage.get("prompt_tokens")
            self.output_tokens = usage.get("completion_tokens")
        self.cost = cost(price, self.input_tokens, self.output_tokens)
        self.currency = price.currency if price else None
        self.status = 200

    def note_verdict(self, verdict: Verdict, tool_choice: str | None) -> None:
        self.tool_verdict, self.tool_reason = verdict.status, verdict.reason
        self.tool_path, self.tool_detail, self.tool_calls = verdict.path, verdict.detail, verdict.calls
        self.tool_choice = tool_choice


SHADOW_DROPPED: Final = "shadow_dropped"  # the outcome of a shadow copy's record when the copy was not sent
FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(Record))
