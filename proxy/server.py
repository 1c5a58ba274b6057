"""The listening side: client connections accepted, bounded and timed out; the serve loop.

- At most ``server.max_connections`` client connections are open at once; a connection past
  that gets a 503 in OpenAI's error shape and is closed, so a flood of slow connections
  cannot use up the process's file descriptors and starve ``/healthz`` or real clients.
- A connection must send a whole request head within ``server.header_timeout`` (aiohttp's
  keep-alive timer, which also runs until the first request is parsed); a request body has
  ``server.body_timeout`` (``handlers.read_body``).
- A request aiohttp cannot parse (bad request line, a header line over 8 KiB, a control
  character in a header) is answered with a 400 in OpenAI's error shape instead of aiohttp's
  plain text, and logged as one line naming the kind of fault, never the raw line (which may
  hold a bearer token) and without a traceback.

aiohttp has no public hook for the server side of a connection, so ``ProxyRunner`` swaps in
``ProxyServer`` when the runner makes its server; the tests run the app through it.

Once serving, the process tunes Python's cycle collector (``tune_gc``): what start-up made
(the app, its templates, the libraries) lives as long as the process, so it is frozen out of
every collection; and a request makes and drops hundreds of containers, almost all freed by
reference counting, so the youngest generation is collected after ``GC_YOUNG`` net
allocations rather than 700. Collections cost about 11 us a request with the defaults, and a
full one walked everything start-up made (``docs/benchmarks.md``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.config import ServerConfig
from proxy.errors import Busy, InvalidRequest, ProxyError, error_body, render
from proxy.keys import REQUEST_IDS
from proxy.middleware import request_ids

log = logging.getLogger("proxy.server")

GC_YOUNG = 10_000


def tune_gc() -> None:
    """Freeze what exists now out of the cycle collector, and collect the young less often."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)


_BUSY = Busy(
    "The proxy has too many open connections (server.max_connections); try again shortly.",
    code="too_many_connections",
)


def _refusal() -> bytes:
    body = error_body(_BUSY)
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _parse_error(exc: BaseException | None) -> ProxyError:
    """What a client is told about a request aiohttp could not parse; never the raw bytes."""
    if isinstance(exc, http_exceptions.LineTooLong):
        message = "A request line or header line is too long."
    elif isinstance(exc, http_exceptions.InvalidHeader):
        message = "A request header is malformed."
    elif isinstance(exc, http_exceptions.BadStatusLine):
        message = "The request line is not valid HTTP."
    else:
        message = "The request is not valid HTTP."
    return InvalidRequest(message, code="invalid_http")


class ProxyRequestHandler(RequestHandler):
    """One client connection: refused when the server is full; parse errors in JSON."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        if isinstance(manager, ProxyServer) and manager.full:
            self._manager = None  # never registered, so connection_lost has nothing to undo
            self._force_close = True  # and whatever the client still sends is ignored
            manager.refused += 1
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(manager.refusal)
            transport.close()
            return
        super().connection_made(transport)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        manager = self._manager
        request_id = next(manager.request_ids) if isinstance(manager, ProxyServer) else ""
        log.warning(
            "malformed request",
            extra={
                "request_id": request_id,
                "reason": type(exc).__name__ if exc else "unknown",
                "status": status,
            },
        )
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way; the connection is closed")
        response = render(_parse_error(exc), request_id)
        response.force_close()
        return response


class ProxyServer(web.Server):
    """aiohttp's server with a cap on open client connections."""

    def __init__(
        self, *args: Any, max_connections: int, request_ids: Iterator[str], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.request_ids = request_ids  # the app's, for a request that never reaches it
        self.open = 0
        self.refused = 0
        self.refusal = _refusal()

    @property
    def full(self) -> bool:
        return self.open >= self.max_connections

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self.open += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        super().connection_lost(handler, exc)

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` with the proxy's connection limits and timeouts."""

    def __init__(self, app: web.Application, config: ServerConfig, **kwargs: Any) -> None:
        super().__init__(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=config.shutdown_timeout,
            keepalive_timeout=config.header_timeout,
            # After a refused or timed-out body, the rest is read and dropped this long at
            # most before the connection closes (aiohttp's default is 10 s).
            lingering_time=1.0,
            **kwargs,
        )
        self._max_connections = config.max_connections

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        # The same server, made with the class that counts and refuses connections.
        return ProxyServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            max_connections=self._max_connections,
            request_ids=self.app.get(REQUEST_IDS) or request_ids(),
            **made._kwargs,
        )


async def _serve(
    app: web.Application, config: ServerConfig, sockets: Sequence[socket.socket]
) -> None:
    runner = ProxyRunner(app, config)
    await runner.setup()
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        tune_gc()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()  # stops listening, drains requests, then closes the app


def run(app: web.Application, config: ServerConfig, sockets: Sequence[socket.socket]) -> None:
    """Serve on bound ``sockets`` until SIGINT or SIGTERM, then shut down gracefully
    (``shutdown_timeout``): what ``web.run_app`` does, with the proxy's runner."""
    asyncio.run(_serve(app, config, sockets))
