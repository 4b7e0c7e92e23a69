"""The gateway's one exception tree, and its rendering in OpenAI's error envelope.

Every error a client or operator can see is a `GatewayError`; foreign exceptions (aiohttp, sqlite, pydantic) are
translated into one of these at the module boundary where they arise. Each class carries the HTTP status, the
OpenAI error `type` and a default `code`, so the envelope is built in exactly one place, `GatewayError.body()`
(`envelope()` is its bytes): the chat endpoint, the admin API, Starlette's exception handlers and the SSE error
event all render an error through it.

    GatewayError                       500 api_error
    ├── BadRequest                     400 invalid_request_error
    │   ├── InvalidJSON                400   code=invalid_json
    │   └── PayloadTooLarge            413   code=payload_too_large
    ├── AuthenticationError            401 authentication_error  code=invalid_api_key
    ├── PermissionDenied               403 permission_error
    ├── NotFound                       404 invalid_request_error code=not_found
    │   └── UnknownRoute               404   code=model_not_found
    ├── Conflict                       409 invalid_request_error code=conflict
    ├── RouterRefused                  4xx invalid_request_error (405: code=method_not_allowed)
    ├── NoLiveVariant                  503 service_unavailable   code=no_live_variant
    ├── EngineRejected                 4xx invalid_request_error code=engine_rejected (the engine's own status)
    ├── EngineError                    502 upstream_error        code=engine_error
    │   ├── EngineUnavailable          502   code=engine_unreachable
    │   ├── EngineTimeout              504   code=engine_timeout
    │   └── InvalidToolCall            502 invalid_tool_call
    ├── ClientDisconnected             499 (never sent; recorded as an outcome)
    ├── ServerShuttingDown             503 server_error          code=server_shutting_down
    └── ConfigError                    500 config_error (policy / keys file rejected at load)
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = "internal_error"
    outcome: ClassVar[str] = "gateway_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def body(self) -> dict[str, Any]:
        """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def envelope(self) -> bytes:
        return orjson.dumps(self.body())


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"
    outcome = "client_error"


class InvalidJSON(BadRequest):
    default_code = "invalid_json"


class PayloadTooLarge(BadRequest):
    status = 413
    default_code = "payload_too_large"


class AuthenticationError(GatewayError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"
    outcome = "client_error"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    default_code = "permission_denied"
    outcome = "client_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"
    outcome = "client_error"


class UnknownRoute(NotFound):
    default_code = "model_not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"
    outcome = "client_error"


class RouterRefused(GatewayError):
    """Starlette's router refused the request at its own status: 405 for a method the path does not take."""

    type = "invalid_request_error"
    outcome = "client_error"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, code="method_not_allowed" if status == 405 else None)
        self.status = status  # type: ignore[misc]  # per-instance: the router's own status


class NoLiveVariant(GatewayError):
    status = 503
    type = "service_unavailable"
    default_code = "no_live_variant"
    outcome = "no_live_variant"


class EngineError(GatewayError):
    """The engine answered with a failure, or broke the connection. `fallback_ok` says whether nothing reached
    the client yet and the request may be retried on a fallback variant; `member`, the pool member's URL (for the
    record, never in the message)."""

    status = 502
    type = "upstream_error"
    default_code = "engine_error"
    outcome = "engine_error"
    fallback_ok: bool = True
    member: str | None = None


class EngineUnavailable(EngineError):
    default_code = "engine_unreachable"


class EngineTimeout(EngineError):
    status = 504
    default_code = "engine_timeout"
    outcome = "engine_timeout"


class EngineRejected(GatewayError):
    """The engine refused the request as the client's fault (4xx other than an unknown model): relayed as is.
    `member`: the pool member's URL, for the record."""

    type = "invalid_request_error"
    default_code = "engine_rejected"
    outcome = "client_error"
    member: str | None = None

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status  # type: ignore[misc]  # per-instance: the engine's own 4xx


class InvalidToolCall(EngineError):
    type = "invalid_tool_call"
    default_code = "invalid_tool_call"
    outcome = "invalid_tool_call"


class ClientDisconnected(GatewayError):
    status = 499
    default_code = "client_disconnected"
    outcome = "client_disconnected"


class NotDurable(GatewayError):
    """An operator's change could not be written to the store with its audit entry (the database is away, or
    refused it): nothing changed, and the change may be tried again."""

    status = 503
    type = "service_unavailable"
    default_code = "audit_failed"


class ServerShuttingDown(GatewayError):
    """The process is draining (SIGTERM) and its deadline came before the request finished."""

    status = 503
    type = "server_error"
    default_code = "server_shutting_down"
    outcome = "server_shutdown"


class ConfigError(GatewayError):
    type = "config_error"
    default_code = "config_rejected"
    outcome = "config_error"
