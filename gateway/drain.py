"""A gateway process's graceful shutdown, as state: whether it is draining, and the deadline at which the
requests still running are ended. The chat endpoint, the rest of the app (`Connection: close`, `/readyz`) and the
server (`app.DrainingServer`) all read this one flag.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("gateway.drain")


class Drain:
    """The gateway's side of a graceful shutdown. `begin()` marks the process as draining (responses carry
    `Connection: close`, `/readyz` answers 503) and arms the deadline, `seconds` later, at which `at_deadline`
    ends the requests still running. Idempotent; `close()` disarms it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # the event loop's time at the deadline, once draining

    @property
    def keep_alive_grace_s(self) -> float:
        """How long idle keep-alive connections stay open once draining, for a request already on its way."""
        return min(1.0, self.seconds / 2)

    def remaining(self) -> float:
        """Seconds left before the deadline once draining; before, the whole drain time (a shutdown that did not
        go through `begin`, e.g. an app whose lifespan simply ends, gives its work that long)."""
        if self._deadline is None:
            return self.seconds
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def begin(self, at_deadline: Callable[[], None]) -> None:
        if self.draining:
            return
        self.draining = True
        log.warning("draining: requests in flight have %g s to finish", self.seconds)
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.seconds
        self._timer = loop.call_later(self.seconds, at_deadline)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
