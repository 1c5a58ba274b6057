"""Bad input gets a clear 4xx in OpenAI's shape, calls nothing upstream and changes nothing."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import openai
import orjson
import pytest

from tests.fakes import FakeUpstream
from tests.helpers import assert_error_shape, sdk

AUTH = {"Authorization": "Bearer sk-bad-input"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "store": True}


def snapshot(tmp_path: Path) -> str:
    with sqlite3.connect(tmp_path / "completions.db") as db:
        rows = db.execute(
            "SELECT id, metadata, completion FROM completions ORDER BY seq"
        ).fetchall()
        pairs = db.execute("SELECT * FROM completion_metadata ORDER BY seq, key").fetchall()
    return hashlib.sha256(repr((rows, pairs)).encode()).hexdigest()


@pytest.fixture
async def seeded(proxy, tmp_path: Path) -> str:
    async with sdk(proxy, "sk-bad-input") as client:
        made = await client.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "seed"}],
            store=True,
            metadata={"k": "v"},
        )
    return made.id


def _chat(**changes) -> bytes:
    return orjson.dumps({**CHAT, **changes})


CREATE_CASES = {
    "malformed json": (b'{"model": "gpt-test", "messages": [', 400, None),
    "empty body": (b"", 400, None),
    "array body": (b"[1, 2]", 400, None),
    "string body": (b'"hello"', 400, None),
    "store not boolean": (_chat(store="yes"), 400, "store"),
    "stream not boolean": (_chat(stream="yes"), 400, "stream"),
    "model not string when storing": (_chat(model=42), 400, "model"),
    "metadata not object": (_chat(metadata=["a"]), 400, "metadata"),
    "metadata value not string": (_chat(metadata={"a": 1}), 400, "metadata"),
    "metadata too many pairs": (_chat(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata"),
    "metadata key too long": (_chat(metadata={"k" * 65: "v"}), 400, "metadata"),
    "metadata value too long": (_chat(metadata={"k": "v" * 513}), 400, "metadata"),
    "metadata huge": (_chat(metadata={"k": "v" * 1_000_000}), 400, "metadata"),
}


@pytest.mark.parametrize("case", list(CREATE_CASES))
async def test_bad_create_requests(
    case: str, proxy, upstream: FakeUpstream, seeded: str, tmp_path: Path
) -> None:
    body, status, param = CREATE_CASES[case]
    before = snapshot(tmp_path)
    calls = len(upstream.received)
    response = await proxy.post(
        "/v1/chat/completions", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == status
    payload = await response.json()
    assert_error_shape(payload, response.headers)
    assert payload["error"]["param"] == param
    assert payload["error"]["type"] == "invalid_request_error"
    assert len(upstream.received) == calls
    assert snapshot(tmp_path) == before


async def test_metadata_limits_are_inclusive(proxy, tmp_path: Path) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    response = await proxy.post(
        "/v1/chat/completions", json={**CHAT, "metadata": metadata}, headers=AUTH
    )
    assert response.status == 200


async def test_store_true_without_a_token_is_401_before_upstream(
    proxy, upstream: FakeUpstream
) -> None:
    response = await proxy.post("/v1/chat/completions", json=CHAT)
    assert response.status == 401
    assert_error_shape(await response.json(), response.headers)
    assert upstream.received == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/chat/completions/chatcmpl-x"),
        ("POST", "/v1/chat/completions/chatcmpl-x"),
        ("DELETE", "/v1/chat/completions/chatcmpl-x"),
        ("GET", "/v1/chat/completions/chatcmpl-x/messages"),
    ],
)
@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "sk-no-scheme"]
)
async def test_stored_endpoints_need_a_bearer_token(
    proxy, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await proxy.request(method, path, headers=headers, json={"metadata": {}})
    assert response.status == 401
    payload = await response.json()
    assert_error_shape(payload, response.headers)
    assert payload["error"]["code"] == "invalid_api_key"


LIST_CASES = {
    "limit zero": ("limit=0", "limit"),
    "limit over": ("limit=101", "limit"),
    "limit negative": ("limit=-1", "limit"),
    "limit text": ("limit=ten", "limit"),
    "limit float": ("limit=1.5", "limit"),
    "order": ("order=newest", "order"),
    "unknown after": ("after=chatcmpl-unknown", "after"),
    "empty metadata key": ("metadata%5B%5D=x", "metadata"),
    "repeated metadata key": ("metadata%5Ba%5D=1&metadata%5Ba%5D=2", "metadata"),
    "nested metadata key": ("metadata%5Ba%5D%5Bb%5D=1", "metadata"),
    # Which of two values was meant cannot be told, as for a metadata key given twice.
    "repeated model": ("model=a&model=b", "model"),
    "repeated limit": ("limit=1&limit=2", "limit"),
    "repeated order": ("order=asc&order=desc", "order"),
    "repeated after": ("after=x&after=y", "after"),
    "repeated search": ("search=a&search=b", "search"),
}


@pytest.mark.parametrize("case", list(LIST_CASES))
async def test_bad_list_queries(case: str, proxy, seeded: str) -> None:
    query, param = LIST_CASES[case]
    response = await proxy.get(f"/v1/chat/completions?{query}", headers=AUTH)
    assert response.status == 400
    payload = await response.json()
    assert_error_shape(payload, response.headers)
    assert payload["error"]["param"] == param


async def test_limit_bounds_are_accepted(proxy, seeded: str) -> None:
    for limit in (1, 100):
        response = await proxy.get(f"/v1/chat/completions?limit={limit}", headers=AUTH)
        assert response.status == 200


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("order=up", "order"),
        ("after=nope", "after"),
        ("after=x-0", "after"),
        ("limit=1&limit=1", "limit"),
        ("order=asc&order=asc", "order"),
    ],
)
async def test_bad_message_queries(proxy, seeded: str, query: str, param: str) -> None:
    response = await proxy.get(f"/v1/chat/completions/{seeded}/messages?{query}", headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == param


UPDATE_CASES = {
    "malformed json": (b"{", None),
    "empty body": (b"", None),
    "array body": (b"[]", None),
    "no metadata": (b"{}", "metadata"),
    "metadata string": (b'{"metadata": "x"}', "metadata"),
    "metadata value number": (b'{"metadata": {"a": 1}}', "metadata"),
    "too many pairs": (orjson.dumps({"metadata": {str(i): "v" for i in range(17)}}), "metadata"),
    "unknown field": (b'{"metadata": {}, "model": "x"}', "model"),
}


@pytest.mark.parametrize("case", list(UPDATE_CASES))
async def test_bad_updates_change_nothing(case: str, proxy, seeded: str, tmp_path: Path) -> None:
    body, param = UPDATE_CASES[case]
    before = snapshot(tmp_path)
    response = await proxy.post(
        f"/v1/chat/completions/{seeded}",
        data=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status == 400
    payload = await response.json()
    assert_error_shape(payload, response.headers)
    assert payload["error"]["param"] == param
    assert snapshot(tmp_path) == before


async def test_unknown_ids_are_404_in_openai_shape(proxy, seeded: str, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    for method, path in (
        ("GET", "/v1/chat/completions/chatcmpl-missing"),
        ("POST", "/v1/chat/completions/chatcmpl-missing"),
        ("DELETE", "/v1/chat/completions/chatcmpl-missing"),
        ("GET", "/v1/chat/completions/chatcmpl-missing/messages"),
    ):
        response = await proxy.request(method, path, headers=AUTH, json={"metadata": {"a": "b"}})
        assert response.status == 404
        payload = await response.json()
        assert_error_shape(payload, response.headers)
        assert "chatcmpl-missing" in payload["error"]["message"]
    assert snapshot(tmp_path) == before


async def test_sdk_exceptions_for_proxy_errors(proxy, seeded: str) -> None:
    async with sdk(proxy, "sk-bad-input") as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.list(limit=500)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.retrieve("chatcmpl-missing")
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.update(seeded, metadata={"k": "v" * 600})
        assert (await client.chat.completions.retrieve(seeded)).metadata == {"k": "v"}
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.list(extra_headers={"Authorization": "Basic eDp5"})


async def test_delete_with_json_content_type_and_no_body(proxy, seeded: str) -> None:
    response = await proxy.delete(
        f"/v1/chat/completions/{seeded}", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 200
    assert await response.json() == {
        "object": "chat.completion.deleted",
        "id": seeded,
        "deleted": True,
    }


async def test_unknown_non_v1_path_is_404_json(proxy) -> None:
    response = await proxy.get("/nowhere")
    assert response.status == 404
    assert_error_shape(await response.json(), response.headers)


async def test_nul_characters_are_refused_and_change_nothing(
    proxy, upstream: FakeUpstream, seeded: str
) -> None:
    """U+0000 anywhere the store would keep or look up text is a 400 (or, in an id, a 404) on
    both backends; PostgreSQL's text cannot hold it, and refusing it there must not take the
    store down."""
    calls = len(upstream.received)
    response = await proxy.post(
        "/v1/chat/completions", json={**CHAT, "metadata": {"k": "a\x00"}}, headers=AUTH
    )
    assert response.status == 400
    payload = await response.json()
    assert_error_shape(payload, response.headers)
    assert payload["error"]["param"] == "metadata"
    assert len(upstream.received) == calls
    async with sdk(proxy, "sk-bad-input") as client:
        for metadata in ({"k": "\x00"}, {"k\x00": "v"}):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.update(seeded, metadata=metadata)
            assert refused.value.param == "metadata"
        for query, param in (
            ({"model": "gpt\x00"}, "model"),
            ({"metadata": {"k": "v\x00"}}, "metadata"),
            ({"metadata": {"\x00": "v"}}, "metadata"),
            ({"after": "\x00"}, "after"),
        ):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.list(**query)
            assert refused.value.param == param
        assert (await client.chat.completions.retrieve(seeded)).metadata == {"k": "v"}
    for method, path in (
        ("GET", "/v1/chat/completions/chatcmpl-%00"),
        ("POST", "/v1/chat/completions/chatcmpl-%00"),
        ("DELETE", "/v1/chat/completions/chatcmpl-%00"),
        ("GET", "/v1/chat/completions/chatcmpl-%00/messages"),
    ):
        response = await proxy.request(method, path, headers=AUTH, json={"metadata": {}})
        assert response.status == 404, (method, path)
        assert_error_shape(await response.json(), response.headers)
    assert (await proxy.get("/healthz")).status == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "{seeded}", "/v1/embeddings"])
async def test_a_body_that_does_not_match_its_content_encoding_is_a_400(
    proxy, upstream: FakeUpstream, seeded: str, tmp_path: Path, path: str
) -> None:
    before = snapshot(tmp_path)
    calls = len(upstream.received)
    for encoding in ("gzip", "deflate"):
        response = await proxy.post(
            path.format(seeded=f"/v1/chat/completions/{seeded}"),
            data=_chat(metadata={"k": "changed"}),
            headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert response.status == 400
        payload = await response.json()
        assert_error_shape(payload, response.headers)
        assert payload["error"]["code"] == "invalid_body"
    assert len(upstream.received) == calls
    assert snapshot(tmp_path) == before
