"""Upstream faults and client faults map to clear answers, and the proxy keeps serving."""

from __future__ import annotations

import asyncio
import gzip
import io
import sqlite3
import ssl
import time
import zlib
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
import trustme

from tests.fakes import FakeUpstream, Reply, chunks, completion, sse
from tests.helpers import assert_error_shape, free_port, sdk

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "store": True}
AUTH = {"Authorization": "Bearer sk-faults"}


def stored_ids(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "completions.db") as db:
        return [row[0] for row in db.execute("SELECT id FROM completions ORDER BY seq")]


async def still_serving(proxy) -> None:
    async with sdk(proxy) as client:
        made = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "ok"}], store=True
        )
        assert (await client.chat.completions.retrieve(made.id)).id == made.id


async def test_refused_upstream_is_502_quickly(proxy_factory) -> None:
    proxy = await proxy_factory(upstream={"url": f"http://127.0.0.1:{free_port()}/v1"})
    started = time.perf_counter()
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status == 502
    assert time.perf_counter() - started < 1.0
    body = await response.json()
    assert_error_shape(body, response.headers)
    assert body["error"]["type"] == "upstream_error"


async def test_an_answer_in_an_unreadable_encoding_is_a_502_and_stores_nothing(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(Reply(json=completion(CHAT, "chatcmpl-zstd"), headers={}))
    upstream.replies[0].headers["Content-Encoding"] = "zstd"
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status == 502
    body = await response.json()
    assert_error_shape(body, response.headers)
    assert "cannot read" in body["error"]["message"]
    assert stored_ids(tmp_path) == []
    await still_serving(proxy)


@pytest.mark.parametrize("trusted", [True, False])
async def test_an_https_upstream_is_verified_by_the_system_trust_store(
    proxy_factory, aiohttp_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trusted: bool
) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app, ssl=server_tls)
    if trusted:  # an operator's own CA, the way OpenSSL reads it
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    proxy = await proxy_factory(upstream={"url": str(server.make_url("/v1"))})
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    if trusted:
        assert response.status == 200
        assert stored_ids(tmp_path) == [(await response.json())["id"]]
    else:
        assert response.status == 502
        assert_error_shape(await response.json(), response.headers)
        assert fake.chat_requests() == []


async def test_silent_upstream_is_504_at_the_read_timeout(
    proxy_factory, upstream: FakeUpstream
) -> None:
    proxy = await proxy_factory(upstream={"read_timeout": 0.5})
    upstream.script(Reply(hang=True))
    started = time.perf_counter()
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    elapsed = time.perf_counter() - started
    assert response.status == 504
    assert 0.45 <= elapsed <= 0.6
    assert_error_shape(await response.json(), response.headers)
    await still_serving(proxy)


async def test_upstream_errors_are_relayed_byte_identical_and_not_stored(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    error = b'{"error": {"message": "nope", "type": "server_error", "param": null, "code": null}}\n'
    upstream.script(Reply(status=500, body=error, headers={"x-request-id": "req-up-500"}))
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status == 500
    assert await response.read() == error
    assert response.headers["x-request-id"] == "req-up-500"
    upstream.script(Reply(status=429, body=b"slow down", content_type="text/plain"))
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status == 429
    assert await response.read() == b"slow down"
    assert response.headers["Content-Type"].startswith("text/plain")
    assert stored_ids(tmp_path) == []
    await still_serving(proxy)


async def test_sdk_sees_relayed_upstream_errors(
    alice: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(
        Reply(
            status=400,
            json={
                "error": {
                    "message": "bad model",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": None,
                }
            },
        )
    )
    with pytest.raises(openai.BadRequestError) as caught:
        await alice.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}], store=True
        )
    assert caught.value.body["message"] == "bad model"  # type: ignore[index]


async def test_drop_mid_stream_aborts_the_client_and_stores_nothing(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    pieces = sse(chunks({**CHAT, "stream": True}, "chatcmpl-dropped", pieces=6))
    upstream.script(Reply(sse=pieces, drop_after=3))
    response = await proxy.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert stored_ids(tmp_path) == []
    await still_serving(proxy)


async def test_drop_mid_stream_is_an_error_for_the_sdk(
    alice: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    pieces = sse(chunks({**CHAT, "stream": True}, "chatcmpl-dropped2", pieces=6))
    upstream.script(Reply(sse=pieces, drop_after=3))
    stream = await alice.chat.completions.create(
        model="gpt-test", messages=CHAT["messages"], store=True, stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_stall_mid_stream_is_cut_at_the_read_timeout(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await proxy_factory(upstream={"read_timeout": 0.5})
    pieces = sse(chunks({**CHAT, "stream": True}, "chatcmpl-stall", pieces=6))
    upstream.script(Reply(sse=pieces, hang_after=2))
    response = await proxy.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    started = time.perf_counter()
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert 0.45 <= time.perf_counter() - started <= 0.6
    assert stored_ids(tmp_path) == []


async def test_client_gone_mid_stream_closes_the_upstream(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    pieces = sse(chunks({**CHAT, "stream": True}, "chatcmpl-gone", pieces=40))
    upstream.script(Reply(sse=pieces, piece_delay=0.02))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            proxy.make_url("/v1/chat/completions"), json={**CHAT, "stream": True}, headers=AUTH
        )
        await response.content.readany()
        response.close()  # the client goes away mid-stream
    await asyncio.wait_for(upstream.closed_early.wait(), 1.0)
    assert stored_ids(tmp_path) == []
    await still_serving(proxy)


async def test_client_gone_while_waiting_for_upstream_cancels_it(
    proxy, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(sse=[b"data: {}\n\n"], delay=30))
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(
            session.post(proxy.make_url("/v1/chat/completions"), json=CHAT, headers=AUTH)
        )
        await upstream.arrived.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # The proxy's handler is cancelled, so its upstream request is closed: the fake sees it.
    await asyncio.wait_for(upstream.closed_early.wait(), 1.0)
    await still_serving(proxy)


async def test_garbage_stream_is_relayed_and_not_stored(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    garbage = [b"this is not\n", b"server-sent events\n\n", b"data: {not json}\n\n"]
    upstream.script(Reply(sse=garbage))
    response = await proxy.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert await response.read() == b"".join(garbage)
    assert stored_ids(tmp_path) == []
    await still_serving(proxy)


async def test_non_json_plain_answer_is_relayed_and_not_stored(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.script(Reply(body=b"<html>oops</html>", content_type="text/html"))
    response = await proxy.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status == 200
    assert await response.read() == b"<html>oops</html>"
    assert stored_ids(tmp_path) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_gzip_upstream_is_decoded_consistently(
    proxy, upstream: FakeUpstream, tmp_path: Path, stream: bool
) -> None:
    request = {**CHAT, "stream": stream}
    if stream:
        upstream.script(Reply(sse=sse(chunks(request, "chatcmpl-gz")), gzip=True))
    else:
        upstream.script(Reply(json=completion(request, "chatcmpl-gz"), gzip=True))
    async with aiohttp.ClientSession(auto_decompress=False) as strict:
        response = await strict.post(
            proxy.make_url("/v1/chat/completions"),
            json=request,
            headers={**AUTH, "Accept-Encoding": "gzip"},
        )
        raw = await response.read()
        encoding = response.headers.get("Content-Encoding")
    assert encoding in (None, "identity")
    if stream:
        assert raw.endswith(b"data: [DONE]\n\n")
    else:
        assert orjson.loads(raw)["id"] == "chatcmpl-gz"
    assert upstream.chat_requests()[-1].headers["Accept-Encoding"] == "identity"
    assert stored_ids(tmp_path) == ["chatcmpl-gz"]


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_compressed_request_body_goes_upstream_decoded_without_its_coding(
    proxy, upstream: FakeUpstream, tmp_path: Path, coding: str
) -> None:
    """The server decodes a gzip or deflate request body as it reads it, so what goes
    upstream is the plain body, which its Content-Encoding must no longer claim."""
    upstream.script(Reply(json=completion(CHAT, "chatcmpl-zipped-up")))
    plain = orjson.dumps(CHAT)
    body = gzip.compress(plain) if coding == "gzip" else zlib.compress(plain)
    async with aiohttp.ClientSession() as client:
        response = await client.post(
            proxy.make_url("/v1/chat/completions"),
            data=body,
            headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": coding},
        )
        assert response.status == 200, await response.text()
    seen = upstream.chat_requests()[-1]
    assert "Content-Encoding" not in seen.headers
    assert seen.body == plain
    assert stored_ids(tmp_path) == ["chatcmpl-zipped-up"]


async def test_a_request_body_in_a_coding_the_server_leaves_alone_keeps_its_header(
    proxy, upstream: FakeUpstream
) -> None:
    """A coding the server does not decode reaches the upstream as sent, header and bytes,
    for the upstream to accept or refuse."""
    upstream.script(Reply(json={"object": "list", "data": []}))
    async with aiohttp.ClientSession() as client:
        response = await client.post(
            proxy.make_url("/v1/embeddings"),
            data=b"opaque bytes",
            headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": "x-custom"},
        )
        assert response.status == 200, await response.text()
    seen = upstream.received[-1]
    assert seen.path == "/v1/embeddings"
    assert seen.headers["Content-Encoding"] == "x-custom"
    assert seen.body == b"opaque bytes"


async def test_an_answer_of_known_length_is_relayed_with_that_length(
    proxy, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(json=completion(CHAT, "chatcmpl-len")))
    async with aiohttp.ClientSession() as client:
        response = await client.post(
            proxy.make_url("/v1/chat/completions"), json={**CHAT, "store": False}, headers=AUTH
        )
        body = await response.read()
    assert response.status == 200
    assert "Transfer-Encoding" not in response.headers
    assert response.headers["Content-Length"] == str(len(body))
    assert orjson.loads(body)["id"] == "chatcmpl-len"


async def test_hop_by_hop_headers_never_cross(proxy, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(
            json=completion(CHAT, "chatcmpl-hop"),
            headers={
                "Connection": "x-up-hop",
                "X-Up-Hop": "1",
                "Keep-Alive": "timeout=5",
                "X-Up-Kept": "1",
            },
        )
    )
    response = await proxy.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            **AUTH,
            "Connection": "keep-alive, x-client-hop",
            "X-Client-Hop": "1",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "TE": "trailers",
            "X-Client-Kept": "1",
        },
    )
    assert response.status == 200
    received = {k.lower() for k in upstream.chat_requests()[-1].headers}
    assert "x-client-hop" not in received
    assert "proxy-authorization" not in received
    assert "te" not in received
    assert "x-client-kept" in received
    assert "X-Up-Hop" not in response.headers
    assert "Keep-Alive" not in response.headers
    assert response.headers["X-Up-Kept"] == "1"
    assert "proxy;dur=" in response.headers["Server-Timing"]


async def test_redirects_are_relayed_not_followed(
    proxy, upstream: FakeUpstream, aiohttp_server
) -> None:
    elsewhere = FakeUpstream()
    other = await aiohttp_server(elsewhere.app)
    upstream.script(
        Reply(
            status=307, body=b"", headers={"Location": str(other.make_url("/v1/chat/completions"))}
        )
    )
    response = await proxy.post(
        "/v1/chat/completions", json=CHAT, headers=AUTH, allow_redirects=False
    )
    assert response.status == 307
    assert elsewhere.received == []


async def test_absolute_form_request_cannot_steer_the_upstream(
    proxy, upstream: FakeUpstream, aiohttp_server
) -> None:
    elsewhere = FakeUpstream()
    other = await aiohttp_server(elsewhere.app)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    target = f"http://127.0.0.1:{other.port}/v1/models"
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{other.port}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.read()
    writer.close()
    assert elsewhere.received == []
    assert upstream.received[-1].path == "/v1/models"


async def test_body_at_the_limit_passes_and_over_it_is_413(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    limit = 64 * 1024
    proxy = await proxy_factory(server={"max_body_bytes": limit})
    base = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": ""}]})
    padding = limit - len(base)
    at_limit = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * padding}]})
    assert len(at_limit) == limit
    response = await proxy.post(
        "/v1/chat/completions", data=at_limit, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 200
    assert len(stored_ids(tmp_path)) == 1
    calls = len(upstream.received)
    over = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * (padding + 1)}]})
    response = await proxy.post(
        "/v1/chat/completions", data=over, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 413
    assert_error_shape(await response.json(), response.headers)
    assert len(upstream.received) == calls


async def test_default_body_limit_admits_image_requests(proxy, upstream: FakeUpstream) -> None:
    image = "data:image/png;base64," + "A" * (5 * 1024 * 1024)
    body = {
        **CHAT,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}
        ],
    }
    response = await proxy.post(
        "/v1/chat/completions",
        data=io.BytesIO(orjson.dumps(body)),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert upstream.chat_requests()[-1].json() == body
