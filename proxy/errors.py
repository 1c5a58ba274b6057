"""Errors the proxy itself raises, and the one place that renders them in OpenAI's shape.

Every non-2xx answer the proxy produces (as opposed to relaying an upstream's) is a
``ProxyError`` rendered by ``render`` (called from ``proxy.middleware``) as::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

with ``Content-Type: application/json`` and an ``x-request-id`` header.

Hierarchy (status → OpenAI SDK exception)::

    ProxyError
    ├── InvalidRequest        400  BadRequestError          deterministic: never retried
    ├── Unauthorized          401  AuthenticationError
    ├── Forbidden             403  PermissionDeniedError    a member asking for an admin's view
    ├── NotFound              404  NotFoundError
    ├── MethodNotAllowed      405  APIStatusError
    ├── RequestTimeout        408  APIStatusError           the client's body did not arrive in time
    ├── PayloadTooLarge       413  APIStatusError
    ├── UpstreamUnreachable   502  InternalServerError      refused / reset before an answer
    ├── StoreUnavailable      503  InternalServerError      store known broken; store=true refused;
    │                                                       also any StoreError a handler meets
    ├── Busy                  503  InternalServerError      too many open client connections
    └── UpstreamTimeout       504  InternalServerError      no answer within the read timeout

The SDK retries 408, 409, 429 and >= 500, so those statuses are used only for failures that
may pass (the upstream or the store, a slow client), never for a bad request.

This module imports nothing of the project's: every other module may raise these errors.
"""

from __future__ import annotations

import orjson
from aiohttp import web


class ProxyError(Exception):
    status = 500
    type = "server_error"
    close_connection = False  # the connection is closed after the answer

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str = "Missing bearer token in the Authorization header.") -> None:
        super().__init__(message, code="invalid_api_key")


class Forbidden(ProxyError):
    status = 403
    type = "invalid_request_error"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    close_connection = True


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"


class Busy(ProxyError):
    status = 503
    type = "server_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"


def error_body(error: ProxyError) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        }
    )


def render(error: ProxyError, request_id: str) -> web.Response:
    response = web.Response(
        status=error.status,
        body=error_body(error),
        content_type="application/json",
        headers={**error.headers, "x-request-id": request_id},
    )
    if error.close_connection:
        response.force_close()
    return response


def from_http_exception(exc: web.HTTPException) -> ProxyError:
    if exc.status == 413:
        return PayloadTooLarge(
            "Request body is larger than the proxy's limit (server.max_body_bytes).",
            code="request_too_large",
        )
    if exc.status == 404:
        return NotFound("Unknown path.", code="unknown_url")
    if exc.status == 405:
        allow = exc.headers.get("Allow")
        return MethodNotAllowed(
            "Method not allowed on this path.",
            code="method_not_allowed",
            headers={"Allow": allow} if allow else None,
        )
    error = ProxyError(exc.reason or "HTTP error")
    error.status = exc.status
    error.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return error
