"""Full-text search: through the API's ``search=`` extension (the SDK's ``extra_query``) and
in the SQLite file itself: kept with the completion, gone with it, never holding a secret."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from dataclasses import replace
from pathlib import Path

import asyncpg
import openai
import pytest

from proxy.config import StoreConfig
from proxy.keys import STORE
from proxy.models import ListQuery, PageQuery
from proxy.store import CompletionRecord, SearchOff, StoreError, open_store
from proxy.store.sqlite import SQLiteStore
from proxy.store.sqlite.search import add_functions
from proxy.store.text import filter_tags, fts5_query, searchable
from tests.conftest import BACKENDS
from tests.fakes import FakeUpstream, Reply, tool_call_answer
from tests.helpers import sdk


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def indexed_words(path: Path) -> list[str]:
    """Every word SQLite's index holds for some completion (it keeps no copy of the text)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE VIRTUAL TABLE temp.words USING fts5vocab(main, completions_fts, row)")
        return [row[0] for row in conn.execute("SELECT term FROM temp.words ORDER BY term")]


async def found(client: openai.AsyncOpenAI, search: str, **params: object) -> list[str]:
    page = await client.chat.completions.list(extra_query={"search": search}, **params)  # type: ignore[arg-type]
    return [c.id for c in page.data]


both = pytest.mark.parametrize("store_url", BACKENDS, indirect=True)


async def indexed_text(proxy, store_url: str) -> str:
    """Everything the search index holds, as text (SQLite's indexed words, PostgreSQL's
    tsvectors)."""
    if store_url.startswith("postgresql"):
        conn = await asyncpg.connect(store_url)  # search_path from the URL
        try:
            rows = await conn.fetch("SELECT search::text FROM completions")
        finally:
            await conn.close()
        return " ".join(row[0] or "" for row in rows)
    return " ".join(indexed_words(Path(store_url)))


@both
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
        Reply(json=tool_call_answer("chatcmpl-tools", "lookup", '{"city": "Reykjavik"}'))
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
    await alice.chat.completions.update(cafe.id, metadata={"t": "z"})  # tags follow edits
    assert await found(alice, "café", metadata={"t": "x"}) == []
    assert await found(alice, "café", metadata={"t": "z"}) == [cafe.id]
    assert await found(alice, "café", model="gpt-other") == []
    assert await found(alice, "café", model="gpt-test") == [cafe.id]
    assert await found(alice, '"OR" NEAR( *') == []  # no query syntax: words only
    assert await found(alice, "?!") == []
    assert await found(bob, "lighthouses") == []  # only one's own
    assert len(await found(bob, "lighthouse")) == 1
    with pytest.raises(openai.BadRequestError) as refused:
        await found(alice, "x" * 501)
    assert refused.value.body["param"] == "search"  # type: ignore[index]


@both
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


@both
async def test_deleted_and_pruned_completions_leave_the_index(
    proxy, alice: openai.AsyncOpenAI, store_url: str
) -> None:
    kept = await alice.chat.completions.create(
        model="gpt-test", messages=ask("zebra kept"), store=True
    )
    gone = await alice.chat.completions.create(
        model="gpt-test", messages=ask("zebra gone"), store=True
    )
    await alice.chat.completions.delete(gone.id)
    assert await found(alice, "zebra") == [kept.id]
    assert "gone" not in await indexed_text(proxy, store_url)
    store = proxy.app[STORE]
    await store.prune(before=2_000_000_000)
    assert (await store.list_completions(None, ListQuery(search="zebra"))).items == []
    assert await found(alice, "zebra") == []
    assert "zebra" not in await indexed_text(proxy, store_url)


@both
async def test_redacted_secrets_stay_out_of_the_index(
    proxy, alice: openai.AsyncOpenAI, store_url: str
) -> None:
    secret = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    made = await alice.chat.completions.create(
        model="gpt-test", messages=ask(f"my key is {secret} please"), store=True
    )
    assert await found(alice, secret) == []
    assert await found(alice, "please") == [made.id]
    bodies = await indexed_text(proxy, store_url)
    assert "please" in bodies and secret.lower() not in bodies.lower()
    assert "a1b2c3d4" not in bodies.lower()


@both
async def test_deleting_what_was_captured_takes_every_word_out_of_the_index(
    proxy, alice: openai.AsyncOpenAI, upstream: FakeUpstream, store_url: str
) -> None:
    """The capture hands the store the request and answer it already parsed (redacted), and
    SQLite's index takes a completion's words out by being given its text again, made from
    the stored bytes: both must give the same text, or a delete leaves words behind."""
    secret = "sk-proj-" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6"
    parts = [{"type": "text", "text": f"parts with {secret} and ana@example.org"}]
    made = [
        await alice.chat.completions.create(
            model="gpt-test", messages=ask(f"plain {secret} café"), store=True
        ),
        await alice.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": parts}], store=True
        ),
    ]
    stream = await alice.chat.completions.create(
        model="gpt-test", messages=ask(f"streamed {secret}"), store=True, stream=True
    )
    async for chunk in stream:
        streamed = chunk.id
    upstream.script(
        Reply(json=tool_call_answer("chatcmpl-keyed", "save", f'{{"key": "{secret}"}}'))
    )
    made.append(
        await alice.chat.completions.create(model="gpt-test", messages=ask("keep"), store=True)
    )
    held = await indexed_text(proxy, store_url)
    assert "redacted" in held and "z9y8x7w6" not in held.lower()
    for completion_id in [c.id for c in made] + [streamed]:
        await alice.chat.completions.delete(completion_id)
    assert (await indexed_text(proxy, store_url)).split() == []


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


def index_segments(path: Path) -> int:
    """How many segments SQLite's index is made of, from its structure record (FTS5's
    ``%_data`` row 10: a 4-byte cookie, then the number of levels and of segments as
    varints, each below 128 here)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        record = conn.execute("SELECT block FROM completions_fts_data WHERE id = 10").fetchone()
    levels, segments = record[0][4], record[0][5]
    assert levels < 128 and segments < 128
    return int(segments)


async def test_commits_of_one_completion_keep_the_index_merged(tmp_path: Path) -> None:
    """Each commit adds a segment to the index; the insert merges a few pages in every
    commit (FTS5's own merging is off), taking a level once it holds 16 segments, so 30
    commits of one completion leave the first 16 merged into one. Without the merging they
    would leave 30 (FTS5's crisis merge waits for 32), and every search would read them all."""
    path = tmp_path / "merged.db"
    store = SQLiteStore(path)
    await store.open()
    try:
        for n in range(30):
            await store.write_batch([_record(n, f"walrus number {n}")])
        assert index_segments(path) <= 16
        page = await store.list_completions(
            None, ListQuery(page=PageQuery(order="desc", limit=100), search="walrus")
        )
        assert [c.id for c in page.items] == [f"chatcmpl-{n}" for n in range(29, -1, -1)]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        add_functions(conn)
        conn.execute(
            "INSERT INTO completions_fts (completions_fts, rank) VALUES ('integrity-check', 0)"
        )


async def test_an_old_file_is_indexed_when_it_gains_search(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    await store.open()
    await store.write_batch([_record(n, f"walrus {n}") for n in range(3)])
    await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # as a file before m010
        for statement in (
            "DROP TRIGGER completions_search_delete",
            "DROP TRIGGER completions_search_update",
            "DROP TABLE search_backlog",
            "DROP TABLE completions_fts",
        ):
            conn.execute(statement)
        conn.execute(
            "DELETE FROM _migrations WHERE name IN"
            " ('m010_search', 'm013_search_tags', 'm016_search_contentless')"
        )
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
    assert indexed_words(path) == []


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
    assert fts5_query('say "hi" now') == 'body : ("say" """hi""" "now")'
    tags = filter_tags("a b", "gpt-4o", [("k", 'v "w"'), ("k", "v2")])
    assert len(tags) == 4 and all(tag.isalnum() for tag in tags) and len(set(tags)) == 4
    assert filter_tags("a b", None) == tags[:1] and filter_tags(None, None) == []
    assert fts5_query("x", tags[:2]) == f'body : ("x") AND tags : ({tags[0]} {tags[1]})'
    assert fts5_query("  ") is None


@both
async def test_usage_over_whole_days_reads_the_rollup_and_matches_the_rows(
    store_url: str,
) -> None:
    """Whole-day bounds read usage_by_day (kept by the store's inserts and deletes); other
    bounds sum the rows. Both must agree, through writes, an import that meets duplicates,
    a delete and a prune, on each backend."""
    store = await open_store(store_url, StoreConfig())
    try:
        records = [
            replace(
                _record(n, "x"),
                caller=("ann", "ben")[n % 2],
                model=("m1", "m2", "m3")[n % 3],
                created=86400 * (1 + n % 5) + n,
                prompt_tokens=n,
                cached_tokens=n // 2,
                completion_tokens=2 * n,
            )
            for n in range(60)
        ]
        await store.write_batch(records[:50])
        assert await store.import_records([records[40:60]], accept=lambda: True) == 10
        await store.delete(None, records[7].id, "test")
        await store.prune(before=86400 * 2)  # the first day goes
        for groups in (["day", "caller", "model"], ["caller"], ["model", "day"], []):
            rolled = await store.usage(0, 86400 * 30, groups)  # whole days
            summed = await store.usage(1, 86400 * 30 - 1, groups)  # not: read the rows
            assert rolled == summed, groups
            assert sum(r.completions for r in rolled) == 60 - 1 - 12
    finally:
        await store.close()


@both
async def test_log_rows_time_range_and_failed_outcomes_on_each_backend(
    proxy, alice: openai.AsyncOpenAI, bob: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """What the console reads: log rows with their promoted columns and preview, a time
    range, one row by id, and failed exchanges by outcome."""
    made = await alice.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": [{"type": "text", "text": "parts  here"}]}],
        store=True,
        metadata={"k": "v"},
    )
    await bob.chat.completions.create(model="gpt-test", messages=ask("bob"), store=True)
    upstream.script(Reply(status=500, json={"error": {"message": "no"}}))
    with pytest.raises(openai.InternalServerError):
        await alice.chat.completions.create(model="gpt-test", messages=ask("x"), store=True)
    store = proxy.app[STORE]
    caller = (await store.log_entries(None, ListQuery())).items[0].caller
    page = await store.log_entries(caller, ListQuery(page=PageQuery(order="desc")))
    (entry,) = page.items
    assert (entry.id, entry.model, entry.outcome, entry.metadata) == (
        made.id,
        "gpt-test",
        "complete",
        {"k": "v"},
    )
    assert entry.preview == "parts here" and entry.prompt_tokens == 5
    assert entry.completion_tokens == 7 and entry.duration_ms is not None
    assert await store.log_entry(caller, made.id) == entry
    assert await store.log_entry("someone else", made.id) is None
    everyone = await store.log_entries(None, ListQuery())
    assert len(everyone.items) == 2
    created = entry.created
    inside = ListQuery(since=created, until=created + 1)
    assert [e.id for e in (await store.log_entries(caller, inside)).items] == [made.id]
    assert (await store.log_entries(caller, ListQuery(since=created + 1))).items == []
    assert (await store.log_entries(None, ListQuery(until=created))).items == []
    # The failed exchange's audit record is queued when its handler ends, which may be just
    # after the client saw the 500: wait until it is committed.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        failed = await store.list_exchanges(None, PageQuery(), outcome="upstream_error")
        if failed.items or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert [e.status for e in failed.items] == [500]
    assert (await store.list_exchanges(None, PageQuery(), outcome="client_gone")).items == []


@both
async def test_ended_sessions_are_seen_by_every_process_on_the_store(proxy) -> None:
    store = proxy.app[STORE]
    assert not await store.session_ended("s1")
    await store.end_session("old", 1.0)  # already past: dropped by the next end
    await store.end_session("s1", 4_000_000_000.0)
    await store.end_session("s1", 4_000_000_001.0)  # twice is fine
    assert await store.session_ended("s1")
    await store.end_session("s2", 4_000_000_000.0)
    assert not await store.session_ended("old")


async def create(client: openai.AsyncOpenAI, text: str, **params: object) -> str:
    made = await client.chat.completions.create(
        model="gpt-test",
        messages=ask(text),
        store=True,
        **params,  # type: ignore[arg-type]
    )
    return made.id


@both
async def test_search_off_indexes_nothing_and_refuses_searches_until_turned_back_on(
    proxy_factory, store_url: str
) -> None:
    """``store.search: false``: writes index nothing and a search is a 400 naming the
    switch; deletes and metadata edits of completions indexed before still reach the index.
    Turned back on, the store indexes what was written meanwhile when it opens."""
    on = await proxy_factory()
    async with sdk(on, "sk-test-alice") as alice:
        early = await create(alice, "walrus early", metadata={"t": "x"})
        doomed_early = await create(alice, "walrus doomed early")
    await on.close()

    off = await proxy_factory(store={"search": False})
    async with sdk(off, "sk-test-alice") as alice:
        late = await create(alice, "walrus late", metadata={"t": "x"})
        doomed_late = await create(alice, "walrus doomed late")
        with pytest.raises(openai.BadRequestError) as refused:
            await found(alice, "walrus")
        error = refused.value.body
        assert error["param"] == "search" and error["code"] == "search_off"  # type: ignore[index]
        assert "store.search" in error["message"]  # type: ignore[index]
        listed = [c.id async for c in alice.chat.completions.list()]  # listing still works
        assert listed == [early, doomed_early, late, doomed_late]
        await alice.chat.completions.delete(doomed_early)  # indexed: its words leave
        await alice.chat.completions.delete(doomed_late)  # never indexed
        await alice.chat.completions.update(early, metadata={"t": "y"})  # its tags follow
        words = await indexed_text(off, store_url)
        assert "early" in words and "late" not in words and "doomed" not in words
    await off.close()

    back = await proxy_factory()
    async with sdk(back, "sk-test-alice") as alice:
        assert await found(alice, "walrus") == [early, late]
        assert await found(alice, "late") == [late]
        assert await found(alice, "walrus", metadata={"t": "x"}) == [late]
        assert await found(alice, "walrus", metadata={"t": "y"}) == [early]
        assert await found(alice, "doomed") == []
        assert "doomed" not in await indexed_text(back, store_url)
    await back.close()


async def test_a_backlog_is_indexed_at_open(tmp_path: Path) -> None:
    """Completions written with search off wait in ``search_backlog``; the next open with
    search on indexes them and empties it. A read-only open
    (``must_exist``, the CLI's reading commands) leaves it for the server."""
    path = tmp_path / "backlog.db"
    store = SQLiteStore(path, search=False)
    await store.open()
    await store.write_batch([_record(n, f"narwhal {n}") for n in range(5)])
    with pytest.raises(SearchOff):
        await store.list_completions(None, ListQuery(search="narwhal"))
    await store.close()
    assert indexed_words(path) == []

    reader = SQLiteStore(path, must_exist=True)
    await reader.open()
    await reader.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM search_backlog").fetchone()[0] == 5

    store = SQLiteStore(path)
    await store.open()
    try:
        page = await store.list_completions(
            None, ListQuery(page=PageQuery(order="desc"), search="narwhal")
        )
        assert [c.id for c in page.items] == [f"chatcmpl-{n}" for n in range(4, -1, -1)]
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM search_backlog").fetchone()[0] == 0


@both
async def test_search_with_filters_past_the_newest_thousand_and_after_a_metadata_edit(
    store_url: str,
) -> None:
    """Matches older than the newest thousand completions, found through the index alone on
    PostgreSQL; a filter the word never meets gives an empty page; paging in both orders;
    a metadata edit moves a completion from one filter's results to another's."""
    records = [
        replace(_record(n, "needle" if n < 12 else "hay"), metadata={"env": "dev"})
        for n in range(1500)
    ]
    store = await open_store(store_url, StoreConfig())
    try:
        await store.write_batch(records)

        async def ids(order: str = "desc", after: str | None = None, **filters) -> list[str]:
            query = ListQuery(
                page=PageQuery(after=after, limit=5, order=order), search="needle", **filters
            )
            return [c.id for c in (await store.list_completions("caller_a", query)).items]

        newest = [f"chatcmpl-{n}" for n in range(11, -1, -1)]
        assert await ids(metadata=(("env", "dev"),)) == newest[:5]
        assert await ids(after=newest[4], metadata=(("env", "dev"),)) == newest[5:10]
        assert await ids(after=newest[9]) == newest[10:]
        assert await ids("asc", metadata=(("env", "dev"),)) == newest[::-1][:5]
        assert await ids(metadata=(("env", "prod"),)) == []
        assert await ids(model="other-model") == []
        await store.update_metadata("caller_a", "chatcmpl-3", {"env": "prod"}, "test")
        assert await ids(metadata=(("env", "prod"),)) == ["chatcmpl-3"]
        assert "chatcmpl-3" not in await ids(after=newest[4], metadata=(("env", "dev"),))
    finally:
        await store.close()
