"""Full-text search: through the API's ``search=`` extension (the SDK's ``extra_query``) and
in the SQLite file itself: kept with the completion, gone with it, never holding a secret."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import replace
from pathlib import Path

import openai
import pytest

from proxy.models import ListQuery, PageQuery
from proxy.store import CompletionRecord, StoreError
from proxy.store.sqlite import SQLiteStore
from proxy.store.text import fts5_query, searchable
from tests.fakes import FakeUpstream, Reply


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def fts_rows(path: Path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT rowid, body FROM completions_fts ORDER BY rowid").fetchall()


async def found(client: openai.AsyncOpenAI, search: str, **params: object) -> list[str]:
    page = await client.chat.completions.list(extra_query={"search": search}, **params)  # type: ignore[arg-type]
    return [c.id for c in page.data]


async def test_search_through_the_api_finds_prompts_answers_and_tool_arguments(
    alice: openai.AsyncOpenAI, bob: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    lighthouse = await alice.chat.completions.create(
        model="gpt-test", messages=ask("Tell me about Lighthouses"), store=True
    )
    cafe = await alice.chat.completions.create(
        model="gpt-test", messages=ask("the best café"), store=True, metadata={"t": "x"}
    )
    upstream.script(
        Reply(
            json={
                "id": "chatcmpl-tools",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "gpt-test",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {
                                        "name": "lookup",
                                        "arguments": '{"city": "Reykjavik"}',
                                    },
                                }
                            ],
                        },
                        "finish_reason": "tool_calls",
                    }
                ],
            }
        )
    )
    tool = await alice.chat.completions.create(model="gpt-test", messages=ask("where?"), store=True)
    await bob.chat.completions.create(
        model="gpt-test", messages=ask("bob's lighthouse"), store=True
    )
    assert await found(alice, "lighthouses") == [lighthouse.id]  # case-insensitive
    assert await found(alice, "echo lighthouses") == [lighthouse.id]  # the answer, too
    assert await found(alice, "cafe") == [cafe.id]  # accents folded
    assert await found(alice, "reykjavik") == [tool.id]  # tool-call arguments
    assert await found(alice, "lighthouses nowhere") == []  # every word must appear
    assert await found(alice, "café", metadata={"t": "y"}) == []  # with the filters
    assert await found(alice, "café", metadata={"t": "x"}) == [cafe.id]
    assert await found(alice, '"OR" NEAR( *') == []  # no query syntax: words only
    assert await found(alice, "?!") == []
    assert await found(bob, "lighthouses") == []  # only one's own
    assert len(await found(bob, "lighthouse")) == 1
    with pytest.raises(openai.BadRequestError) as refused:
        await found(alice, "x" * 501)
    assert refused.value.body["param"] == "search"  # type: ignore[index]


async def test_search_pages_newest_first_without_repeats(alice: openai.AsyncOpenAI) -> None:
    made = [
        (
            await alice.chat.completions.create(
                model="gpt-test", messages=ask(f"common word {n}"), store=True
            )
        ).id
        for n in range(7)
    ]
    seen: list[str] = []
    after = None
    while True:
        extra = {"after": after} if after else {}
        page = await alice.chat.completions.list(
            extra_query={"search": "common"},
            order="desc",
            limit=3,
            **extra,  # type: ignore[arg-type]
        )
        seen += [c.id for c in page.data]
        if not page.has_more:
            break
        after = page.data[-1].id
    assert seen == made[::-1]


async def test_deleted_and_pruned_completions_leave_the_index(
    proxy, alice: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    kept = await alice.chat.completions.create(
        model="gpt-test", messages=ask("zebra kept"), store=True
    )
    gone = await alice.chat.completions.create(
        model="gpt-test", messages=ask("zebra gone"), store=True
    )
    await alice.chat.completions.delete(gone.id)
    assert await found(alice, "zebra") == [kept.id]
    db = tmp_path / "completions.db"
    assert [body for _, body in fts_rows(db) if "gone" in body] == []
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.prune(before=2_000_000_000)
        page = await store.list_completions(None, ListQuery(search="zebra"))
        assert page.items == []
    finally:
        await store.close()
    assert fts_rows(db) == []


async def test_redacted_secrets_stay_out_of_the_index(
    alice: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    secret = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    made = await alice.chat.completions.create(
        model="gpt-test", messages=ask(f"my key is {secret} please"), store=True
    )
    assert await found(alice, secret) == []
    assert await found(alice, "please") == [made.id]
    bodies = " ".join(body for _, body in fts_rows(tmp_path / "completions.db"))
    assert "please" in bodies and secret not in bodies and "A1b2C3d4" not in bodies


def _record(n: int, text: str) -> CompletionRecord:
    return CompletionRecord(
        id=f"chatcmpl-{n}",
        caller="caller_a",
        created=1000 + n,
        model="gpt-test",
        metadata={},
        completion=b'{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}',
        request=b'{"messages":[{"role":"user","content":"' + text.encode() + b'"}]}',
        request_id=None,
        stream=False,
        outcome="complete",
    )


async def test_an_old_file_is_indexed_when_it_gains_search(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    await store.open()
    await store.write_batch([_record(n, f"walrus {n}") for n in range(3)])
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # as a file before m010
        conn.execute("DROP TRIGGER completions_fts_delete")
        conn.execute("DROP TABLE completions_fts")
        conn.execute("DELETE FROM _migrations WHERE name = 'm010_search'")
        conn.commit()
    store = SQLiteStore(path)
    await store.open()
    try:
        page = await store.list_completions(
            "caller_a", ListQuery(page=PageQuery(order="desc"), search="walrus")
        )
        assert [c.id for c in page.items] == ["chatcmpl-2", "chatcmpl-1", "chatcmpl-0"]
        entry = await store.log_entry("caller_a", "chatcmpl-1")
        assert entry is not None and entry.preview == "walrus 1"
    finally:
        await store.close()


async def test_a_batch_that_fails_leaves_no_text_behind(tmp_path: Path) -> None:
    path = tmp_path / "batch.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        bad = replace(_record(9, "x"), model=None)  # type: ignore[arg-type]
        with pytest.raises(StoreError):  # the NOT NULL constraint
            await store.write_batch([_record(1, "narwhal"), bad])
        assert (await store.list_completions(None, ListQuery(search="narwhal"))).items == []
    finally:
        await store.close()
    assert fts_rows(path) == []


def test_searchable_text_and_query_are_pure() -> None:
    request = (
        b'{"messages":[{"role":"system","content":"be kind"},'
        b'{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url"}]},'
        b'{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function",'
        b'"function":{"name":"find","arguments":"{\\"q\\":1}"}}]}]}'
    )
    completion = b'{"choices":[{"message":{"content":"done","refusal":"no"}}]}'
    assert searchable(request, completion).split("\n") == [
        "be kind",
        "look",
        "find",
        '{"q":1}',
        "done",
        "no",
    ]
    assert searchable(b"not json", b"{}") == ""
    assert fts5_query('say "hi" now') == '"say" """hi""" "now"'
    assert fts5_query("  ") is None
