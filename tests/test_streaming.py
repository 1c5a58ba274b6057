"""Streams: unbuffered and byte-identical (R7), no total timeout (R8), early disconnects (R5)."""

from __future__ import annotations

import asyncio
import io
import random
import sqlite3
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.fakes import FakeUpstream, Reply, chunks, sse

AUTH = {"Authorization": "Bearer sk-stream"}
CHAT = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "tell me a story"}],
    "store": True,
    "stream": True,
}


def stored(tmp_path: Path) -> dict[str, dict]:
    with sqlite3.connect(tmp_path / "completions.db") as db:
        return {
            row[0]: orjson.loads(row[1])
            for row in db.execute("SELECT id, completion FROM completions")
        }


async def test_each_piece_reaches_the_client_at_once(proxy, upstream: FakeUpstream) -> None:
    pieces = sse(chunks(CHAT, "chatcmpl-timed", pieces=8))
    upstream.script(Reply(sse=pieces, piece_delay=0.1))
    ends = [sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]
    arrived: list[float] = []
    received = b""
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.make_url("/v1/chat/completions"), json=CHAT, headers=AUTH) as response,
    ):
        while data := await response.content.readany():
            received += data
            now = time.perf_counter()
            while len(arrived) < len(ends) and len(received) >= ends[len(arrived)]:
                arrived.append(now)
    assert received == b"".join(pieces)
    delays = [a - s for a, s in zip(arrived, upstream.sent_at, strict=True)]
    assert max(delays) <= 0.05, delays


@pytest.mark.parametrize("seed", range(8))
async def test_bytes_are_identical_over_random_split_points(
    proxy, upstream: FakeUpstream, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    request = {**CHAT, "stream_options": {"include_usage": True}, "n": 2}
    request["messages"] = [{"role": "user", "content": "héllo wörld 😀 中文 " * 5}]
    whole = b"".join(sse(chunks(request, f"chatcmpl-split{seed}", pieces=10)))
    cuts = sorted(rng.sample(range(1, len(whole)), 25))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    upstream.script(Reply(sse=pieces))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.make_url("/v1/chat/completions"), json=request, headers=AUTH
        ) as response,
    ):
        assert await response.read() == whole
    completion = stored(tmp_path)[f"chatcmpl-split{seed}"]
    assert [c["message"]["content"] for c in completion["choices"]] == [
        "echo: " + "héllo wörld 😀 中文 " * 5
    ] * 2
    assert completion["usage"]["total_tokens"] == 12


async def test_long_stream_is_not_cut_by_a_total_timeout(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream={"read_timeout": 0.5})
    pieces = sse(chunks(CHAT, "chatcmpl-long", pieces=30))
    upstream.script(Reply(sse=pieces, piece_delay=0.1))  # ~3 s in all, six read timeouts long
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.make_url("/v1/chat/completions"), json=CHAT, headers=AUTH) as response,
    ):
        assert await response.read() == b"".join(pieces)
    assert "chatcmpl-long" in stored(tmp_path)


@pytest.mark.slow
async def test_twenty_second_stream_then_a_stall(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream={"read_timeout": 1.0})
    long_request = {**CHAT, "messages": [{"role": "user", "content": "x" * 400}]}
    pieces = sse(chunks(long_request, "chatcmpl-20s", pieces=406))
    assert len(pieces) > 200  # 20 s at 0.1 s a piece
    upstream.script(Reply(sse=pieces, piece_delay=0.1))
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.make_url("/v1/chat/completions"), json=CHAT, headers=AUTH) as response,
    ):
        assert await response.read() == b"".join(pieces)
    upstream.script(
        Reply(
            sse=sse(chunks(long_request, "chatcmpl-stall", pieces=406)),
            piece_delay=0.1,
            hang_after=100,
        )
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.make_url("/v1/chat/completions"), json=CHAT, headers=AUTH) as response,
    ):
        last_byte = time.perf_counter()
        with pytest.raises(aiohttp.ClientPayloadError):
            while await response.content.readany():
                last_byte = time.perf_counter()
        assert 0.9 <= time.perf_counter() - last_byte <= 1.1  # cut at sock_read ±10%
    assert set(stored(tmp_path)) == {"chatcmpl-20s"}


async def test_clients_leaving_early_close_their_upstream_reads(
    proxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    json_logs: io.StringIO,
) -> None:
    total, leaving = 200, 50
    upstream.script(
        *[
            Reply(sse=sse(chunks(CHAT, f"chatcmpl-r5-{n:03d}", pieces=20)), piece_delay=0.02)
            for n in range(total)
        ]
    )
    left_at: list[float] = []

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        async with session.post(
            proxy.make_url("/v1/chat/completions"), json=CHAT, headers=AUTH
        ) as response:
            if n < leaving:
                await response.content.readany()
                left_at.append(time.perf_counter())
                response.close()
                return
            await response.read()

    connector = aiohttp.TCPConnector(limit=total)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, n) for n in range(total)))
    deadline = time.perf_counter() + 2
    while len(upstream.closed_at) < leaving and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    assert len(upstream.closed_at) == leaving
    assert max(upstream.closed_at) - max(left_at) <= 1.0
    assert len(stored(tmp_path)) == total - leaving
    entries = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    access = [e for e in entries if e["logger"] == "proxy.access"]
    assert sum(e.get("outcome") == "client_gone" for e in access) == leaving
    assert sum(e.get("outcome") == "complete" for e in access) == total - leaving
    assert not [e for e in entries if "exception" in e or e["level"] in ("error", "critical")]
