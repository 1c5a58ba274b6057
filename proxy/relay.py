"""One exchange: the client's request goes upstream, the upstream's answer comes back.

The client comes first: every upstream read is written to the client as it arrives, one
write per read, and appended to the capture (``bytearray.extend``: cannot fail, costs
nothing). Only the end of a captured answer waits: the plain body, or the read carrying
``data: [DONE]``, goes out after the completion is committed (see ``capture``).

Failures and what the client sees:
- upstream refused / reset before answering → 502; no answer within the read timeout → 504;
- upstream dies or stalls mid-stream → the client connection is closed without the final
  chunk, so the client sees a broken transfer, never a clean end;
- the client goes away → the upstream response is closed at once, which stops the read.

Bounds: a captured answer larger than ``capture.max_answer_bytes`` (counted after
decompression) stops being captured: its bytes so far are released, the client still gets
every byte, and the exchange ends as ``too_large``. Building the stored record happens after
the upstream answered and can never fail the client's answer: any failure there makes the
exchange ``unstorable`` (logged, audited), and the client gets the upstream's bytes intact.

In keys mode, an upstream error body is read whole and any part of the team key in it is
redacted before it reaches the member (``KeyMask``).
"""

from __future__ import annotations

import contextlib
import logging
import time

from aiohttp import web
from multidict import CIMultiDict

from proxy.capture import Capture
from proxy.errors import UpstreamTimeout, UpstreamUnreachable
from proxy.logs import AccessRecord
from proxy.outcome import Outcome
from proxy.sse import DoneWatch, ends_with_done
from proxy.upstream import KeyMask, headers_down, headers_up
from proxy.upstream_client import BadAnswer, UpstreamAnswer, UpstreamClient, UpstreamFailure
from proxy.writer import WriteFailed, Writer

log = logging.getLogger("proxy.relay")

DEFAULT_MAX_ANSWER = 32 * 1024 * 1024
_CLIENT_GONE = (ConnectionResetError, ConnectionError)


def _server_timing(proxy_ms: float, upstream_ms: float) -> str:
    return f"proxy;dur={proxy_ms:.3f}, upstream;dur={upstream_ms:.3f}"


def _stream_response(upstream: UpstreamAnswer, headers: CIMultiDict[str]) -> web.StreamResponse:
    return web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)


class Relay:
    """Forwards requests to the configured upstream and captures what must be stored."""

    def __init__(
        self,
        client: UpstreamClient,
        writer: Writer,
        upstream_key: str | None = None,
        *,
        drop_headers: frozenset[str] = frozenset(),
        max_answer_bytes: int = DEFAULT_MAX_ANSWER,
    ) -> None:
        self._client = client
        self._writer = writer
        # With proxy keys, the proxy's own upstream key replaces whatever the client sent.
        self._authorization = f"Bearer {upstream_key}" if upstream_key else None
        self._mask = KeyMask(upstream_key) if upstream_key else None
        self._drop = drop_headers
        self._max_answer = max_answer_bytes

    async def forward(
        self,
        request: web.Request,
        body: bytes,
        access: AccessRecord,
        capture: Capture | None = None,
        *,
        path: str,
    ) -> web.StreamResponse:
        """Send the request upstream at ``path`` (canonical, below the base) and relay back."""
        target = self._client.target(path, request.rel_url.raw_query_string)
        headers = headers_up(request.headers, self._drop)
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        sent = time.perf_counter()
        try:
            upstream = await self._client.request(request.method, target, headers, body or None)
        except TimeoutError:
            access.outcome = Outcome.UPSTREAM_FAILED
            raise UpstreamTimeout("The upstream did not answer in time.") from None
        except UpstreamFailure as error:
            access.outcome = Outcome.UPSTREAM_FAILED
            what = (
                "sent an answer the proxy cannot read"
                if isinstance(error, BadAnswer)
                else "could not be reached"
            )
            raise UpstreamUnreachable(f"The upstream {what} ({type(error).__name__}).") from None
        answered = time.perf_counter()
        async with upstream:
            access.upstream_request_id = upstream.headers.get("x-request-id")
            if capture is not None:
                capture.upstream_request_id = access.upstream_request_id
            access.status = upstream.status
            access.upstream_ms = round((answered - sent) * 1000, 3)
            proxy_ms = (sent - access.started) * 1000
            access.proxy_ms = round(proxy_ms, 3)
            down = headers_down(upstream.headers)
            down["Server-Timing"] = _server_timing(proxy_ms, access.upstream_ms)
            is_stream = upstream.content_type == "text/event-stream"
            if capture is not None:
                capture.streamed = is_stream
                if upstream.status != 200:
                    capture.storable = False  # relayed as it came; kept only as an audit record
            redact = self._mask is not None and upstream.status >= 400
            # A plain answer to store waits for its commit; an error body for its redaction.
            hold = redact or (capture is not None and capture.storable and not is_stream)
            return await self._relay(
                request, upstream, down, capture, access, hold=hold, redact=redact
            )

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamAnswer,
        headers: CIMultiDict[str],
        capture: Capture | None,
        access: AccessRecord,
        *,
        hold: bool,
        redact: bool,
    ) -> web.StreamResponse:
        # A held answer is sent as one web.Response at the end; its stream response is made
        # only if it is needed after all (an answer too large to hold, a HEAD request).
        response: web.StreamResponse | None = None
        held: bytearray | None = bytearray() if hold else None
        if held is None:
            response = _stream_response(upstream, headers)
            if (
                upstream.content_length is not None
                and upstream.content_type != "text/event-stream"
                and "Content-Encoding" not in upstream.headers
                and request.method != "HEAD"
            ):
                # A body of known length goes down with that length, not re-framed in chunks.
                response.content_length = upstream.content_length
            if not await self._prepare(request, response, upstream, access):
                return response
        watch = DoneWatch()
        committed = False
        while True:
            try:
                data = await upstream.readany()
            except (TimeoutError, UpstreamFailure) as error:
                log.warning(
                    "upstream failed mid-answer",
                    extra={"request_id": access.request_id, "reason": type(error).__name__},
                )
                if not committed:
                    access.outcome = Outcome.UPSTREAM_FAILED
                if response is None or not response.prepared:  # nothing sent: a clear error
                    if isinstance(error, TimeoutError):
                        raise UpstreamTimeout("The upstream stopped answering.") from None
                    raise UpstreamUnreachable(
                        f"The upstream connection failed mid-answer ({type(error).__name__})."
                    ) from None
                request.protocol.force_close()  # the client must see a broken transfer
                return response
            if not data:
                break
            if capture is not None and capture.kept and not committed:
                if len(capture.response) + len(data) > self._max_answer:
                    capture.drop()  # too large to keep: the client still gets every byte
                    if redact:
                        access.outcome = Outcome.UPSTREAM_FAILED
                        raise UpstreamUnreachable("The upstream's error answer is too large.")
                    if held is not None:
                        response = _stream_response(upstream, headers)
                        if not await self._prepare(request, response, upstream, access):
                            return response
                        if not await self._write(response, upstream, access, bytes(held)):
                            return response
                        held = None
                else:
                    capture.response += data
                    if (
                        capture.storable
                        and capture.streamed
                        and watch.seen_in(data)
                        and ends_with_done(bytes(capture.response))
                    ):
                        committed = True
                        await self._commit(capture, access)
            if held is not None:
                held += data
                if len(held) > self._max_answer and redact:
                    access.outcome = Outcome.UPSTREAM_FAILED
                    raise UpstreamUnreachable("The upstream's error answer is too large.")
                continue
            assert response is not None  # made above unless the answer is held
            if not await self._write(response, upstream, access, data, committed):
                return response
        if capture is not None and capture.kept and capture.storable and not committed:
            # A plain answer, or a stream without [DONE] (some providers end at EOF): store
            # it if it is a whole completion.
            await self._commit(capture, access)
        elif capture is not None and not capture.kept:
            access.outcome = Outcome.TOO_LARGE
        elif capture is not None and not capture.storable:
            access.outcome = Outcome.UPSTREAM_ERROR
        elif capture is None:
            access.outcome = Outcome.COMPLETE
        if held is not None:
            body = bytes(held)
            if redact and self._mask is not None:
                body = self._mask.apply(body)
                if capture is not None:
                    capture.response = bytearray(body)
            if request.method != "HEAD":
                # Returned unsent: aiohttp writes a Response's head and body in one send,
                # where a prepared StreamResponse sends its head on its own.
                return web.Response(
                    status=upstream.status, reason=upstream.reason, headers=headers, body=body
                )
            response = _stream_response(upstream, headers)
            with contextlib.suppress(*_CLIENT_GONE):
                await response.prepare(request)
                await response.write(body)
        assert response is not None  # made above unless the answer is held
        # Everything was written; a client that closed before the terminator changes nothing.
        with contextlib.suppress(*_CLIENT_GONE):
            await response.write_eof()
        return response

    async def _prepare(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: UpstreamAnswer,
        access: AccessRecord,
    ) -> bool:
        try:
            await response.prepare(request)
        except _CLIENT_GONE:
            access.outcome = Outcome.CLIENT_GONE
            upstream.close()
            return False
        return True

    async def _write(
        self,
        response: web.StreamResponse,
        upstream: UpstreamAnswer,
        access: AccessRecord,
        data: bytes,
        committed: bool = False,
    ) -> bool:
        try:
            await response.write(data)
        except _CLIENT_GONE:
            if not committed:
                access.outcome = Outcome.CLIENT_GONE
            upstream.close()
            return False
        return True

    async def _commit(self, capture: Capture, access: AccessRecord) -> None:
        """Assemble and commit the capture; failures are logged and counted, never raised.

        Whatever goes wrong while the record is built (an answer that is no completion, JSON
        nested deeper than the encoder takes, a number the store cannot hold) is this
        exchange's outcome, ``unstorable``; the client's answer is never affected.
        """
        try:
            record = capture.record()
        except Exception as error:  # noqa: BLE001 - any failure here is the record's, not the client's
            access.outcome = Outcome.UNSTORABLE
            log.warning(
                "answer not stored",
                extra={"request_id": access.request_id, "reason": f"{error}"[:300]},
            )
            return
        access.completion_id = record.id
        try:
            await self._writer.commit(record)
        except WriteFailed as error:
            access.outcome = Outcome.UNSTORABLE if error.rejected else Outcome.STORE_FAILED
            return
        access.outcome = Outcome.COMPLETE
