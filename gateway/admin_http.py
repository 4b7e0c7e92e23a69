"""What every admin endpoint shares: the context they act on, admin-token authorization, request bodies with a
required reason, and JSON answers (errors in OpenAI's envelope)."""

from __future__ import annotations

import asyncio
import hmac
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import AuthenticationError, BadRequest, GatewayError, PermissionDenied
from gateway.policy_store import LiveView
from gateway.state import StateStore


@dataclass(slots=True)
class AdminContext:
    token: str | None
    live: LiveView
    state: StateStore
    counters: Counter[tuple[str, str, str, str]]
    reload: Any  # () -> PolicySnapshot, raises ConfigError (blocking; run in a thread)
    prepare: Any  # async (PolicySnapshot) -> loads its adapters; raises AdapterRejected / EngineError
    catalog: Any  # () -> Catalog
    records_db: Path
    lock: asyncio.Lock


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def guard(ctx: AdminContext, handler: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        authorize(ctx, request)
        result: Response = await handler(ctx, request)
        return result

    return endpoint


def authorize(ctx: AdminContext, request: Request) -> None:
    if ctx.token is None:
        raise PermissionDenied("The admin API is disabled: set GATEWAY_ADMIN_TOKEN to enable it.")
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationError("The admin API needs 'Authorization: Bearer <admin token>'.")
    if not hmac.compare_digest(presented.strip().encode(), ctx.token.encode()):
        raise AuthenticationError("Incorrect admin token.")


async def read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def reason_actor(request: Request, body: dict[str, Any]) -> tuple[str, str]:
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise BadRequest("A non-empty 'reason' is required: it goes into the audit log.", param="reason")
    actor = body.get("actor") or request.headers.get("x-gateway-actor") or "admin"
    if not isinstance(actor, str):
        raise BadRequest("'actor' must be a string.", param="actor")
    return reason.strip(), actor


def error_response(err: GatewayError) -> Response:
    return Response(err.envelope(), status_code=err.status, media_type="application/json")
