"""UpstreamClient against real servers that write exact bytes: framing, pooling, errors."""

from __future__ import annotations

import asyncio
import functools
import gzip
import random
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from multidict import CIMultiDict

from proxy.upstream_client import (
    BUFFER_HIGH,
    DECODE_STEP,
    HEAD_LIMIT,
    BadAnswer,
    ConnectFailed,
    Disconnected,
    UpstreamAnswer,
    UpstreamClient,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
RECV_SIZE = 1 << 18  # the most an asyncio socket transport reads at once


@dataclass
class Received:
    line: str
    headers: CIMultiDict[str]
    body: bytes


class Peer:
    """The server's side of one accepted connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log: list[Received]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.gone = asyncio.Event()
        self._log = log

    async def receive(self) -> Received | None:
        """The next request on this connection, or None once the client closed it."""
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.gone.set()
            return None
        line, *fields = raw[:-4].decode("utf-8", "surrogateescape").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for field in fields:
            name, _, value = field.partition(":")
            headers.add(name, value.strip())
        body = await self.reader.readexactly(int(headers.get("Content-Length", "0")))
        received = Received(line, headers, body)
        self._log.append(received)
        return received

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def dribble(self, data: bytes, step: int = 1) -> None:
        for at in range(0, len(data), step):
            self.writer.write(data[at : at + step])
            await _turns(2)

    async def until_closed(self) -> None:
        try:
            while await self.reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
        self.gone.set()


Script = Callable[[Peer], Awaitable[None]]


class Scripted:
    """A raw TCP server running ``script`` on each connection, with a client for it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.peers: list[Peer] = []
        self.requests: list[Received] = []
        self.client: UpstreamClient
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def accepted(self) -> int:
        return len(self.peers)

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> str:
        self._server = await asyncio.start_server(self._accept, host, port, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://{host}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(reader, writer, self.requests)
        self.peers.append(peer)
        try:
            await self.script(peer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            peer.gone.set()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for peer in self.peers:
            peer.writer.close()


Serve = Callable[..., Awaitable[Scripted]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[Scripted] = []

    async def start(
        script: Script, base: str = "", server_tls: ssl.SSLContext | None = None, **options: Any
    ) -> Scripted:
        upstream = Scripted(script)
        started.append(upstream)
        url = await upstream.start(tls=server_tls)
        options.setdefault("read_timeout", 2.0)
        upstream.client = UpstreamClient(url + base, **options)
        return upstream

    yield start
    for upstream in started:
        await upstream.client.close()
        await upstream.stop()


async def _turns(count: int) -> None:
    """Let the loop go round ``count`` times, so the bytes written so far are read alone."""
    for _ in range(count):
        await asyncio.sleep(0)


def replying(*answers: bytes) -> Script:
    """Each request, on whichever connection, gets the next answer (the last one repeats)."""
    served = 0

    async def script(peer: Peer) -> None:
        nonlocal served
        while await peer.receive() is not None:
            peer.send(answers[min(served, len(answers) - 1)])
            served += 1

    return script


def sending(data: bytes, *, step: int = 0, then_close: bool = False) -> Script:
    """Answer the first request with ``data`` (``step`` bytes at a time if given), then
    close or wait for the client to close."""

    async def script(peer: Peer) -> None:
        await peer.receive()
        if step:
            await peer.dribble(data, step)
        else:
            peer.send(data)
        if then_close:
            peer.writer.close()
            return
        await peer.until_closed()

    return script


def chunked(body: bytes, head: str = "HTTP/1.1 200 OK") -> bytes:
    return f"{head}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body


async def get(client: UpstreamClient, method: str = "GET") -> UpstreamAnswer:
    return await client.request(method, "/", CIMultiDict(), None)


async def read_all(answer: UpstreamAnswer) -> bytes:
    parts = []
    while part := await answer.readany():
        parts.append(part)
    return b"".join(parts)


async def fetch(client: UpstreamClient, method: str = "GET") -> bytes:
    async with await get(client, method) as answer:
        return await read_all(answer)


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@functools.cache
def _gzip_bomb() -> bytes:
    return gzip.compress(bytes(64 << 20), compresslevel=9)


# -- framing ---------------------------------------------------------------------------------


async def test_a_content_length_answer_in_one_packet_is_read_whole(serve: Serve) -> None:
    head = (
        b"HTTP/1.1 201 Created Here\r\nContent-Length: 11\r\n"
        b"Content-Type: Text/Plain; charset=utf-8\r\nX-Many: 1\r\nX-Many: 2\r\n\r\n"
    )
    upstream = await serve(replying(head + b"hello world"))
    async with await get(upstream.client) as answer:
        assert (answer.status, answer.reason) == (201, "Created Here")
        assert answer.content_length == 11
        assert answer.content_type == "text/plain"
        assert answer.headers.getall("x-many") == ["1", "2"]
        assert await read_all(answer) == b"hello world"
        assert await answer.readany() == b""


@pytest.mark.parametrize("step", [1, 3, 7])
async def test_a_content_length_answer_split_anywhere_is_read_whole(
    serve: Serve, step: int
) -> None:
    body = bytes(range(200))
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\nX-A: b\r\n\r\n" + body
    upstream = await serve(sending(data, step=step))
    async with await get(upstream.client) as answer:
        assert answer.status == 200
        assert answer.headers["X-A"] == "b"
        assert await read_all(answer) == body


async def test_the_request_reaches_the_server_as_given(serve: Serve) -> None:
    upstream = await serve(replying(OK), base="/v1/")
    headers = CIMultiDict([("Authorization", "Bearer k"), ("X-Many", "1"), ("X-Many", "2")])
    target = upstream.client.target("/chat/completions", "a=1&b=%20")
    async with await upstream.client.request("POST", target, headers, b'{"a": 1}') as answer:
        await read_all(answer)
    (request,) = upstream.requests
    assert request.line == "POST /v1/chat/completions?a=1&b=%20 HTTP/1.1"
    assert request.headers["Host"] == f"127.0.0.1:{upstream.port}"
    assert request.headers["Content-Length"] == "8"
    assert request.headers["Authorization"] == "Bearer k"
    assert request.headers.getall("X-Many") == ["1", "2"]
    assert request.body == b'{"a": 1}'


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [("GET", None, None), ("HEAD", None, None), ("POST", None, "0"), ("DELETE", b"x", "1")],
)
async def test_content_length_is_sent_with_a_body_or_a_method_that_takes_one(
    serve: Serve, method: str, body: bytes | None, length: str | None
) -> None:
    upstream = await serve(replying(OK))
    async with await upstream.client.request(method, "/", CIMultiDict(), body) as answer:
        await read_all(answer)
    assert upstream.requests[0].headers.get("Content-Length") == length


async def test_a_large_request_body_reaches_the_server_whole(serve: Serve) -> None:
    body = random.Random(1).randbytes(3 * DECODE_STEP + 5)
    upstream = await serve(replying(OK))
    async with await upstream.client.request("PUT", "/big", CIMultiDict(), body) as answer:
        assert await read_all(answer) == b"ok"
    assert upstream.requests[0].body == body


async def test_the_host_header_leaves_out_the_default_port() -> None:
    upstream = Scripted(replying(OK))
    try:
        url = await upstream.start("127.80.80.80", 80)
    except OSError as error:
        pytest.skip(f"cannot listen on port 80 ({error})")
    assert url.endswith(":80")
    client = UpstreamClient(url)
    try:
        assert await fetch(client) == b"ok"
    finally:
        await client.close()
        await upstream.stop()
    assert upstream.requests[0].headers["Host"] == "127.80.80.80"


CHUNKED_BODY = (
    b"005;x=y\r\nhello\r\n"
    b'10;name="quoted;value"\r\n, chunked world!\r\n'
    b"1\r\n\n\r\n"
    b"0\r\nTrailer-One: 1\r\nTrailer-Two: 2\r\n\r\n"
)


@pytest.mark.parametrize("step", [0, 1, 2, 5])
async def test_a_chunked_answer_split_anywhere_is_read_whole(serve: Serve, step: int) -> None:
    async def script(peer: Peer) -> None:
        while await peer.receive() is not None:
            await peer.dribble(chunked(CHUNKED_BODY), step or len(CHUNKED_BODY) + 100)

    upstream = await serve(script)
    async with await get(upstream.client) as answer:
        assert answer.content_length is None
        assert await read_all(answer) == b"hello, chunked world!\n"
    assert await fetch(upstream.client) == b"hello, chunked world!\n"
    assert upstream.accepted == 1


async def test_chunked_framing_wins_over_a_content_length(serve: Serve) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    upstream = await serve(replying(data + b"5\r\nhello\r\n0\r\n\r\n"))
    assert await fetch(upstream.client) == b"hello"


@pytest.mark.parametrize(
    "size",
    ["zz", "", " ", "-5", "5 5", "0x5", "+5", "5_0", "\u0665"],
    ids=["zz", "empty", "space", "minus", "inner-space", "0x", "plus", "underscore", "arabic-5"],
)
async def test_an_invalid_chunk_size_is_a_bad_answer(serve: Serve, size: str) -> None:
    body = f"{size}\r\nhello\r\n0\r\n\r\n".encode()
    upstream = await serve(sending(chunked(body)), read_timeout=0.3)
    async with await get(upstream.client) as answer:
        with pytest.raises(BadAnswer):
            await read_all(answer)


async def test_a_chunk_without_its_crlf_is_a_bad_answer(serve: Serve) -> None:
    upstream = await serve(sending(chunked(b"5\r\nhelloXX\r\n0\r\n\r\n")))
    async with await get(upstream.client) as answer:
        with pytest.raises(BadAnswer):
            await read_all(answer)


async def test_a_bad_chunk_arriving_after_the_head_is_a_bad_answer(serve: Serve) -> None:
    async def script(peer: Peer) -> None:
        await peer.receive()
        await peer.dribble(chunked(b""), 1 << 16)
        peer.send(b"zz\r\n")
        await peer.until_closed()

    upstream = await serve(script)
    async with await get(upstream.client) as answer:
        with pytest.raises(BadAnswer):
            await read_all(answer)


async def test_a_close_delimited_answer_runs_until_the_server_closes(serve: Serve) -> None:
    async def script(peer: Peer) -> None:
        await peer.receive()
        await peer.dribble(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", 4)
        peer.writer.close()

    upstream = await serve(script)
    async with await get(upstream.client) as answer:
        assert answer.content_length is None
        assert await read_all(answer) == b"until the end"
    async with await get(upstream.client) as answer:
        assert await read_all(answer) == b"until the end"
    assert upstream.accepted == 2


@pytest.mark.parametrize("first", [b"HTTP/1.1 100 Continue", b"HTTP/1.1 103 Early Hints"])
@pytest.mark.parametrize("step", [0, 1], ids=["whole", "byte-by-byte"])
async def test_interim_heads_are_skipped(serve: Serve, first: bytes, step: int) -> None:
    data = (
        first + b"\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
    )
    upstream = await serve(sending(data, step=step))
    async with await get(upstream.client) as answer:
        assert answer.status == 200
        assert "Link" not in answer.headers
        assert await read_all(answer) == b"final"


@pytest.mark.parametrize(
    ("method", "head"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
)
async def test_head_204_and_304_answers_have_no_body(
    serve: Serve, method: str, head: bytes
) -> None:
    upstream = await serve(replying(head, OK))
    async with await get(upstream.client, method) as answer:
        assert await answer.readany() == b""
    assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 1


# -- keep-alive ------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(serve: Serve) -> None:
    upstream = await serve(replying(OK))
    for _ in range(3):
        assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 1
    assert len(upstream.requests) == 3


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close",
        b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close",
        b"HTTP/1.0 200 OK",
    ],
)
async def test_a_connection_the_server_asks_to_close_is_not_reused(
    serve: Serve, head: bytes
) -> None:
    upstream = await serve(replying(head + b"\r\nContent-Length: 2\r\n\r\nok"))
    assert await fetch(upstream.client) == b"ok"
    assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 2
    await asyncio.wait_for(upstream.peers[0].gone.wait(), 1)


async def test_an_answer_naming_both_framings_is_read_chunked_on_a_connection_not_reused(
    serve: Serve,
) -> None:
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    upstream = await serve(replying(both + b"2\r\nok\r\n0\r\n\r\n", OK))
    assert await fetch(upstream.client) == b"ok"
    assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 2


async def test_an_http_1_0_keep_alive_connection_is_reused(serve: Serve) -> None:
    upstream = await serve(
        replying(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    )
    assert await fetch(upstream.client) == b"ok"
    assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 1


async def test_bytes_beyond_the_answer_make_its_connection_unusable(serve: Serve) -> None:
    upstream = await serve(replying(OK + b"HTTP/1.1 200 OK\r\n"))
    assert await fetch(upstream.client) == b"ok"
    assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 2


@pytest.mark.parametrize("done", [UpstreamAnswer.release, UpstreamAnswer.close])
async def test_an_answer_left_unread_closes_its_connection(
    serve: Serve, done: Callable[[UpstreamAnswer], None]
) -> None:
    async def script(peer: Peer) -> None:
        await peer.receive()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nstart")
        await peer.until_closed()

    upstream = await serve(script)
    answer = await get(upstream.client)
    assert await answer.readany() == b"start"
    done(answer)
    await asyncio.wait_for(upstream.peers[0].gone.wait(), 1)
    upstream.script = replying(OK)
    assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 2


# -- Content-Encoding ------------------------------------------------------------------------

PLAIN = b"The quick brown fox jumps over the lazy dog. " * 400


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("gzip", gzip.compress(PLAIN)),
        ("x-gzip", gzip.compress(PLAIN)),
        ("GZip", gzip.compress(PLAIN)),
        ("deflate", zlib.compress(PLAIN)),
        ("deflate", _raw_deflate(PLAIN)),
        ("identity", PLAIN),
    ],
    ids=["gzip", "x-gzip", "GZip", "deflate-zlib", "deflate-raw", "identity"],
)
@pytest.mark.parametrize("pieces", [1, 50])
async def test_an_encoded_answer_is_decoded(
    serve: Serve, coding: str, encoded: bytes, pieces: int
) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\nContent-Length: {len(encoded)}"
    data = head.encode() + b"\r\n\r\n" + encoded
    upstream = await serve(sending(data, step=-(-len(data) // pieces)))
    async with await get(upstream.client) as answer:
        assert await read_all(answer) == PLAIN


async def test_a_raw_deflate_answer_whose_first_byte_arrives_alone_is_decoded(
    serve: Serve,
) -> None:
    encoded = _raw_deflate(PLAIN)
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: {len(encoded)}"

    async def script(peer: Peer) -> None:
        await peer.receive()
        await peer.dribble(head.encode() + b"\r\n\r\n" + encoded[:1], 1 << 16)
        peer.send(encoded[1:])
        await peer.until_closed()

    upstream = await serve(script)
    async with await get(upstream.client) as answer:
        assert await read_all(answer) == PLAIN


async def test_a_gzip_bomb_is_read_in_bounded_parts(serve: Serve) -> None:
    bomb = _gzip_bomb()
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n"
    upstream = await serve(replying(head.encode() + bomb))
    total = 0
    async with await get(upstream.client) as answer:
        while part := await answer.readany():
            assert len(part) <= DECODE_STEP
            assert not part.strip(b"\0")
            total += len(part)
    assert total == 64 << 20


async def test_a_corrupt_gzip_body_is_a_bad_answer(serve: Serve) -> None:
    encoded = b"\x1f\x8b" + bytes(30)
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(encoded)}"
    upstream = await serve(sending(head.encode() + b"\r\n\r\n" + encoded))
    async with await get(upstream.client) as answer:
        with pytest.raises(BadAnswer):
            await read_all(answer)


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip"])
async def test_an_unknown_content_encoding_is_refused_and_its_connection_freed(
    serve: Serve, coding: str
) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: {coding}\r\nContent-Length: 2\r\n\r\nok"
    upstream = await serve(replying(head.encode(), OK), max_connections=1)
    with pytest.raises(BadAnswer):
        await get(upstream.client)
    async with asyncio.timeout(0.5):
        assert await fetch(upstream.client) == b"ok"


# -- errors ----------------------------------------------------------------------------------


async def test_a_refused_connection_is_connect_failed() -> None:
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    client = UpstreamClient(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ConnectFailed):
            await get(client)
    finally:
        await client.close()


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"])
async def test_a_server_closing_before_the_head_ends_is_disconnected(
    serve: Serve, sent: bytes
) -> None:
    upstream = await serve(sending(sent, then_close=True))
    with pytest.raises(Disconnected):
        await get(upstream.client)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        chunked(b"5\r\nhello\r\n"),
        chunked(b"5\r\nhel"),
        chunked(b"5\r\nhello\r\n0\r\nTrailer: 1\r\n"),
    ],
    ids=["length", "chunked-between", "chunked-inside", "chunked-trailer"],
)
async def test_a_server_closing_mid_body_is_disconnected_not_a_short_body(
    serve: Serve, data: bytes
) -> None:
    upstream = await serve(sending(data, then_close=True))
    async with await get(upstream.client) as answer:
        with pytest.raises(Disconnected):
            await read_all(answer)


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (HEAD_LIMIT + 10),
    ],
    ids=["ssh", "http2", "long-code", "no-code", "no-colon", "folded", "space", "endless"],
)
async def test_a_head_that_is_not_http_is_a_bad_answer(serve: Serve, data: bytes) -> None:
    upstream = await serve(sending(data))
    with pytest.raises(BadAnswer):
        await get(upstream.client)
    await asyncio.wait_for(upstream.peers[0].gone.wait(), 1)


@pytest.mark.parametrize(
    "lengths",
    [("abc",), ("-1",), ("1.5",), ("+5",), ("5, 6",), ("5", "6"), ("",), ("\u0665",), ("\u00b2",)],
    ids=["abc", "minus", "decimal", "plus", "list", "two", "empty", "arabic-5", "superscript-2"],
)
async def test_an_invalid_or_conflicting_content_length_is_a_bad_answer(
    serve: Serve, lengths: tuple[str, ...]
) -> None:
    fields = "".join(f"Content-Length: {length}\r\n" for length in lengths)
    data = f"HTTP/1.1 200 OK\r\n{fields}\r\nhello".encode()
    upstream = await serve(sending(data), read_timeout=0.3)
    with pytest.raises(BadAnswer):
        async with await get(upstream.client) as answer:
            await read_all(answer)


async def test_a_head_with_invalid_framing_fails_the_request_itself(serve: Serve) -> None:
    upstream = await serve(sending(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello"))
    with pytest.raises(BadAnswer):
        (await get(upstream.client)).release()


async def test_a_repeated_identical_content_length_is_accepted(serve: Serve) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok"
    upstream = await serve(replying(data))
    assert await fetch(upstream.client) == b"ok"


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n"])
async def test_a_missing_or_unending_head_times_out(serve: Serve, sent: bytes) -> None:
    upstream = await serve(sending(sent), read_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await get(upstream.client)
    assert 0.19 <= loop.time() - started < 1.5
    await asyncio.wait_for(upstream.peers[0].gone.wait(), 1)


async def test_a_stalled_body_times_out_in_readany(serve: Serve) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"
    upstream = await serve(sending(data), read_timeout=0.2)
    async with await get(upstream.client) as answer:
        assert await answer.readany() == b"hello"
        with pytest.raises(TimeoutError):
            await answer.readany()
    await asyncio.wait_for(upstream.peers[0].gone.wait(), 1)


async def test_a_stall_after_a_pause_gets_the_whole_timeout_from_its_own_start(
    serve: Serve,
) -> None:
    async def script(peer: Peer) -> None:
        await peer.receive()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await asyncio.sleep(0.3)  # a pause inside the timeout, then a piece, then a stall
        peer.send(b"hello")
        await peer.until_closed()

    upstream = await serve(script, read_timeout=0.5)
    loop = asyncio.get_running_loop()
    async with await get(upstream.client) as answer:
        assert await answer.readany() == b"hello"
        stalled = loop.time()
        with pytest.raises(TimeoutError):
            await answer.readany()
        assert 0.49 <= loop.time() - stalled < 2.0


async def test_a_body_that_keeps_flowing_outlives_the_read_timeout(serve: Serve) -> None:
    async def script(peer: Peer) -> None:
        await peer.receive()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):  # 0.75 s in all, each gap well inside the timeout
            await asyncio.sleep(0.15)
            peer.send(b"1\r\n.\r\n")
        peer.send(b"0\r\n\r\n")
        await peer.until_closed()

    upstream = await serve(script, read_timeout=0.6)
    assert await fetch(upstream.client) == b"." * 5


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/", [("X-Evil", "a\r\nX-Injected: 1")]),
        ("/", [("X-Evil", "a\nb")]),
        ("/", [("X-Evil", "a\rb")]),
        ("/", [("X-Evil\r\nX-Injected", "1")]),
        ("/ HTTP/1.1\r\nX-Injected: 1\r\nX:", []),
    ],
)
async def test_a_line_break_in_the_request_head_is_refused_before_sending(
    serve: Serve, target: str, headers: list[tuple[str, str]]
) -> None:
    upstream = await serve(replying(OK))
    with pytest.raises(ValueError, match="line break"):
        await upstream.client.request("POST", target, CIMultiDict(headers), b"x")
    assert await fetch(upstream.client) == b"ok"
    assert [request.line for request in upstream.requests] == ["GET / HTTP/1.1"]
    assert "X-Injected" not in upstream.requests[0].headers


# -- the pool --------------------------------------------------------------------------------


async def test_the_pool_opens_at_most_max_connections(serve: Serve) -> None:
    upstream = await serve(replying(OK), max_connections=2)
    tasks = [asyncio.create_task(get(upstream.client)) for _ in range(3)]
    first, second = await tasks[0], await tasks[1]
    assert upstream.accepted == 2
    assert not tasks[2].done()
    async with first:
        assert await read_all(first) == b"ok"
    async with await tasks[2] as third, second:
        assert await read_all(third) == b"ok"
        assert await read_all(second) == b"ok"
    assert upstream.accepted == 2


async def test_a_cancelled_wait_for_a_connection_leaks_no_place(serve: Serve) -> None:
    upstream = await serve(replying(OK), max_connections=1)
    first = await get(upstream.client)
    waiting = asyncio.create_task(get(upstream.client))
    await _turns(1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with first:
        await read_all(first)
    async with asyncio.timeout(1):
        assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 1


async def test_a_woken_waiter_that_is_cancelled_passes_its_turn_on(serve: Serve) -> None:
    upstream = await serve(replying(OK), max_connections=1)
    first = await get(upstream.client)
    woken, next_in_line = (asyncio.create_task(get(upstream.client)) for _ in range(2))
    await _turns(1)
    assert await read_all(first) == b"ok"
    first.release()
    woken.cancel()
    with pytest.raises(asyncio.CancelledError):
        await woken
    async with asyncio.timeout(1), await next_in_line as answer:
        assert await read_all(answer) == b"ok"
    assert upstream.accepted == 1


async def test_closing_the_client_fails_requests_waiting_for_a_connection(serve: Serve) -> None:
    upstream = await serve(replying(OK), max_connections=1)
    first = await get(upstream.client)
    waiting = asyncio.create_task(get(upstream.client))
    await _turns(1)
    await upstream.client.close()
    with pytest.raises(ConnectFailed):
        await waiting
    first.release()
    with pytest.raises(ConnectFailed):
        await get(upstream.client)


async def test_closing_the_client_ends_answers_in_flight(serve: Serve) -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"
    upstream = await serve(sending(data), read_timeout=1)
    async with await get(upstream.client) as answer:
        assert await answer.readany() == b"hello"
        await upstream.client.close()
        async with asyncio.timeout(0.5):
            await upstream.peers[0].gone.wait()
        with pytest.raises(Disconnected):
            await answer.readany()


# -- flow control ----------------------------------------------------------------------------


async def test_a_large_fast_body_read_slowly_arrives_whole_and_in_order(serve: Serve) -> None:
    body = random.Random(7).randbytes(8 << 20)
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    upstream = await serve(replying(head + body))
    parts = []
    async with await get(upstream.client) as answer:
        while part := await answer.readany():
            parts.append(part)
            await _turns(8)
    assert b"".join(parts) == body
    assert max(map(len, parts)) <= BUFFER_HIGH + RECV_SIZE


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_an_https_upstream_is_read_over_one_verified_connection(
    serve: Serve, ca: trustme.CA
) -> None:
    upstream = await serve(replying(OK), server_tls=server_tls(ca, "127.0.0.1"), tls=client_tls(ca))
    assert await fetch(upstream.client) == b"ok"
    assert await fetch(upstream.client) == b"ok"
    assert upstream.accepted == 1
    assert upstream.requests[0].headers["Host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize("case", ["untrusted", "another host"])
async def test_an_https_upstream_that_fails_verification_is_not_connected(
    serve: Serve, ca: trustme.CA, case: str
) -> None:
    issuer, name = (trustme.CA(), "127.0.0.1") if case == "untrusted" else (ca, "api.example")
    upstream = await serve(replying(OK), server_tls=server_tls(issuer, name), tls=client_tls(ca))
    with pytest.raises(ConnectFailed, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        await fetch(upstream.client)
    assert upstream.requests == []


async def test_by_default_an_https_upstream_is_verified_by_the_system_trust_store(
    serve: Serve, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(trusted))
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted))
    upstream = await serve(replying(OK), server_tls=server_tls(ca, "127.0.0.1"))
    assert await fetch(upstream.client) == b"ok"


async def test_a_connection_that_is_not_accepted_in_time_is_a_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: once its queue is full, new connections hang
    port = listener.getsockname()[1]
    waiting = []
    for _ in range(4):
        queued = socket.socket()
        queued.setblocking(False)
        queued.connect_ex(("127.0.0.1", port))
        waiting.append(queued)
    client = UpstreamClient(f"http://127.0.0.1:{port}", connect_timeout=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(TimeoutError, match="connecting"):
            await fetch(client)
        assert 0.29 <= loop.time() - started < 2.0
    finally:
        await client.close()
        for queued in [*waiting, listener]:
            queued.close()
