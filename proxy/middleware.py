"""The request middleware: request ids, the access record, metrics, and the call into the one
error renderer (``proxy.errors.render``).

Every request gets an id and an access record; every failure of the proxy's own becomes an
OpenAI-shaped answer; the access line and the metrics are written once the client has its
answer, with the exchange's one outcome.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestPayloadError

from proxy.errors import (
    InvalidRequest,
    ProxyError,
    StoreUnavailable,
    from_http_exception,
    render,
)
from proxy.keys import ACCESS, METRICS
from proxy.logs import AccessLog, AccessRecord
from proxy.outcome import Outcome
from proxy.store.errors import StoreError

log = logging.getLogger("proxy.middleware")

_UNREADABLE_BODY = InvalidRequest(
    "The request body cannot be read as sent: its Content-Encoding does not match it, or its"
    " chunks are malformed.",
    code="invalid_body",
)


def request_ids() -> Iterator[str]:
    """Request ids: 64 random bits chosen once, then a counter. Unique across processes and
    restarts like a uuid4, without a call into the kernel for each request."""
    prefix = "req_" + os.urandom(8).hex()
    return (f"{prefix}{n:016x}" for n in itertools.count(1))


def exchange_middleware(access_log: AccessLog | None, ids: Iterator[str]) -> Middleware:
    """Give every request an id and an access record; render every failure of the proxy's own.

    Only ``ProxyError`` (and aiohttp's own HTTP errors, such as a body over the size limit)
    become OpenAI-shaped answers; anything unexpected is logged with its traceback and
    answered with a plain 500 that says nothing of the internals. Once a response has
    started, nothing more is written: a failure after that point closes the connection.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = next(ids)
        access = AccessRecord(request_id, request.method, request.path, time.perf_counter())
        request[ACCESS] = access
        response: web.StreamResponse | None = None
        try:
            try:
                if len(request.headers.getall("Authorization", ())) > 1:
                    # Which one a server or the upstream would pick differs: refuse to guess.
                    raise InvalidRequest(
                        "The request has more than one Authorization header.",
                        param="Authorization",
                        code="duplicate_authorization",
                    )
                response = await handler(request)
            except ProxyError as error:
                response = render(error, request_id)
                if access.outcome is None:
                    access.outcome = Outcome.REFUSED
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = render(from_http_exception(exc), request_id)
                if access.outcome is None:
                    access.outcome = Outcome.REFUSED
            except RequestPayloadError:  # aiohttp could not decode the body it was sent
                response = render(_UNREADABLE_BODY, request_id)
                response.force_close()  # what is left of that body is not read
                if access.outcome is None:
                    access.outcome = Outcome.REFUSED
            except StoreError as error:  # the database failed a read: it may pass, so 503
                log.warning("store failed", extra={"request_id": request_id, "reason": str(error)})
                unavailable = StoreUnavailable(
                    f"The completion store failed ({error}).", code="store_unavailable"
                )
                response = render(unavailable, request_id)
            except Exception:
                log.exception("unhandled error", extra={"request_id": request_id})
                response = render(ProxyError("The proxy failed to handle the request."), request_id)
            if response.prepared:
                return response
            if request.writer.output_size:
                # A response already began on this connection (the handler failed after
                # preparing one): another status line would land inside its body, so the
                # connection is closed instead and the client sees a broken transfer.
                request.protocol.force_close()
                return response
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
            if access_log is not None:
                access_log.write(access)
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
