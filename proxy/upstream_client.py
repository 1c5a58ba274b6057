"""The proxy's HTTP/1.1 client for its one upstream.

Every request the proxy forwards goes to one origin, fixed by the config, with headers it
has already filtered and a body it holds whole. So the client is small: a pool of
keep-alive connections to that origin, a request written in one piece, and the answer read
as it arrives. What a general client such as aiohttp's ``ClientSession`` also does per
request (cookies, redirects, proxies, tracing, per-request URL and header processing, a
timer rescheduled on every packet) the proxy never needs; leaving it out is most of what
separates the proxy's request path from the bare floor (see ``docs/benchmarks.md``).

- **Connections**: at most ``max_connections`` open; a request waits for a free one. A
  connection goes back to the pool only when its answer was read to the end, the upstream
  did not ask to close it, and it has been idle for less than ``KEEPALIVE_SECONDS`` when
  taken again (an upstream closes idle connections on its own clock, and a request written
  to a connection it is closing would fail). A request is never retried: it may have
  reached the upstream.
- **Timeouts**: ``connect_timeout`` for opening a connection (TLS handshake included);
  ``read_timeout`` for each wait for bytes, the answer's head or any part of its body,
  never for the whole answer, so a long stream that keeps flowing is never cut.
- **Framing** (RFC 9112 §6): interim ``1xx`` heads are skipped; HEAD, 204 and 304 have no
  body; ``Transfer-Encoding: chunked``, else ``Content-Length``, else the body runs until
  the upstream closes. An answer that ends early is an error, never a short body.
- **Content-Encoding**: the proxy asks for ``identity``. ``gzip``, ``x-gzip`` and
  ``deflate``, which some servers send anyway, are decoded at most ``DECODE_STEP`` bytes
  per read, so a small compressed answer that inflates to gigabytes is never held whole.
  Any other coding (``br``, ``zstd``, ...) is refused (``BadAnswer``): the proxy relays and
  stores plain bytes only.
- **Flow control**: reading from the upstream pauses while more than ``BUFFER_HIGH`` bytes
  wait for the relay to take them, so a slow client holds back the upstream, not memory.

Failures raise ``UpstreamFailure`` subclasses (refused, reset, closed early, not HTTP) or
``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import time
import zlib
from types import TracebackType

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

KEEPALIVE_SECONDS = 15.0
BUFFER_HIGH = 1 << 18
DECODE_STEP = 1 << 16
HEAD_LIMIT = 1 << 16  # bytes of status line and headers
_NO_BODY = frozenset({204, 304})
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")


class UpstreamFailure(Exception):
    """The upstream could not be reached, or its connection failed, or it sent no valid HTTP."""


class ConnectFailed(UpstreamFailure):
    """No connection could be opened (refused, unreachable, DNS, TLS)."""


class Disconnected(UpstreamFailure):
    """The upstream closed or reset the connection before its answer was complete."""


class BadAnswer(UpstreamFailure):
    """What came back is not an HTTP/1.x answer the proxy can read."""


def _decoder(coding: str) -> _Inflate:
    coding = coding.strip().lower()
    if coding in {"gzip", "x-gzip"}:
        return _Inflate(16 + zlib.MAX_WBITS)
    if coding == "deflate":
        return _Inflate(zlib.MAX_WBITS, sniff=True)
    raise BadAnswer(f"the upstream's answer is encoded as {coding!r}, which is not supported")


class _Inflate:
    """zlib, fed incrementally; each call returns at most ``DECODE_STEP`` bytes. With
    ``sniff`` (``deflate``, which servers send both with and without zlib's header), the
    first two bytes say which."""

    def __init__(self, wbits: int, *, sniff: bool = False) -> None:
        self._z = None if sniff else zlib.decompressobj(wbits)
        self._held = b""

    @property
    def pending(self) -> bool:
        return self._z is not None and bool(self._z.unconsumed_tail)

    def feed(self, data: bytes) -> bytes:
        if self._z is None:
            data = self._held + data
            if len(data) < 2:
                self._held = data
                return b""
            self._held = b""
            cmf, flg = data[0], data[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
            self._z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        try:
            return self._z.decompress(data, DECODE_STEP)
        except zlib.error as error:
            raise BadAnswer(f"the upstream's compressed answer is corrupt ({error})") from None

    def more(self) -> bytes:
        return b"" if self._z is None else self.feed(self._z.unconsumed_tail)

    def flush(self) -> bytes:
        if self._z is None:
            if self._held:
                raise BadAnswer("the upstream's compressed answer is cut short")
            return b""
        return self._z.flush()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: parses each answer's head and framing as bytes arrive and
    keeps the body for the reader."""

    def __init__(self, pool: UpstreamClient) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = False  # one of the pool's open connections, until it closes
        self.reusable = False
        self.idle_since = 0.0
        self._head_only = False  # the request was HEAD: the answer has no body
        self._buffer = bytearray()  # unparsed bytes: a head, or chunked framing
        self._state = "idle"  # idle → head → body → done
        self._framing = ""  # "length", "chunked" or "close"
        self._left = 0  # body bytes still due ("length"), or of the current chunk
        self._chunk_state = "size"  # size → data → crlf → ... → trailer
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wait_began = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._head: tuple[int, str, CIMultiDictProxy[str]] | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state == "body" and self._framing == "close":
            self._state = "done"
        elif self._state in {"head", "body"} and self._error is None:
            reason = f" ({exc})" if exc else ""
            self._error = Disconnected(f"the upstream closed the connection mid-answer{reason}")
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._wake()
        self._pool.forget(self)

    def eof_received(self) -> bool:
        return False  # close: HTTP/1.1 has no use for a half-open connection

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            if self._state == "head":
                self._buffer += data
                if not self._parse_head():
                    return
                data, self._buffer = bytes(self._buffer), bytearray()
                if not data:
                    return
            if self._state == "body":
                self._take_body(data)
            elif data:  # bytes nobody asked for: the connection cannot be trusted again
                self.reusable = False
                self.abort()
        except BadAnswer as error:
            self._error = error
            self.reusable = False
            self.abort()
            self._wake()

    # -- parsing ---------------------------------------------------------------------------

    def _parse_head(self) -> bool:
        """A whole head in the buffer becomes ``_head`` (1xx heads are dropped); False while
        one is still incomplete."""
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > HEAD_LIMIT:
                    raise BadAnswer("the upstream's answer head is too large")
                return False
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            status, reason, headers, keep = _parse_head(raw)
            if 100 <= status < 200:
                continue
            break
        self.reusable = keep
        if self._head_only or status in _NO_BODY:
            self._state = "done"
        else:
            self._state = "body"
            self._set_framing(headers)  # may refuse the head: then it is never handed out
        self._head = (status, reason, CIMultiDictProxy(headers))
        self._wake()
        return True

    def _set_framing(self, headers: CIMultiDict[str]) -> None:
        encodings = headers.getall("Transfer-Encoding", ())
        if encodings:
            last = ",".join(encodings).rsplit(",", 1)[-1].strip().lower()
            self._framing = "chunked" if last == "chunked" else "close"
            self._chunk_state = "size"
            if "Content-Length" in headers:
                # Both framings named: read by Transfer-Encoding (RFC 9112 §6.3), and never
                # trust the connection again, whose next bytes the two would place apart.
                self.reusable = False
        elif "Content-Length" in headers:
            values = {v.strip() for v in ",".join(headers.getall("Content-Length")).split(",")}
            if len(values) != 1 or not _is_number(value := values.pop()):
                raise BadAnswer("the upstream sent an invalid Content-Length")
            self._framing, self._left = "length", int(value)
            if self._left == 0:
                self._state = "done"
        else:
            self._framing = "close"
        if self._framing == "close":
            self.reusable = False

    def _take_body(self, data: bytes) -> None:
        if self._framing == "length":
            if len(data) >= self._left:
                if len(data) > self._left:
                    self.reusable = False  # more than the answer: do not reuse
                    data = data[: self._left]
                self._left = 0
                self._state = "done"
            else:
                self._left -= len(data)
            self._keep(data)
        elif self._framing == "chunked":
            self._dechunk(data)
        else:
            self._keep(data)
        if self._state == "done":
            self._wake()

    def _dechunk(self, data: bytes) -> None:
        """Chunked framing off ``data`` (after any partial line kept from the last read)."""
        if self._buffer:
            data = bytes(self._buffer) + data
            self._buffer = bytearray()
        pieces: list[bytes] = []
        at, size = 0, len(data)
        state, left = self._chunk_state, self._left
        while at < size:
            if state == "size" and (whole := _CHUNK_HEAD.match(data, at)) is not None:
                # The usual chunk: a bare size line, then the data and its CRLF, all here.
                left, at = int(whole.group(1), 16), whole.end()
                if not left:
                    state = "trailer"
                elif data[at + left : at + left + 2] == b"\r\n":
                    pieces.append(data[at : at + left])
                    at += left + 2
                    left = 0
                else:
                    state = "data"
                continue
            if state == "data":
                take = min(left, size - at)
                pieces.append(data[at : at + take])
                at += take
                left -= take
                if left:
                    break
                state = "crlf"
                continue
            end = data.find(b"\r\n", at)
            if end < 0:
                if size - at > HEAD_LIMIT:
                    raise BadAnswer("the upstream sent an overlong chunk line")
                self._buffer += data[at:]
                break
            line = data[at:end]
            at = end + 2
            if state == "crlf":
                if line:
                    raise BadAnswer("the upstream sent a chunk without its CRLF")
                state = "size"
            elif state == "size":
                digits = line.split(b";", 1)[0].strip(b" \t")
                if not digits or len(digits) > 16 or digits.strip(_HEX_DIGITS):
                    raise BadAnswer("the upstream sent an invalid chunk size")
                left = int(digits, 16)
                state = "data" if left else "trailer"
            elif not line:  # the end of the trailer section: the answer is complete
                self._state = "done"
                if at < size:
                    self.reusable = False
                break
        self._chunk_state, self._left = state, left
        if pieces:
            self._keep(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _keep(self, data: bytes) -> None:
        if not data:
            return
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > BUFFER_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    # -- waiting ---------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until bytes arrive or the connection ends, at most the read timeout.

        One timer serves every wait of the connection: a wait only notes when it began, and
        the timer, when it fires, ends a wait that has lasted the whole timeout or sets itself
        for the rest of the current one. A stream's many short waits then cost no timer
        each."""
        waiter = self._waiter = self._loop.create_future()
        self._wait_began = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(
                self._wait_began + self._pool.read_timeout, self._check_wait
            )
        try:
            await waiter
        finally:
            self._waiter = None

    def _check_wait(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # no wait now: the next one sets the timer again
        due = self._wait_began + self._pool.read_timeout
        if self._loop.time() >= due:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self._loop.call_at(due, self._check_wait)

    # -- the client's side -----------------------------------------------------------------

    async def send(self, request: bytes, body: bytes | None, head_only: bool) -> None:
        transport = self.transport
        if transport is None or self.closed:
            raise Disconnected("the connection to the upstream was closed")
        self._state, self._head_only, self._head = "head", head_only, None
        self._body, self._buffered, self._error = [], 0, None
        if body and len(body) <= DECODE_STEP:
            transport.write(request + body)
        else:
            transport.write(request)
            if body:
                transport.write(body)
        if self._write_paused:
            self._drained = self._loop.create_future()
            try:
                await asyncio.wait_for(self._drained, self._pool.read_timeout)
            finally:
                self._drained = None

    async def head(self) -> tuple[int, str, CIMultiDictProxy[str]]:
        while self._head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._head

    async def read(self) -> bytes:
        """What arrived of the body since the last read; b"" once it is complete."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._state == "done":
                return b""
            await self._wait()
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        self._body, self._buffered = [], 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def complete(self) -> bool:
        return self._state == "done" and not self._body and self._error is None

    def rest(self) -> None:
        """Between requests: idle in the pool from now."""
        self._state = "idle"
        self.idle_since = time.monotonic()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _parse_head(raw: bytes) -> tuple[int, str, CIMultiDict[str], bool]:
    """Status, reason, headers and whether the connection may be kept, from an answer's head
    (without its final blank line)."""
    lines = raw.decode("utf-8", "surrogateescape").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in {"HTTP/1.1", "HTTP/1.0"} or len(code) != 3 or not code.isdigit():
        raise BadAnswer("the upstream's answer does not start with an HTTP/1.x status line")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or name[0] in " \t":
            raise BadAnswer("the upstream sent a malformed header line")
        headers.add(name, value.strip(" \t"))
    connection = ",".join(headers.getall("Connection", ())).lower()
    keep = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    return int(code), reason, headers, keep


class UpstreamAnswer:
    """An answer being read: its head, then its (decoded) body by ``readany``. Use it as an
    async context manager, or call ``release`` (or ``close``) when done."""

    def __init__(
        self,
        client: UpstreamClient,
        connection: _Connection,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
    ) -> None:
        self._client = client
        self._connection: _Connection | None = connection
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and _is_number(length) else None
        media = headers.get("Content-Type", "application/octet-stream")
        self.content_type = media.split(";", 1)[0].strip().lower()
        coding = headers.get("Content-Encoding", "identity").strip().lower()
        self._decoder = None if coding in {"", "identity"} else _decoder(coding)
        self._flushed = False

    async def readany(self) -> bytes:
        """The next part of the body as it arrived (decoded); b"" at its end."""
        decoder = self._decoder
        if decoder is not None and decoder.pending:
            return decoder.more()
        while True:
            connection = self._connection
            if connection is None:
                return b""
            data = await connection.read()
            if decoder is None:
                return data
            if not data:
                if self._flushed:
                    return b""
                self._flushed = True
                return decoder.flush()
            out = decoder.feed(data)
            if out:
                return out

    def release(self) -> None:
        """Done: the connection goes back to the pool if the answer was read to its end."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client.give_back(connection)

    def close(self) -> None:
        """Done early: the connection is closed, which stops the upstream's answer."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()
            self._client.give_back(connection)

    async def __aenter__(self) -> UpstreamAnswer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class UpstreamClient:
    """Requests to one origin (``base_url``'s scheme, host and port) over a pool of
    keep-alive connections. Create it inside the running event loop."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 100,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls`` verifies an https upstream; by default the system's trusted CAs (which
        ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` override), with the host name checked."""
        url = URL(base_url)
        if url.scheme not in {"http", "https"} or not url.raw_host:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.loop = asyncio.get_running_loop()
        self.read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._host = url.raw_host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = (tls or ssl.create_default_context()) if url.scheme == "https" else None
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.authority = host if url.is_default_port() else f"{host}:{self._port}"
        self.base_path = url.raw_path.rstrip("/")
        self._limit = max_connections
        self._open = 0
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    def target(self, tail: str, query_string: str = "") -> str:
        """The request target for ``tail`` (an already-encoded path below the base)."""
        target = self.base_path + "/" + tail.lstrip("/")
        return target + "?" + query_string if query_string else target

    async def request(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None
    ) -> UpstreamAnswer:
        """Send ``method target`` with ``headers`` (Host and Content-Length are added) and
        ``body``; return once the answer's head has arrived."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.authority}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body or method not in {"GET", "HEAD", "DELETE", "OPTIONS"}:
            lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
        head = "".join(lines) + "\r\n"
        breaks = len(lines) + 2  # the request line, Host, each header, the blank line
        if head.count("\n") != breaks or head.count("\r") != breaks:
            raise ValueError("a request header holds a line break")
        request = head.encode("utf-8", "surrogateescape")
        connection = await self._acquire()
        try:
            await connection.send(request, body, method == "HEAD")
            status, reason, answer_headers = await connection.head()
            return UpstreamAnswer(self, connection, status, reason, answer_headers)
        except BaseException:
            connection.abort()
            self.give_back(connection)
            raise

    async def close(self) -> None:
        """Close every connection; requests in flight fail."""
        self._closed = True
        for connection in [*self._idle, *self._busy]:
            connection.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the upstream client is closed"))

    # -- the pool --------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise ConnectFailed("the upstream client is closed")
            now = time.monotonic()
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed and now - connection.idle_since < KEEPALIVE_SECONDS:
                    self._busy.add(connection)
                    return connection
                connection.abort()
            if self._open < self._limit:
                self._open += 1
                try:
                    connection = await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                self._busy.add(connection)
                return connection
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()  # woken but leaving: pass the turn on
                raise

    async def _connect(self) -> _Connection:
        connection = _Connection(self)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self.loop.create_connection(
                    lambda: connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise TimeoutError("connecting to the upstream timed out") from None
        except OSError as error:  # refused, unreachable, DNS, TLS (ssl.SSLError is one)
            raise ConnectFailed(f"cannot connect to the upstream ({error})") from None
        connection.counted = True
        return connection

    def give_back(self, connection: _Connection) -> None:
        """A connection whose request is over: kept if it can serve another, else closed."""
        self._busy.discard(connection)
        if connection.closed:
            return  # forget() has counted it out
        if connection.reusable and connection.complete and not self._closed:
            connection.rest()
            self._idle.append(connection)
            self._wake_one()
        else:
            connection.abort()  # connection_lost → forget

    def forget(self, connection: _Connection) -> None:
        """A connection was closed (by either side): it no longer counts."""
        if not connection.counted:
            return  # closed while connecting: _acquire has counted it out
        connection.counted = False
        self._open -= 1
        self._busy.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
