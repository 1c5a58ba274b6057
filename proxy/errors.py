"""Errors the proxy itself raises, and the one place that renders them in OpenAI's shape.

Every non-2xx answer the proxy produces (as opposed to relaying an upstream's) is a
``ProxyError`` rendered by ``error_middleware`` as::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

with ``Content-Type: application/json`` and an ``x-request-id`` header.

Hierarchy (status → OpenAI SDK exception)::

    ProxyError
    ├── InvalidRequest        400  BadRequestError          deterministic: never retried
    ├── Unauthorized          401  AuthenticationError
    ├── Forbidden             403  PermissionDeniedError    a member asking for an admin's view
    ├── NotFound              404  NotFoundError
    ├── MethodNotAllowed      405  APIStatusError
    ├── PayloadTooLarge       413  APIStatusError
    ├── UpstreamUnreachable   502  InternalServerError      refused / reset before an answer
    ├── StoreUnavailable      503  InternalServerError      store known broken; store=true refused;
    │                                                       also any StoreError a handler meets
    └── UpstreamTimeout       504  InternalServerError      no answer within the read timeout

The SDK retries 408, 409, 429 and >= 500, so those statuses are used only for failures that
may pass (the upstream or the store), never for a bad request.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.keys import ACCESS, METRICS
from proxy.logs import AccessRecord
from proxy.outcome import Outcome

log = logging.getLogger("proxy.errors")
access_logger = logging.getLogger("proxy.access")


class ProxyError(Exception):
    status = 500
    type = "server_error"

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


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"


class StoreUnavailable(ProxyError):
    status = 503
    type = "server_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"


def request_ids() -> Iterator[str]:
    """Request ids: 64 random bits chosen once, then a counter. Unique across processes and
    restarts like a uuid4, without a call into the kernel for each request."""
    prefix = "req_" + os.urandom(8).hex()
    return (f"{prefix}{n:016x}" for n in itertools.count(1))


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
    return web.Response(
        status=error.status,
        body=error_body(error),
        content_type="application/json",
        headers={**error.headers, "x-request-id": request_id},
    )


def _from_http_exception(exc: web.HTTPException) -> ProxyError:
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


def exchange_middleware(
    access_log: bool, unavailable: tuple[type[Exception], ...] = ()
) -> Middleware:
    """Give every request an id and an access record; render every failure of the proxy's own.

    Only ``ProxyError`` (and aiohttp's own HTTP errors, such as a body over the size limit)
    become OpenAI-shaped answers; an ``unavailable`` error (the store's, passed in by the
    app so this module imports nothing of the store) is a 503 that says why; anything
    unexpected is logged with its traceback and answered with a plain 500 that says nothing
    of the internals.
    """

    ids = request_ids()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = next(ids)
        access = AccessRecord(request_id, request.method, request.path, time.perf_counter())
        request[ACCESS] = access
        response: web.StreamResponse | None = None
        try:
            try:
                response = await handler(request)
            except ProxyError as error:
                response = render(error, request_id)
                access.outcome = access.outcome or Outcome.REFUSED
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = render(_from_http_exception(exc), request_id)
                access.outcome = access.outcome or Outcome.REFUSED
            except unavailable as error:  # the store failed (a read): it may pass, so 503
                log.warning("store failed", extra={"request_id": request_id, "reason": str(error)})
                failed = StoreUnavailable(
                    f"The completion store failed ({error}).", code="store_unavailable"
                )
                response = render(failed, request_id)
            except Exception:
                log.exception("unhandled error", extra={"request_id": request_id})
                response = render(ProxyError("The proxy failed to handle the request."), request_id)
            if not response.prepared:
                if "x-request-id" not in response.headers:
                    response.headers["x-request-id"] = request_id
                # Sent here rather than after the middleware returns, so the access log and
                # the metrics below are written after the client has its answer, not before.
                with contextlib.suppress(ConnectionError):  # the client left; nothing to do
                    await response.prepare(request)
                    await response.write_eof()
            return response
        finally:
            if response is not None:
                access.status = response.status
            elif access.outcome is None:
                access.outcome = Outcome.CLIENT_GONE
            if access_log:
                access.emit(access_logger)
            metrics = request.app.get(METRICS)
            if metrics is not None:
                metrics.request(
                    route=_ROUTES.get(getattr(request.match_info.handler, "__name__", ""), "other"),
                    status=access.status,
                    model=access.model,
                    stream=access.stream,
                    outcome=access.outcome,
                    upstream_seconds=None
                    if access.upstream_ms is None
                    else access.upstream_ms / 1000,
                    proxy_seconds=None if access.proxy_ms is None else access.proxy_ms / 1000,
                )

    return middleware


# Handler names → the low-cardinality route label of metrics.
_ROUTES = {
    "create_chat_completion": "create",
    "list_chat_completions": "list",
    "get_chat_completion": "retrieve",
    "update_chat_completion": "update",
    "delete_chat_completion": "delete",
    "get_chat_completion_messages": "messages",
    "forward": "forward",
    "get_usage": "admin",
    "list_exchanges": "admin",
    "list_audit": "admin",
}
