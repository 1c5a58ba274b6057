"""Holes found by attacking the proxy from outside: path tricks, keys-mode reach, hostile JSON,
oversized or hostile upstream answers, records the store cannot take, small input checks.

Each test names the promise it covers (R12 secrets, R15 steering, R19 bad input, R24 reach).
Raw requests go over a plain socket where an HTTP client would tidy the request line first.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gzip
import io
import logging
import re
import signal
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.callers import new_key
from proxy.config import LoggingConfig
from proxy.keys import STORE, WRITER
from proxy.logs import AccessRecord, RepeatFilter, configure
from proxy.outcome import Outcome, OutcomeSet
from proxy.server import ProxyRunner, ProxyServer
from proxy.store import CompletionRecord
from proxy.store.sqlite import SQLiteStore
from proxy.writer import WriteFailed, Writer
from tests.conftest import make_config, sdk
from tests.fakes import FakeUpstream, Reply, chunks, completion, sse
from tests.processes import ProxyProcess

UPSTREAM_KEY = "sk-proj-TEAMKEY0123456789abcdefghijklmnopqrstuvwxyzTAIL"
AUTH = {"Authorization": "Bearer sk-test-alice"}


async def raw_request(proxy: Any, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send bytes as they are; return (status, head, body) of the one answer."""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    answer_head, _, answer_body = data.partition(b"\r\n\r\n")
    return int(answer_head.split(b" ", 2)[1]), answer_head, answer_body


def get(path: str, method: str = "GET", headers: str = "Authorization: Bearer sk-a\r\n") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: proxy\r\n{headers}Connection: close\r\n\r\n"
    ).encode()


async def eventually(check: Callable[[], Any], deadline: float = 10.0) -> Any:
    """Wait until ``check()`` returns something truthy (a background commit has landed)."""
    started = time.monotonic()
    while not (result := check()):
        assert time.monotonic() - started < deadline, "condition never held"
        await asyncio.sleep(0.02)
    return result


def exchanges(tmp_path: Path) -> list[tuple[str, int | None, bytes | None]]:
    with sqlite3.connect(tmp_path / "completions.db") as db:
        return db.execute("SELECT outcome, status, response FROM exchanges ORDER BY seq").fetchall()


def stored_ids(tmp_path: Path) -> set[str]:
    with sqlite3.connect(tmp_path / "completions.db") as db:
        return {row[0] for row in db.execute("SELECT id FROM completions")}


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def team(proxy_factory, monkeypatch: pytest.MonkeyPatch):
    """Start a keys-mode proxy; returns (proxy, {name: key}) with a member and an admin."""

    async def start(**auth: Any) -> tuple[Any, dict[str, str]]:
        monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
        proxy = await proxy_factory(auth={"mode": "keys", "key_cache_seconds": 0, **auth})
        keys = {}
        for name, role in (("alice", "member"), ("root", "admin")):
            key, key_id, digest = new_key()
            await proxy.app[STORE].create_key(name, role, key_id, digest)
            keys[name] = key
        return proxy, keys

    return start


# 1. Routing cannot be tricked (R15) ------------------------------------------------------

STORED_API_DETOURS = [
    ("GET", "/v1//chat/completions"),
    ("GET", "/v1/chat//completions"),
    ("GET", "/v1/chat/completions/"),
    ("GET", "/v1/./chat/completions"),
    ("GET", "/v1/models/../chat/completions"),
    ("GET", "/v1/models/%2e%2e/chat/completions"),
    ("GET", "/v1/models/%2E%2E/chat/completions"),
    ("GET", "/v1/%63hat/completions"),
    ("GET", "/v1/chat/%63ompletions/chatcmpl-1"),
    ("GET", "/v1/Chat/Completions"),
    ("GET", "/v1/chat%2Fcompletions"),
    ("GET", "/v1/chat/completions/chatcmpl-1/messages/"),
    ("DELETE", "/v1/chat/completions/chatcmpl-1/"),
    ("DELETE", "/v1//chat/completions/chatcmpl-1"),
    ("POST", "/v1/chat/completions/chatcmpl-1/"),
    ("GET", "/v1/files/..%2Fchat/completions"),
]


@pytest.mark.parametrize(("method", "path"), STORED_API_DETOURS)
async def test_stored_api_detours_are_never_forwarded(
    proxy, upstream: FakeUpstream, method: str, path: str
) -> None:
    status, _, body = await raw_request(proxy, get(path, method))
    assert upstream.received == []  # the provider's own stored-completions API is never reached
    assert status in {200, 400, 404, 405}
    if status != 200:
        error = orjson.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/../../admin",
        "/v1/models/%2e%2e/%2e%2e/secret",
        "/v1/models/.%2e/files",
        "/v1/files\\..\\x",
        "/v1/models/%zz",
    ],
)
async def test_forwarded_paths_stay_under_the_upstream_base(
    proxy, upstream: FakeUpstream, path: str
) -> None:
    status, _, body = await raw_request(proxy, get(path))
    assert status in {400, 404}, body
    assert upstream.received == []


async def test_forwarded_paths_go_upstream_in_canonical_form(proxy, upstream: FakeUpstream) -> None:
    for path in ("/v1//models", "/v1/models/", "/v1/%6Dodels", "/v1/models?limit=2"):
        status, _, _ = await raw_request(proxy, get(path))
        assert status == 200
    assert [r.path for r in upstream.received] == ["/v1/models"] * 4
    assert upstream.received[-1].query == "limit=2"


# 2. Keys mode forwards only what the team allows (R24, R12, R15) ---------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files"),
        ("DELETE", "/v1/files/file-abc"),
        ("GET", "/v1/files/file-abc/content"),
        ("POST", "/v1/batches"),
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/assistants"),
        ("DELETE", "/v1/vector_stores/vs_1"),
        ("GET", "/v1/responses/resp_1"),
        ("DELETE", "/v1/models/ft:gpt-4o:team"),
    ],
)
async def test_keys_mode_refuses_routes_outside_the_allow_list(
    team, upstream: FakeUpstream, method: str, path: str
) -> None:
    proxy, keys = await team()
    response = await proxy.request(
        method, path, headers={"Authorization": f"Bearer {keys['alice']}"}
    )
    assert response.status == 403
    error = (await response.json())["error"]
    assert error["code"] == "route_not_allowed"
    assert set(error) == {"message", "type", "param", "code"}
    assert upstream.received == []


async def test_keys_mode_forwards_the_default_routes(team, upstream: FakeUpstream) -> None:
    proxy, keys = await team()
    async with sdk(proxy, keys["alice"]) as alice:
        await alice.models.list()
        await alice.models.retrieve("gpt-test")
        await alice.embeddings.create(
            model="text-embedding-3-small", input="hi", encoding_format="float"
        )
        await alice.moderations.create(input="hi")
    assert [(r.method, r.path) for r in upstream.received] == [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/gpt-test"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/moderations"),
    ]


async def test_admins_may_be_allowed_more(team, upstream: FakeUpstream) -> None:
    proxy, keys = await team(admin_forward=["GET /files", "* /files/**"])
    member = await proxy.get("/v1/files", headers={"Authorization": f"Bearer {keys['alice']}"})
    assert member.status == 403
    admin = {"Authorization": f"Bearer {keys['root']}"}
    assert (await proxy.get("/v1/files", headers=admin)).status == 200
    assert (await proxy.delete("/v1/files/file-1", headers=admin)).status == 200
    assert [(r.method, r.path) for r in upstream.received] == [
        ("GET", "/v1/files"),
        ("DELETE", "/v1/files/file-1"),
    ]


RETARGETING = {
    "OpenAI-Organization": "org-other",
    "OpenAI-Project": "proj-other",
    "api-key": "sk-other",
    "Cookie": "session=other",
}


async def test_keys_mode_drops_headers_that_retarget_the_team_key(
    team, upstream: FakeUpstream
) -> None:
    proxy, keys = await team()
    headers = {"Authorization": f"Bearer {keys['alice']}", **RETARGETING}
    assert (await proxy.get("/v1/models", headers=headers)).status == 200
    body = {"model": "gpt-test", "messages": ask("hi")}
    assert (await proxy.post("/v1/chat/completions", json=body, headers=headers)).status == 200
    for received in upstream.received:
        sent = {name.lower() for name in received.headers}
        assert not sent & {name.lower() for name in RETARGETING}, received.headers


async def test_keys_mode_forwards_headers_the_config_allows(team, upstream: FakeUpstream) -> None:
    proxy, keys = await team(forward_headers=["OpenAI-Project"])
    headers = {"Authorization": f"Bearer {keys['alice']}", **RETARGETING}
    assert (await proxy.get("/v1/models", headers=headers)).status == 200
    sent = upstream.received[0].headers
    assert sent.get("OpenAI-Project") == "proj-other"
    assert "OpenAI-Organization" not in sent and "Cookie" not in sent


async def test_passthrough_still_forwards_the_sdk_headers(proxy, upstream: FakeUpstream) -> None:
    headers = {**AUTH, "OpenAI-Organization": "org-mine", "OpenAI-Project": "proj-mine"}
    assert (await proxy.get("/v1/models", headers=headers)).status == 200
    assert upstream.received[0].headers["OpenAI-Organization"] == "org-mine"


async def test_two_authorization_headers_are_a_400(proxy, upstream: FakeUpstream) -> None:
    two = "Authorization: Bearer sk-a\r\nAuthorization: Bearer sk-b\r\n"
    for path in ("/v1/models", "/v1/chat/completions"):
        status, _, body = await raw_request(proxy, get(path, headers=two))
        assert status == 400
        assert orjson.loads(body)["error"]["code"] == "duplicate_authorization"
    assert upstream.received == []


async def test_a_bearer_token_that_is_not_utf8_is_a_401(proxy, upstream: FakeUpstream) -> None:
    body = orjson.dumps({"model": "gpt-test", "messages": [], "store": True})
    for method, content in (("GET", b""), ("POST", body)):
        head = (
            f"{method} /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n".encode()
            + b"Authorization: Bearer sk-\xe9t\xe9\r\n"  # Latin-1, not UTF-8
            + f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n".encode()
        )
        status, answer_head, answer = await raw_request(proxy, head, content)
        assert status == 401, answer
        assert orjson.loads(answer)["error"]["code"] == "invalid_api_key"
        assert b"x-request-id" in answer_head.lower()
    assert upstream.received == []


def recognisable_parts(key: str) -> list[str]:
    return [key, key[-12:], key[8:20], "****" + key[-4:]]


@pytest.mark.parametrize("store", [False, True])
async def test_upstream_errors_echoing_the_team_key_are_redacted(
    team, upstream: FakeUpstream, tmp_path: Path, store: bool
) -> None:
    proxy, keys = await team()
    echo = (
        f"Incorrect API key provided: {UPSTREAM_KEY[:8]}{'*' * 30}{UPSTREAM_KEY[-4:]}."
        f" You sent {UPSTREAM_KEY}; tail {UPSTREAM_KEY[-12:]}"
    )
    upstream.script(
        Reply(status=401, json={"error": {"message": echo, "type": "invalid_request_error"}}),
        Reply(status=401, json={"error": {"message": echo}}),
    )
    headers = {"Authorization": f"Bearer {keys['alice']}"}
    chat = await proxy.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": ask("hi"), "store": store},
        headers=headers,
    )
    models = await proxy.get("/v1/models", headers=headers)
    for response in (chat, models):
        assert response.status == 401
        text = await response.text()
        assert "[redacted]" in text
        for part in recognisable_parts(UPSTREAM_KEY):
            assert part not in text, part
        assert orjson.loads(text)["error"]["message"].startswith("Incorrect API key provided")
    if store:
        rows = await eventually(lambda: exchanges(tmp_path))
        assert rows[0][0] == "upstream_error"
        assert UPSTREAM_KEY[-12:].encode() not in (rows[0][2] or b"")


# 4. Any JSON the upstream accepts is handled (R19) -----------------------------------------


def nested(fields: dict[str, Any], depth: int = 300) -> bytes:
    """A request body whose ``user`` field nests ``depth`` levels (orjson encodes 254 at most)."""
    deep = b'{"a":[' * depth + b'"bottom"' + b"]}" * depth
    return orjson.dumps(fields)[:-1] + b',"user":' + deep + b"}"


async def test_deeply_nested_store_request_gets_the_upstream_answer_intact(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    body = nested({"model": "gpt-test", "messages": ask("deep"), "store": True})
    response = await proxy.post("/v1/chat/completions", data=body, headers=AUTH)
    assert response.status == 200
    answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == "echo: deep"
    assert len(upstream.chat_requests()) == 1  # a 500 would make the SDK call (and pay) again
    rows = await eventually(lambda: exchanges(tmp_path))
    assert rows[0][0] == "unstorable"
    assert proxy.app[WRITER].broken is None


async def test_deeply_nested_streamed_request_ends_cleanly(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    body = nested({"model": "gpt-test", "messages": ask("deep"), "store": True, "stream": True})
    response = await proxy.post("/v1/chat/completions", data=body, headers=AUTH)
    assert response.status == 200
    raw = await response.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"HTTP/1.1" not in raw  # never a second response inside the first
    rows = await eventually(lambda: exchanges(tmp_path))
    assert rows[0][0] == "unstorable"


# 6. Hostile or broken upstreams are bounded ----------------------------------------------


async def test_an_answer_past_the_capture_cap_is_relayed_whole_and_not_kept(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await proxy_factory(capture={"max_answer_bytes": 64 * 1024})
    big = completion({"model": "gpt-test", "messages": ask("x")}, "chatcmpl-big")
    big["choices"][0]["message"]["content"] = "y" * 200_000
    upstream.script(Reply(json=big))
    response = await proxy.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": ask("x"), "store": True},
        headers=AUTH,
    )
    assert response.status == 200
    assert await response.read() == orjson.dumps(big)
    rows = await eventually(lambda: exchanges(tmp_path))
    assert rows[0][0] == "too_large"
    assert "chatcmpl-big" not in stored_ids(tmp_path)


async def test_a_stream_past_the_capture_cap_is_relayed_whole_and_not_kept(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await proxy_factory(capture={"max_answer_bytes": 16 * 1024})
    request = {"model": "gpt-test", "messages": ask("z" * 40), "stream": True, "store": True}
    pieces = sse(chunks(request, "chatcmpl-long", pieces=40) * 20)
    upstream.script(Reply(sse=pieces))
    response = await proxy.post("/v1/chat/completions", json=request, headers=AUTH)
    assert await response.read() == b"".join(pieces)
    rows = await eventually(lambda: exchanges(tmp_path))
    assert rows[0][0] == "too_large"
    assert stored_ids(tmp_path) == set()


async def test_a_gzip_bomb_is_relayed_without_holding_it(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path
) -> None:
    size = 64 * 1024 * 1024
    bomb = b'{"id": "chatcmpl-bomb", "pad": "' + b" " * size + b'"}'
    upstream.script(Reply(body=gzip.compress(bomb, compresslevel=1), headers={}))
    upstream.replies[0].gzip = False
    upstream.replies[0].headers["Content-Encoding"] = "gzip"
    proxy = await proxy_factory(capture={"max_answer_bytes": 1024 * 1024})
    del bomb
    tracemalloc.start()
    try:
        response = await proxy.post(
            "/v1/chat/completions",
            json={"model": "gpt-test", "messages": ask("x"), "store": True},
            headers=AUTH,
        )
        received = 0
        async for piece in response.content.iter_chunked(1 << 16):
            received += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status == 200
    assert received == size + len(b'{"id": "chatcmpl-bomb", "pad": ""}')
    assert peak < 16 * 1024 * 1024, peak  # the whole answer would be 64 MiB
    rows = await eventually(lambda: exchanges(tmp_path))
    assert rows[0][0] == "too_large"


# 7. One bad answer never blocks everyone -------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"created": 2**63 + 5},
        {"usage": {"prompt_tokens": 2**64 - 1, "completion_tokens": 1, "total_tokens": 1}},
    ],
)
async def test_an_answer_the_store_cannot_hold_fails_only_its_exchange(
    proxy, upstream: FakeUpstream, tmp_path: Path, change: dict[str, Any]
) -> None:
    bad = {**completion({"model": "gpt-test", "messages": ask("x")}, "chatcmpl-huge"), **change}
    upstream.script(Reply(json=bad))
    async with sdk(proxy, "sk-test-alice") as alice:
        raw = await alice.chat.completions.with_raw_response.create(
            model="gpt-test", messages=ask("x"), store=True
        )
        assert orjson.loads(raw.content) == bad  # the client gets the answer as it came
        after = await alice.chat.completions.create(
            model="gpt-test", messages=ask("next"), store=True
        )
    assert proxy.app[WRITER].broken is None
    assert (await proxy.get("/healthz")).status == 200
    assert after.id in stored_ids(tmp_path)
    rows = await eventually(lambda: exchanges(tmp_path))
    assert rows[0][0] == "unstorable"


async def test_the_writer_fails_only_the_record_the_store_rejects(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "w.db"))
    await store.open()
    failed: list[int] = []
    writer = Writer(store, on_failed=lambda: failed.append(1))
    writer.start()

    def record(completion_id: str, created: int) -> CompletionRecord:
        return CompletionRecord(
            id=completion_id,
            caller="alice",
            created=created,
            model="gpt-test",
            metadata={},
            completion=b'{"id":"' + completion_id.encode() + b'"}',
            request=b"{}",
            request_id=None,
            stream=False,
            outcome="complete",
        )

    try:
        results = await asyncio.gather(
            writer.commit(record("chatcmpl-good-1", 1)),
            writer.commit(record("chatcmpl-bad", 2**64)),
            writer.commit(record("chatcmpl-good-2", 2)),
            return_exceptions=True,
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], WriteFailed)
        assert writer.broken is None  # the store is fine; one record was not
        assert writer.stats.failed == 1 and failed == [1]
        assert writer.stats.failed_ids == ["chatcmpl-bad"]
        await writer.commit(record("chatcmpl-good-3", 3))
    finally:
        await writer.close()
        await store.close()
    with sqlite3.connect(tmp_path / "w.db") as db:
        ids = {row[0] for row in db.execute("SELECT id FROM completions")}
    assert ids == {"chatcmpl-good-1", "chatcmpl-good-2", "chatcmpl-good-3"}


# 8. Smaller ones (R19, R3) ---------------------------------------------------------------


async def fill_until_broken(client: Any, base: str) -> list[str]:
    """Store completions until the store is full and refuses; returns the stored ids."""
    ids: list[str] = []
    for n in range(400):
        response = await client.post(
            base + "/v1/chat/completions",
            json={"model": "gpt-test", "store": True, "messages": ask(f"{n} " + "x" * 6000)},
            headers=AUTH,
        )
        if response.status == 503:
            return ids
        assert response.status == 200
        ids.append((await response.json())["id"])
    raise AssertionError("the store never filled up")


async def test_sigterm_exits_promptly_when_the_store_is_broken(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("store:\n  max_bytes: 262144\nserver:\n  shutdown_timeout: 30\n")
    process = ProxyProcess(
        db=tmp_path / "completions.db",
        upstream_url=upstream.url,  # type: ignore[attr-defined]
        log_path=tmp_path / "proxy.log",
        extra_args=["--config", str(config)],
    )
    process.start()
    try:
        await process.wait_healthy()
        async with aiohttp.ClientSession() as client:
            await fill_until_broken(client, process.url)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await process.wait_exit(20)
        took = time.monotonic() - started
    finally:
        process.stop()
    assert code == 0, process.log_tail()
    assert took < 5, (took, process.log_tail())


async def test_sigterm_exits_promptly_while_the_store_is_locked(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    process = ProxyProcess(
        db=tmp_path / "completions.db",
        upstream_url=upstream.url,  # type: ignore[attr-defined]
        log_path=tmp_path / "proxy.log",
    )
    process.start()
    lock = None
    try:
        await process.wait_healthy()
        lock = sqlite3.connect(tmp_path / "completions.db", isolation_level=None, timeout=1)
        lock.execute("BEGIN IMMEDIATE")  # another program holds the write lock: nothing commits
        async with aiohttp.ClientSession() as client:
            requests = [
                asyncio.ensure_future(
                    client.post(
                        process.base_url + "/chat/completions",
                        json={"model": "gpt-test", "store": True, "messages": ask(str(n))},
                        headers=AUTH,
                    )
                )
                for n in range(6)
            ]
            await eventually(lambda: len(upstream.chat_requests()) == 6)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = await process.wait_exit(30)
            took = time.monotonic() - started
            answers = await asyncio.gather(*requests, return_exceptions=True)
    finally:
        if lock is not None:
            lock.close()
        process.stop()
    assert code == 0, process.log_tail()
    assert took < 12, (took, process.log_tail())
    assert all(not isinstance(a, BaseException) and a.status == 200 for a in answers), answers
    assert process.log_tail(400).count("completion not stored") == 6  # each with its id


@pytest.mark.parametrize(
    "limit", ["\uff11\uff10", "1_0", " 5", "+5", "\u00b2", "5 ", "0x10", "0" * 20 + "5"]
)
async def test_limit_takes_plain_ascii_digits_only(proxy, limit: str) -> None:
    for path in ("/v1/chat/completions", "/v1/chat/completions/chatcmpl-1/messages"):
        response = await proxy.get(path, params={"limit": limit}, headers=AUTH)
        assert response.status == 400, (path, limit)
        assert (await response.json())["error"]["param"] == "limit"


@pytest.mark.parametrize("name", ["metadata[topic", "metadata", "metadatatopic]", "metadata]x["])
async def test_a_malformed_metadata_filter_is_a_400(proxy, name: str) -> None:
    response = await proxy.get("/v1/chat/completions", params={name: "demo"}, headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "metadata"


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/admin/audit?after=18446744073709551616", "after"),
        ("/admin/audit?after=\uff19", "after"),
        ("/admin/audit?limit=1_0", "limit"),
        ("/admin/usage?since=99999999999999999999", "since"),
        ("/admin/usage?until=18446744073709551616", "until"),
        ("/admin/audit?limit=5&limit=6", "limit"),
        ("/admin/audit?after=1&after=2", "after"),
        ("/admin/usage?since=1&since=2", "since"),
        ("/admin/usage?group_by=day&group_by=model", "group_by"),
        ("/admin/exchanges?caller=a&caller=b", "caller"),
        ("/v1/chat/completions?caller=a&caller=b", "caller"),
    ],
)
async def test_admin_parameters_out_of_range_are_400(team, path: str, param: str) -> None:
    proxy, keys = await team()
    response = await proxy.get(path, headers={"Authorization": f"Bearer {keys['root']}"})
    assert response.status == 400
    assert (await response.json())["error"]["param"] == param


async def test_an_answer_with_an_empty_id_is_not_stored(
    proxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    blank = completion({"model": "gpt-test", "messages": ask("x")}, "")
    upstream.script(Reply(json=blank))
    response = await proxy.post(
        "/v1/chat/completions",
        json={"model": "gpt-test", "messages": ask("x"), "store": True},
        headers=AUTH,
    )
    assert response.status == 200
    assert await response.json() == blank
    rows = await eventually(lambda: exchanges(tmp_path))
    assert rows[0][0] == "unstorable"
    assert stored_ids(tmp_path) == set()


async def test_update_and_delete_on_a_full_store_are_503(
    proxy_factory, upstream: FakeUpstream
) -> None:
    proxy = await proxy_factory(store={"max_bytes": 256 * 1024})
    ids = await fill_until_broken(proxy, "")
    metadata = {f"k{n}": "v" * 512 for n in range(16)}
    statuses = []
    for completion_id in ids:  # each update adds an audit entry until the file is full
        update = await proxy.post(
            f"/v1/chat/completions/{completion_id}", json={"metadata": metadata}, headers=AUTH
        )
        statuses.append(update.status)
        if update.status == 503:
            error = (await update.json())["error"]
            assert error["code"] == "store_unavailable"
            assert set(error) == {"message", "type", "param", "code"}
            break
    assert statuses[-1] == 503 and set(statuses) <= {200, 503}, statuses
    deleted = await proxy.delete(f"/v1/chat/completions/{ids[0]}", headers=AUTH)
    assert deleted.status in {200, 503}  # a delete may fit in a full file; never a bare 500
    if deleted.status == 503:
        assert (await deleted.json())["error"]["code"] == "store_unavailable"


# 9. Matching OpenAI's published schema (R18) ---------------------------------------------


async def test_a_stream_without_usage_stores_those_keys_absent(
    proxy, upstream: FakeUpstream
) -> None:
    request = {"model": "gpt-test", "messages": ask("bare"), "stream": True, "store": True}
    bare = [
        {k: v for k, v in c.items() if k != "system_fingerprint"}
        for c in chunks(request, "chatcmpl-bare")
    ]
    upstream.script(Reply(sse=sse(bare)))
    response = await proxy.post("/v1/chat/completions", json=request, headers=AUTH)
    await response.read()
    async with sdk(proxy, "sk-test-alice") as alice:
        raw = await alice.chat.completions.with_raw_response.retrieve("chatcmpl-bare")
    stored = orjson.loads(raw.content)
    for key in ("usage", "system_fingerprint", "service_tier"):
        assert key not in stored, key
    assert stored["choices"][0]["message"]["content"] == "echo: bare"


async def test_openapi_describes_create_as_the_upstream_answer_and_the_admin_endpoints(
    proxy, upstream: FakeUpstream
) -> None:
    document = await (await proxy.get("/openapi.json")).json()
    ok = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    ref = ok["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    schema = document["components"]["schemas"][ref]
    assert "metadata" not in schema["required"]
    answer = await (
        await proxy.post(
            "/v1/chat/completions",
            json={"model": "gpt-test", "messages": ask("x"), "store": True},
            headers=AUTH,
        )
    ).json()
    assert set(schema["required"]) <= set(answer)
    assert "text/event-stream" in ok
    operations = {
        path: op["operationId"]
        for path, methods in document["paths"].items()
        for op in methods.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert {"/admin/usage", "/admin/exchanges", "/admin/audit"} <= set(operations)


# 3. Slow clients cannot exhaust the proxy (R19) ------------------------------------------


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path, upstream: FakeUpstream, **sections: dict[str, Any]
) -> AsyncIterator[tuple[ProxyRunner, int]]:
    """The app behind the proxy's own runner (connection cap, timeouts) on a real port."""
    config = make_config(tmp_path, upstream.url, **sections)  # type: ignore[attr-defined]
    runner = ProxyRunner(create_app(config), config.server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner, runner.addresses[0][1]
    finally:
        await runner.cleanup()


def server_of(runner: ProxyRunner) -> ProxyServer:
    assert isinstance(runner.server, ProxyServer)
    return runner.server


async def test_healthz_and_real_clients_answer_during_hundreds_of_slow_connections(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with served(tmp_path, upstream) as (runner, port):
        slow = []
        for n in range(300):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if n % 2:  # a head that never ends
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            else:  # a body that never ends
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer sk-slow\r\nContent-Length: 1000\r\n\r\n{"
                )
            slow.append((reader, writer))
        await eventually(lambda: server_of(runner).open >= 300)
        try:
            async with aiohttp.ClientSession() as client:
                health = await client.get(f"http://127.0.0.1:{port}/healthz")
                assert health.status == 200
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-real", max_retries=0
            ) as real:
                answer = await real.chat.completions.create(
                    model="gpt-test", messages=ask("still here"), store=True
                )
            assert answer.choices[0].message.content == "echo: still here"
        finally:
            for _, writer in slow:
                writer.close()


async def test_a_head_that_never_ends_is_cut_at_the_header_timeout(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with served(tmp_path, upstream, server={"header_timeout": 0.5}) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the proxy
        assert time.monotonic() - started < 5
        writer.close()


async def test_a_body_that_never_ends_is_a_408_at_the_body_timeout(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with served(tmp_path, upstream, server={"body_timeout": 0.5}) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer sk-slow\r\nContent-Length: 1000\r\n\r\n{"
        )
        data = await asyncio.wait_for(reader.read(), 10)  # answered, then closed
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert orjson.loads(body)["error"]["code"] == "request_timeout"
    assert upstream.received == []


async def test_connections_past_the_cap_are_refused_cleanly(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with served(tmp_path, upstream, server={"max_connections": 5}) as (runner, port):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        await eventually(lambda: server_of(runner).open == 5)
        status, head, body = await raw_request_to(port, get("/healthz"))
        assert status == 503
        assert b"application/json" in head
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
        for _, writer in idle:
            writer.close()
        await eventually(lambda: server_of(runner).open == 0)
        status, _, _ = await raw_request_to(port, get("/healthz"))
        assert status == 200


async def raw_request_to(port: int, head: bytes) -> tuple[int, bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    answer_head, _, answer_body = data.partition(b"\r\n\r\n")
    return int(answer_head.split(b" ", 2)[1]), answer_head, answer_body


def test_identical_errors_are_logged_once_with_a_count(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr("sys.stderr", buffer)
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    configure(LoggingConfig(format="json"))
    logger = logging.getLogger("proxy.test")
    try:
        for _ in range(500):
            try:
                raise ConnectionResetError("peer went away")
            except ConnectionResetError:
                logger.exception("unhandled error")
        logger.warning("something else")
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    lines = [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["unhandled error", "something else"]


def test_a_repeated_error_after_the_window_says_how_many_were_left_out() -> None:
    repeats = RepeatFilter(window=10.0)
    kept = []
    for n, created in enumerate([0.0, 1.0, 2.0, 3.0, 12.0]):
        record = logging.makeLogRecord(
            {"name": "proxy.x", "levelno": logging.ERROR, "msg": "boom", "created": created}
        )
        if repeats.filter(record):
            kept.append((n, getattr(record, "repeated", 0)))
    assert kept == [(0, 0), (4, 3)]


# 5. No token reaches the logs, ever (R12) ------------------------------------------------

TOKEN = "sk-proj-NEVERLOGGED0123456789abcdef"


@pytest.mark.parametrize(
    "request_bytes",
    [
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer {TOKEN}\r\n\r\n",
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\x01\r\n\r\n",
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}{'A' * 9000}\r\n\r\n",
        f"GET /v1/models?key={TOKEN}{'A' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
        f"NOT HTTP {TOKEN}\r\n\r\n",
    ],
    ids=["space-before-colon", "control-character", "long-header", "long-line", "garbage"],
)
async def test_malformed_requests_get_json_400s_and_log_no_token(
    upstream: FakeUpstream, tmp_path: Path, request_bytes: str
) -> None:
    process = ProxyProcess(
        db=tmp_path / "completions.db",
        upstream_url=upstream.url,  # type: ignore[attr-defined]
        log_path=tmp_path / "proxy.log",
        extra_args=["--config", str(debug_config(tmp_path))],
    )
    process.start()
    try:
        await process.wait_healthy()
        status, head, body = await raw_request_to(process.port, request_bytes.encode())
        process.terminate()
        await process.wait_exit(20)
    finally:
        process.stop()
    assert status == 400, (head, body)
    assert b"application/json" in head.lower()
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert TOKEN not in error["message"]
    log = (tmp_path / "proxy.log").read_text()
    assert TOKEN not in log and TOKEN[8:20] not in log
    assert "Traceback" not in log
    assert upstream.received == []
    # An id like any other answer's, and the log line that tells why carries it.
    found = re.search(rb"(?im)^x-request-id: (req_[0-9a-f]{32})\r?$", head)
    assert found, head
    [warning] = [
        line
        for line in map(orjson.loads, re.findall(r"(?m)^\{.*$", log))
        if line["message"] == "malformed request"
    ]
    assert warning["request_id"] == found[1].decode()


def debug_config(tmp_path: Path) -> Path:
    """Logs at debug level, so every library message is written (and must be clean)."""
    path = tmp_path / "config.yaml"
    path.write_text("logging:\n  level: debug\n")
    return path


# Structure: no import loop; one outcome per exchange ----------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "proxy"


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path, known: set[str]) -> set[str]:
    """The project's modules ``path`` imports when it runs (``if TYPE_CHECKING:`` left out)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for inner in block.body
        for node in ast.walk(inner)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name for name in submodules if name in known]
            if len(names) < len(submodules):  # some name is defined in the module itself
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def test_the_package_has_no_import_cycle() -> None:
    files = {module_of(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: runtime_imports(path, set(files)) - {name} for name, path in files.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                loop = [*trail[trail.index(target) :], target] if target in trail else [target]
                raise AssertionError(f"import cycle: {' -> '.join(loop)}")
            if target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_errors_imports_nothing_of_ours_and_keys_names_real_types() -> None:
    files = {module_of(path) for path in PACKAGE.rglob("*.py")}
    assert runtime_imports(PACKAGE / "errors.py", files) == set()
    keys = (PACKAGE / "keys.py").read_text()
    assert "TYPE_CHECKING" not in keys
    assert 'AppKey["' not in keys and 'RequestKey["' not in keys


def test_an_outcome_is_set_once() -> None:
    access = AccessRecord("req_1", "POST", "/v1/chat/completions", time.perf_counter())
    access.outcome = Outcome.COMPLETE
    with pytest.raises(OutcomeSet):
        access.outcome = Outcome.CLIENT_GONE
    assert access.outcome is Outcome.COMPLETE


async def test_a_failure_after_the_answer_started_never_writes_a_second_response(
    aiohttp_client: Any, upstream: FakeUpstream, tmp_path: Path
) -> None:
    app = create_app(make_config(tmp_path, upstream.url))  # type: ignore[attr-defined]

    async def fails_midway(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"partial")
        raise RuntimeError("a bug after the answer began")

    app.router.add_get("/started-then-failed", fails_midway)
    client = await aiohttp_client(app)
    _, head, body = await raw_request(
        client, b"GET /started-then-failed HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1" not in body  # the connection was closed, not given another status line
