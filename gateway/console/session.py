"""Who is signed in to the console: the token check and its throttle, the signed session cookie, the CSRF token and
the same-origin check on state-changing requests.

- Sign-in takes the admin token (may act) or the viewer token (may only look), each compared in constant time,
  every configured token every time, so a failed sign-in tells nothing of which kinds exist.
- The session is a cookie `role.expiry.sid.signature`: HMAC-SHA256 over the first three and the SHA-256 of the
  role's token, keyed by `GATEWAY_CONSOLE_SECRET`, or by a key derived from the tokens when that is unset (every
  replica sharing the tokens then accepts the others' sessions). A changed token or secret ends its sessions; an
  expired or altered cookie is no session, nor is one whose session id `ended` says was signed out (the ids come
  from the state store, so a sign-out on one replica holds on all of them).
- `Throttle` counts failed sign-ins per client address: past its limit an address is refused, even with a right
  token, until its oldest failure in the window is old enough (that is what stops guessing).
- The CSRF token is an HMAC of the session's random id: every POST carries it as a form field, and it is worth
  nothing in another session.
- A POST must also come from the console's own origin: its `Origin` header (else its `Referer`) must name the host
  the request was sent to. Pages are served with `Referrer-Policy: same-origin`, not `no-referrer`: under
  `no-referrer` browsers send `Origin: null` on a page's own form posts, which this check must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import urlsplit

Role = Literal["admin", "viewer"]
COOKIE: Final = "gateway_console"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Token:
    role: Role
    name: str  # the token's name: the console's actor in the audit log is `console:<name>`
    secret: str


@dataclass(frozen=True, slots=True)
class Principal:
    """A signed-in session."""

    role: Role
    name: str
    expires: float
    sid: str  # random per sign-in; the CSRF token is bound to it

    @property
    def may_act(self) -> bool:
        return self.role == "admin"

    @property
    def actor(self) -> str:
        return f"console:{self.name}"


class Sessions:
    def __init__(
        self,
        tokens: list[Token],
        *,
        secret: str | None,
        lifetime_s: float,
        clock: Callable[[], float] = time.time,
        ended: Callable[[str], bool] = lambda sid: False,
    ) -> None:
        self._tokens: dict[str, Token] = {t.role: t for t in tokens}
        self.lifetime_s = lifetime_s
        self._clock = clock
        self._ended = ended  # whether a session id was signed out
        material = secret if secret is not None else "\0".join(t.secret for t in tokens)
        self._key = hmac.new(material.encode(), b"gateway console session", hashlib.sha256).digest()

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def sign_in(self, presented: str) -> Principal | None:
        """A new session for the token presented, or None."""
        given = presented.strip().encode()
        matches = [(t, hmac.compare_digest(given, t.secret.encode())) for t in self._tokens.values()]
        token = next((t for t, equal in matches if equal), None)
        if not given or token is None:
            return None
        expires = float(int(self._clock() + self.lifetime_s))
        return Principal(token.role, token.name, expires, secrets.token_urlsafe(16))

    def cookie(self, who: Principal) -> str:
        body = f"{who.role}.{int(who.expires)}.{who.sid}"
        return f"{body}.{self._sign(body, self._tokens[who.role])}"

    def read(self, value: str | None) -> Principal | None:
        """The session a cookie carries: None when absent, altered, expired, signed out, or its token has changed."""
        parts = (value or "").split(".")
        if len(parts) != 4:
            return None
        role, expires, sid, signature = parts
        token = self._tokens.get(role)
        if token is None or not expires.isdigit():
            return None
        if not hmac.compare_digest(signature.encode(), self._sign(f"{role}.{expires}.{sid}", token).encode()):
            return None
        if float(expires) <= self._clock() or self._ended(sid):
            return None
        return Principal(token.role, token.name, float(expires), sid)

    def csrf(self, who: Principal) -> str:
        return _b64(hmac.new(self._key, f"csrf.{who.sid}".encode(), hashlib.sha256).digest())

    def csrf_ok(self, who: Principal, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf(who).encode())

    def _sign(self, body: str, token: Token) -> str:
        bound = hashlib.sha256(token.secret.encode()).hexdigest()
        return _b64(hmac.new(self._key, f"{body}.{bound}".encode(), hashlib.sha256).digest())


class Throttle:
    """Failed sign-ins per client address: at most `limit` in any `window_s`, after which the address waits until
    the oldest of them is `window_s` old. It remembers the `max_addresses` that failed most recently (bounded
    memory: the address quiet longest is forgotten first). Successes are not counted."""

    def __init__(
        self,
        *,
        limit: int = 10,
        window_s: float = 60.0,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_addresses = max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # address → its last `limit` failures

    def wait_s(self, address: str) -> int:
        """Whole seconds until `address` may try again (a `Retry-After`); 0 when it may now."""
        failures = self._failures.get(address)
        if failures is None or len(failures) < self.limit:
            return 0
        return max(0, math.ceil(failures[0] + self.window_s - self._clock()))

    def failed(self, address: str) -> int:
        """Count a failed sign-in from `address`; how many it has in the window now."""
        now = self._clock()
        failures = self._failures.pop(address, None) or deque(maxlen=self.limit)
        failures.append(now)
        self._failures[address] = failures
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
        return sum(1 for at in failures if at > now - self.window_s)

    @property
    def addresses(self) -> int:
        """How many addresses it remembers."""
        return len(self._failures)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def same_origin(headers: Mapping[str, str]) -> bool:
    """Whether a request's `Origin` (else `Referer`) names the host it was sent to (`Host`, ports compared with
    the scheme's default filled in). Neither header, or `Origin: null`, is not the same origin."""
    source = headers.get("origin") or headers.get("referer")
    host = headers.get("host")
    if not source or not host or source == "null":
        return False
    try:
        claimed = urlsplit(source)
        sent_to = urlsplit(f"{claimed.scheme}://{host}")
        default = _DEFAULT_PORTS.get(claimed.scheme)
        return (
            claimed.scheme in _DEFAULT_PORTS
            and claimed.hostname is not None
            and claimed.hostname == sent_to.hostname
            and (claimed.port or default) == (sent_to.port or default)
        )
    except ValueError:  # a port that is not a number
        return False
