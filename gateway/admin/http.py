"""What every admin endpoint shares: the context they act on, bearer-token authorization, request bodies read
and type-checked before anything changes, query numbers, and JSON answers (errors in OpenAI's envelope).

An admin body is a JSON object of `reason`, `actor` and the endpoint's own fields, and no others. Each field
present must have its type (a string is a string, a boolean is `true` or `false`, never `"false"`; `null` is none
of them), within its limit; anything else is a 400 naming the field (`param`) with the code `invalid_type`,
`unknown_parameter`, `missing_required_parameter`, `string_above_max_length` or `invalid_value`. Endpoints read
every field before they take the lock, so a bad body never reaches a half-made change.
"""

from __future__ import annotations

import hmac
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gateway.control.adapters import Catalog
from gateway.control.operations import Operations
from gateway.errors import (
    AuthenticationError,
    BadRequest,
    ClientDisconnected,
    GatewayError,
    PayloadTooLarge,
    PermissionDenied,
)
from gateway.store.request_log import Where

MAX_BODY_BYTES = 64 * 1024  # an admin body is a few short fields
MAX_REASON_CHARS = 1000  # a sentence or two for the audit log
MAX_NAME_CHARS = 200  # actors, variants, adapter versions
MAX_AUDIT_LIMIT = 10_000  # audit entries in one answer
MAX_TIMESTAMP = 1e11  # Unix seconds (year 5138): a bound that catches milliseconds sent as seconds, not dates


@dataclass(slots=True)
class AdminContext:
    """What the admin routes act on: every change goes through `ops`; the rest is read."""

    token: str | None
    ops: Operations
    counters: Counter[tuple[str, str, str, str]]
    catalog: Callable[[], Catalog]
    records: Where  # the request log
    replica_id: str  # this process, as the replicas table names it
    replica_window_s: float  # a replica whose last heartbeat is older is not listed
    engines: Callable[[], dict[str, list[dict[str, Any]]]]  # each pool's members (`EnginePool.status`)
    shadow_in_flight: Callable[[str], int]  # a route's shadow copies running in this process
    viewer_token: str | None = None  # may use the read-only routes (GET), nothing else


Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[AdminContext, Request], Awaitable[Response]]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def guard(ctx: AdminContext, handler: Handler) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        authorize(ctx, request)
        return await handler(ctx, request)

    return endpoint


def authorize(ctx: AdminContext, request: Request) -> None:
    """The admin token may do anything; the viewer token only read (GET): on any other method it gets 403."""
    reading = request.method in ("GET", "HEAD")
    if ctx.token is None and not (reading and ctx.viewer_token):
        raise PermissionDenied("The admin API is disabled: set GATEWAY_ADMIN_TOKEN to enable it.")
    tokens = [t for t in (ctx.token, ctx.viewer_token) if t is not None]
    matched = check_bearer(request, tokens, where="The admin API", token="admin token")
    if matched == ctx.viewer_token and not reading:
        raise PermissionDenied("The viewer token may only read: this needs the admin token.")


def check_bearer(request: Request, tokens: Sequence[str], *, where: str, token: str) -> str:
    """The one of `tokens` the request's bearer token equals (each compared in constant time)."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationError(f"{where} needs 'Authorization: Bearer <{token}>'.")
    given = presented.strip().encode()
    matches = [hmac.compare_digest(given, t.encode()) for t in tokens]  # a list: every token compared
    if not any(matches):
        raise AuthenticationError(f"Incorrect {token}.")
    return tokens[matches.index(True)]


class AdminBody:
    """An admin request's JSON object; each accessor checks its field's type and limit (400 naming it)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def text(self, name: str, *, max_chars: int = MAX_NAME_CHARS) -> str | None:
        """An optional string (stripped; None when absent)."""
        if name not in self._data:
            return None
        value = self._data[name]
        if not isinstance(value, str):
            raise _invalid_type(name, "a string", value)
        value = value.strip()
        if len(value) > max_chars:
            raise _too_long(f"'{name}'", name, len(value), max_chars)
        return value

    def required_text(self, name: str, *, max_chars: int = MAX_NAME_CHARS, why: str = "") -> str:
        value = self.text(name, max_chars=max_chars)
        if not value:
            raise BadRequest(
                f"A non-empty '{name}' is required{why}.", param=name, code="missing_required_parameter"
            )
        return value

    def flag(self, name: str) -> bool:
        """An optional JSON boolean, false when absent."""
        value = self._data.get(name, False)
        if not isinstance(value, bool):
            raise _invalid_type(name, "a JSON boolean (true or false)", value)
        return value

    def number(self, name: str, *, maximum: float = 1e12) -> float:
        """A required finite number in [0, maximum]."""
        if name not in self._data:
            raise BadRequest(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        value = self._data[name]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _invalid_type(name, "a number", value)
        if not (math.isfinite(value) and 0 <= value <= maximum):
            raise BadRequest(f"'{name}' must be between 0 and {maximum:g}.", param=name, code="invalid_value")
        return float(value)

    def optional_number(self, name: str, *, maximum: float = 1e12) -> float | None:
        """An optional finite number in [0, maximum]; None when absent."""
        return self.number(name, maximum=maximum) if name in self._data else None

    def count(self, name: str, *, maximum: int = 1_000_000_000) -> int | None:
        """An optional integer in [0, maximum]."""
        if name not in self._data:
            return None
        value = self._data[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid_type(name, "an integer", value)
        if not 0 <= value <= maximum:
            raise BadRequest(f"'{name}' must be between 0 and {maximum}.", param=name, code="invalid_value")
        return value


async def read_body(request: Request, *fields: str) -> AdminBody:
    """The body as a JSON object whose keys are all `reason`, `actor` (every admin body may say why and who) or
    the endpoint's own `fields` (an empty body is an empty object)."""
    allowed = sorted({"reason", "actor", *fields})
    raw = await _read_raw(request)
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_type")
    unknown = sorted(data.keys() - set(allowed))
    if unknown:
        raise BadRequest(
            f"Unknown field {unknown[0]!r}: this endpoint takes {', '.join(repr(f) for f in allowed)}.",
            param=unknown[0],
            code="unknown_parameter",
        )
    return AdminBody(data)


async def _read_raw(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise PayloadTooLarge(f"An admin request body is limited to {MAX_BODY_BYTES} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:  # the caller hung up mid-upload: nothing to answer, nothing changed
        raise ClientDisconnected("The client disconnected while sending its body.") from None
    return b"".join(chunks)


def reason_actor(request: Request, body: AdminBody) -> tuple[str, str]:
    """The required reason and the actor (the body's, else the `x-gateway-actor` header, else `admin`)."""
    reason = body.required_text("reason", max_chars=MAX_REASON_CHARS, why=": it goes into the audit log")
    return reason, actor_of(request, body)


def actor_of(request: Request, body: AdminBody) -> str:
    named = body.text("actor")
    if named:
        return named
    header = request.headers.get("x-gateway-actor", "").strip()
    if len(header) > MAX_NAME_CHARS:
        raise _too_long("The x-gateway-actor header", "x-gateway-actor", len(header), MAX_NAME_CHARS)
    return header or "admin"


def query_number(
    request: Request, name: str, *, low: float, high: float, integer: bool = False
) -> float | None:
    """A finite number (or an integer) from the query string, in [low, high]; None when absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    kind = "an integer" if integer else "a number"
    try:
        value = float(int(raw) if integer else raw)
    except (ValueError, OverflowError):
        raise BadRequest(f"'{name}' must be {kind}, not {raw!r}.", param=name, code="invalid_type") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise BadRequest(f"'{name}' must be between {low:g} and {high:g}.", param=name, code="invalid_value")
    return value


def _too_long(what: str, param: str, length: int, limit: int) -> BadRequest:
    return BadRequest(
        f"{what} is {length} characters long; the limit is {limit}.",
        param=param,
        code="string_above_max_length",
    )


def _invalid_type(name: str, expected: str, value: Any) -> BadRequest:
    return BadRequest(
        f"'{name}' must be {expected}, not {_json_type(value)}.", param=name, code="invalid_type"
    )


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", int: "a number", float: "a number", list: "an array"}
    if value is None:
        return "null"
    return names.get(type(value), "an object")


def error_response(err: GatewayError) -> Response:
    return Response(err.envelope(), status_code=err.status, media_type="application/json")
