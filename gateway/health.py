"""`StoreHealth`: whether the store answered the last time this process asked (its heartbeat asks every
`GATEWAY_HEARTBEAT_S`). While it does not, the gateway is degraded, not down: requests are served with the last
switches and policy it knows, records wait (in memory, then in spill files), and operators' changes are refused
(503) because they could not be made durable. `/readyz` and `/metrics` show it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StoreHealth:
    up: bool = True
    error: str | None = None
    since: float = 0.0  # when it last changed between up and down (epoch seconds)

    def answered(self, now: float) -> None:
        if not self.up:
            self.up, self.error, self.since = True, None, now

    def failed(self, error: str, now: float) -> None:
        if self.up:
            self.since = now
        self.up, self.error = False, error
