"""One behaviour suite, run on every store backend (SQLite and PostgreSQL): everything a user
does, through the official SDK, the HTTP API and the command line, never through SQL.

conftest parametrises every test here over ``store_url`` (see ``BOTH_BACKENDS``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import StoreConfig
from proxy.store import CompletionRecord, open_store
from proxy.writer import Writer
from tests import pg
from tests.fakes import FakeUpstream, Reply, chunks, sse, tool_call_answer
from tests.helpers import cli, commit_at, sdk

UPSTREAM_KEY = "sk-upstream-backends-0123456789abcdef"
PRICES = {"gpt-test": {"input": 1.0, "cached_input": 0.5, "output": 2.0}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_ANSWER = tool_call_answer(
    "chatcmpl-tools-b",
    "weather",
    '{"city": "Paris"}',
    usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
)
SECRET_TEXT = "my key is sk-proj-abcdefghijklmnopqrstuvwx1234 and mail me at jane.doe@example.com"


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture
async def other_store(store_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A second, empty store of the same backend (an import target)."""
    if store_url.startswith("postgresql://"):
        database: pg.TestDatabase = request.getfixturevalue("pg_database")
        schema = await database.schema()
        return database.url(schema)
    return str(tmp_path / "other.db")


async def test_every_shape_is_captured_and_served_back(proxy, upstream: FakeUpstream) -> None:
    async with sdk(proxy) as client:
        plain = await client.chat.completions.create(
            model="gpt-test", messages=ask("plain"), store=True, metadata={"k": "v"}, seed=3
        )
        stream = await client.chat.completions.create(
            model="gpt-test",
            messages=ask("streamed"),
            store=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed_ids = {chunk.id async for chunk in stream}
        upstream.script(Reply(json=TOOL_ANSWER))
        tool = await client.chat.completions.create(
            model="gpt-test", messages=ask("weather?"), tools=TOOLS, store=True
        )
        several = await client.chat.completions.create(
            model="gpt-test", messages=ask("two"), n=2, store=True
        )

        got = await client.chat.completions.retrieve(plain.id)
        assert got.choices[0].message.content == "echo: plain"
        assert got.metadata == {"k": "v"} and (got.model_extra or {})["seed"] == 3
        (streamed_id,) = streamed_ids
        got = await client.chat.completions.retrieve(streamed_id)
        assert got.choices[0].message.content == "echo: streamed"
        assert got.usage is not None
        got = await client.chat.completions.retrieve(tool.id)
        assert got.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
        got = await client.chat.completions.retrieve(several.id)
        assert [c.index for c in got.choices] == [c.index for c in several.choices]
        messages = await client.chat.completions.messages.list(plain.id)
        assert [(m.role, m.content) for m in messages.data] == [("user", "plain")]
        listed = [c.id async for c in client.chat.completions.list()]
        assert listed == [plain.id, streamed_id, tool.id, several.id]


async def test_list_filters_and_keyset_pages_in_both_orders(proxy) -> None:
    ids: list[str] = []
    async with sdk(proxy) as client:
        for n in range(9):
            made = await client.chat.completions.create(
                model="gpt-a" if n % 3 else "gpt-b",
                messages=ask(f"q{n}"),
                store=True,
                metadata={"parity": "odd" if n % 2 else "even", "third": str(n % 3)},
            )
            ids.append(made.id)
        assert [c.id async for c in client.chat.completions.list(limit=2)] == ids
        desc = [c.id async for c in client.chat.completions.list(limit=2, order="desc")]
        assert desc == ids[::-1]
        assert [c.id async for c in client.chat.completions.list(model="gpt-b", limit=1)] == [
            ids[0],
            ids[3],
            ids[6],
        ]
        both = client.chat.completions.list(metadata={"parity": "odd", "third": "1"}, limit=1)
        assert [c.id async for c in both] == [ids[1], ids[7]]
        mixed = client.chat.completions.list(
            model="gpt-a", metadata={"parity": "even"}, order="desc", limit=2
        )
        assert [c.id async for c in mixed] == [ids[8], ids[4], ids[2]]
        none = client.chat.completions.list(metadata={"parity": "odd", "third": "9"})
        assert [c.id async for c in none] == []
        # A deleted id keeps its place: paging after it goes on.
        await client.chat.completions.delete(ids[4])
        page = await client.chat.completions.list(after=ids[4], limit=2)
        assert [c.id for c in page.data] == [ids[5], ids[6]] and page.has_more
        page = await client.chat.completions.list(after=ids[4], limit=10, order="desc")
        assert [c.id for c in page.data] == ids[3::-1] and not page.has_more
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.list(after="chatcmpl-never")
        # The next completion after a deleted newest one keeps its own place.
        await client.chat.completions.delete(ids[8])
        newer = await client.chat.completions.create(model="gpt-a", messages=ask("new"), store=True)
        page = await client.chat.completions.list(after=ids[8])
        assert [c.id for c in page.data] == [newer.id]


async def test_update_delete_messages_and_caller_isolation(proxy) -> None:
    async with sdk(proxy, "sk-alice") as alice, sdk(proxy, "sk-bob") as bob:
        made = await alice.chat.completions.create(
            model="gpt-test", messages=ask("mine"), store=True, metadata={"a": "1"}
        )
        theirs = await bob.chat.completions.create(model="gpt-test", messages=ask("b"), store=True)
        for call in (
            lambda: bob.chat.completions.retrieve(made.id),
            lambda: bob.chat.completions.update(made.id, metadata={"x": "y"}),
            lambda: bob.chat.completions.delete(made.id),
            lambda: bob.chat.completions.messages.list(made.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await call()
        assert [c.id async for c in bob.chat.completions.list()] == [theirs.id]
        updated = await alice.chat.completions.update(made.id, metadata={"b": "2"})
        assert updated.metadata == {"b": "2"}
        assert [c.id async for c in alice.chat.completions.list(metadata={"b": "2"})] == [made.id]
        assert [c.id async for c in alice.chat.completions.list(metadata={"a": "1"})] == []
        cleared = await alice.chat.completions.update(made.id, metadata=None)
        assert cleared.metadata == {}
        deleted = await alice.chat.completions.delete(made.id)
        assert deleted.deleted and deleted.id == made.id
        with pytest.raises(openai.NotFoundError):
            await alice.chat.completions.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            await alice.chat.completions.delete(made.id)
        assert [c.id async for c in alice.chat.completions.list()] == []


async def _final_of_stream(client: openai.AsyncOpenAI, **kwargs: Any) -> str:
    stream = await client.chat.completions.create(stream=True, **kwargs)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_replay_strict_and_fallback(proxy_factory, upstream: FakeUpstream) -> None:
    recorder = await proxy_factory()
    async with sdk(recorder) as client:
        first = await client.chat.completions.create(
            model="gpt-test", messages=ask("r"), store=True
        )
        await _final_of_stream(client, model="gpt-test", messages=ask("s"), store=True)
        await client.chat.completions.create(model="gpt-test", messages=ask("p"), store=True)
        upstream.script(Reply(json={**TOOL_ANSWER, "id": "chatcmpl-second"}))
        await client.chat.completions.create(model="gpt-test", messages=ask("r"), store=True)
    calls = len(upstream.received)
    strict = await proxy_factory(replay={"mode": "strict"})
    async with sdk(strict) as client:
        again = await client.chat.completions.create(model="gpt-test", messages=ask("r"))
        assert again.id == first.id  # recordings play in the order they were recorded
        second = await client.chat.completions.create(model="gpt-test", messages=ask("r"))
        assert second.id == "chatcmpl-second"
        assert await _final_of_stream(client, model="gpt-test", messages=ask("s")) == "echo: s"
        as_plain = await client.chat.completions.create(model="gpt-test", messages=ask("s"))
        assert as_plain.choices[0].message.content == "echo: s"  # recorded streamed
        assert await _final_of_stream(client, model="gpt-test", messages=ask("p")) == "echo: p"
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="gpt-test", messages=ask("never"))
    assert len(upstream.received) == calls
    fallback = await proxy_factory(replay={"mode": "fallback"})
    async with sdk(fallback) as client:
        missed = await client.chat.completions.create(model="gpt-test", messages=ask("miss"))
        assert len(upstream.received) == calls + 1
        replayed = await client.chat.completions.create(model="gpt-test", messages=ask("miss"))
        assert replayed.id == missed.id and len(upstream.received) == calls + 1


async def test_export_import_both_formats_idempotent_and_bad_files_write_nothing(
    proxy, upstream: FakeUpstream, store_url: str, other_store: str, tmp_path: Path
) -> None:
    async with sdk(proxy) as client:
        for n in range(3):
            await client.chat.completions.create(
                model="gpt-test", messages=ask(f"q{n}"), store=True, metadata={"n": str(n)}
            )
        upstream.script(Reply(json=TOOL_ANSWER))
        await client.chat.completions.create(
            model="gpt-test", messages=ask("weather?"), tools=TOOLS, store=True
        )
    # Commands that only read run at once: each is a process start, the slow part here.
    (code, exported, err), (_, out, _), (code_ft, tuning, err_ft) = await asyncio.gather(
        cli("export", "--db", store_url),
        cli("export", "--db", store_url, "--metadata", "n=1"),
        cli("export", "--db", store_url, "--format", "finetune"),
    )
    assert code == 0, err
    records = jsonl(exported)
    assert len(records) == 4 and records[0]["prompt_tokens"] == 5
    assert [r["request"]["messages"][0]["content"] for r in jsonl(out)] == ["q1"]
    assert code_ft == 0, err_ft
    examples = jsonl(tuning)
    assert [e["messages"][-1]["role"] for e in examples] == ["assistant"] * 4
    assert "tools" in examples[-1]

    good = exported.splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join([good[0], good[1], b"{not json", good[2]]) + b"\n")
    code, _, err = await cli("import", str(bad), "--db", other_store)
    assert code == 1 and "nothing was imported" in err
    code, out, _ = await cli("export", "--db", other_store)
    assert out == b""

    dump = tmp_path / "good.jsonl"
    dump.write_bytes(exported)
    code, _, err = await cli("import", str(dump), "--db", other_store)
    assert code == 0 and "imported 4 new completions" in err, err
    code, _, err = await cli("import", str(dump), "--db", other_store)
    assert code == 0 and "imported 0 new completions (4 already present)" in err, err
    code, again, _ = await cli("export", "--db", other_store)
    assert jsonl(again) == records  # whole rows, token counts included
    (_, usage_a, _), (_, usage_b, _) = await asyncio.gather(
        cli("usage", "--db", store_url, "--json"), cli("usage", "--db", other_store, "--json")
    )
    assert orjson.loads(usage_a) == orjson.loads(usage_b)


@pytest.fixture
async def team(proxy_factory, store_url: str, monkeypatch: pytest.MonkeyPatch):
    """A keys-mode proxy with two members and an admin, keys made by the command line."""
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
    keys = {}
    for name, role in (("alice", "member"), ("bob", "member"), ("root", "admin")):
        code, out, err = await cli("keys", "create", name, "--role", role, "--db", store_url)
        assert code == 0, err
        keys[name] = out.decode().strip()
    proxy = await proxy_factory(auth={"mode": "keys", "key_cache_seconds": 0}, prices=PRICES)
    return proxy, keys


async def test_keys_roles_audit_usage_and_metrics(team, store_url: str) -> None:
    proxy, keys = team
    ids = {}
    for name in ("alice", "bob"):
        async with sdk(proxy, keys[name]) as client:
            made = await client.chat.completions.create(
                model="gpt-test", messages=ask(name), store=True, metadata={"team": "x"}
            )
            ids[name] = made.id
    async with sdk(proxy, keys["alice"]) as alice:
        assert [c.id async for c in alice.chat.completions.list()] == [ids["alice"]]
        with pytest.raises(openai.NotFoundError):
            await alice.chat.completions.retrieve(ids["bob"])
        await alice.chat.completions.update(ids["alice"], metadata={"team": "y"})
    async with sdk(proxy, keys["root"]) as root:
        assert [c.id async for c in root.chat.completions.list()] == [ids["alice"], ids["bob"]]
        assert [c.id async for c in root.chat.completions.list(metadata={"team": "x"})] == [
            ids["bob"]
        ]
        await root.chat.completions.delete(ids["bob"])
    admin = {"Authorization": f"Bearer {keys['root']}"}
    entries = (await (await proxy.get("/admin/audit", headers=admin)).json())["data"]
    assert [(e["action"], e["actor"], e["owner"]) for e in entries] == [
        ("key_created", "cli", "alice"),
        ("key_created", "cli", "bob"),
        ("key_created", "cli", "root"),
        ("update_metadata", "alice", "alice"),
        ("delete", "root", "bob"),
    ]
    assert entries[3]["detail"] == {"before": {"team": "x"}, "after": {"team": "y"}}
    usage = (await (await proxy.get("/admin/usage?group_by=caller", headers=admin)).json())["data"]
    assert [(r["caller"], r["completions"], r["prompt_tokens"]) for r in usage] == [("alice", 1, 5)]
    assert usage[0]["cost_usd"] == round((5 * 1.0 + 7 * 2.0) / 1e6, 6)
    families = {
        f.name: f
        for f in text_string_to_metric_families(
            await (await proxy.get("/metrics", headers=admin)).text()
        )
    }
    stored = [
        (s.labels["caller"], s.value)
        for s in families["completions_proxy_completions_stored"].samples
        if s.name.endswith("_total")
    ]
    assert sorted(stored) == [("alice", 1.0), ("bob", 1.0)]

    code, _, err = await cli("keys", "revoke", "bob", "--db", store_url)
    assert code == 0, err
    async with sdk(proxy, keys["bob"]) as bob:
        with pytest.raises(openai.AuthenticationError):
            await bob.chat.completions.list()
    code, out, _ = await cli("keys", "list", "--db", store_url)
    assert "bob" in out.decode() and keys["bob"].split("_", 2)[2] not in out.decode()


async def test_redaction_masks_what_is_stored(proxy, upstream: FakeUpstream) -> None:
    async with sdk(proxy) as client:
        made = await client.chat.completions.create(
            model="gpt-test", messages=ask(SECRET_TEXT), store=True
        )
        assert "jane.doe@example.com" in (made.choices[0].message.content or "")
        stored = await client.chat.completions.retrieve(made.id)
        messages = await client.chat.completions.messages.list(made.id)
    assert "jane.doe@example.com" not in (stored.choices[0].message.content or "")
    assert "[REDACTED:" in (stored.choices[0].message.content or "")
    assert "sk-proj-abcdefghijklmnopqrstuvwx1234" not in (messages.data[0].content or "")
    assert SECRET_TEXT in upstream.chat_requests()[-1].body.decode()


async def test_capture_all_keeps_failed_exchanges(
    proxy_factory, upstream: FakeUpstream, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
    code, out, err = await cli("keys", "create", "root", "--role", "admin", "--db", store_url)
    assert code == 0, err
    root_key = out.decode().strip()
    proxy = await proxy_factory(auth={"mode": "keys"}, capture={"policy": "all"})
    async with sdk(proxy, root_key) as client:
        kept = await client.chat.completions.create(model="gpt-test", messages=ask("no flag"))
        upstream.script(Reply(status=500, body=b'{"error": {"message": "boom"}}'))
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-test", messages=ask("fails"))
        upstream.script(
            Reply(sse=sse(chunks({"model": "gpt-test"}, "chatcmpl-cut", pieces=5)), drop_after=2)
        )
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(
                model="gpt-test", messages=ask("cut"), stream=True
            )
            async for _ in stream:
                pass
        assert [c.id async for c in client.chat.completions.list()] == [kept.id]
    headers = {"Authorization": f"Bearer {root_key}"}
    # A failed exchange's audit record is queued when its handler ends, which may be just
    # after the client saw the failure: wait until both are committed.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        everything = await (await proxy.get("/admin/exchanges", headers=headers)).json()
        if len(everything["data"]) >= 2 or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    first = await (await proxy.get("/admin/exchanges?limit=1", headers=headers)).json()
    assert first["has_more"] is True
    rest = await (
        await proxy.get(f"/admin/exchanges?after={first['last_id']}", headers=headers)
    ).json()
    exchanges = first["data"] + rest["data"]
    assert [(e["outcome"], e["status"]) for e in exchanges] == [
        ("upstream_error", 500),
        ("upstream_failed", 200),
    ]
    assert exchanges[0]["request"]["messages"][0]["content"] == "fails"


async def test_retention_deletes_everything_before_the_cutoff(proxy, store_url: str) -> None:
    async with sdk(proxy) as client:
        made = await client.chat.completions.create(
            model="gpt-test", messages=ask("old"), store=True
        )
    # Everything stored is older than a day: without a terminal, prune needs --yes for that.
    code, _, err = await cli("prune", "--db", store_url, "--days", "1", "--yes")
    assert code == 0, err
    async with sdk(proxy) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.retrieve(made.id)
        assert [c.id async for c in client.chat.completions.list()] == []
    code, out, _ = await cli("export", "--db", store_url)
    assert out == b""


async def test_healthz_reports_a_writable_store(proxy) -> None:
    response = await proxy.get("/healthz")
    body = await response.json()
    assert response.status == 200 and body["store"]["writable"] is True


async def test_full_text_search_through_the_list(proxy) -> None:
    async with sdk(proxy) as client:
        made = {}
        for key, text in (
            ("cafe", "un café crème, please"),
            ("dont", "I don't like Mondays"),
            ("both", "café on Mondays"),
        ):
            made[key] = (
                await client.chat.completions.create(
                    model="gpt-test", messages=ask(text), store=True, metadata={"k": key}
                )
            ).id

        async def found(search: str, **extra: Any) -> list[str]:
            query = {"search": search, **extra}
            return [c.id async for c in client.chat.completions.list(extra_query=query, limit=1)]

        assert await found("CAFE") == [made["cafe"], made["both"]]  # accents and case folded
        assert await found("cafe", order="desc") == [made["both"], made["cafe"]]
        assert await found("cafe mondays") == [made["both"]]  # every word
        assert await found("don't") == [made["dont"]]
        assert await found("echo crème") == [made["cafe"]]  # the answer is searched too
        assert await found("cafe", **{"metadata[k]": "both"}) == [made["both"]]
        assert await found("nowhere") == []
        await client.chat.completions.delete(made["both"])
        assert await found("mondays") == [made["dont"]]


def _record(n: int) -> CompletionRecord:
    return CompletionRecord(
        id=f"chatcmpl-w{n}", caller="a", created=1000, model="m", metadata={},
        completion=orjson.dumps({"id": f"chatcmpl-w{n}"}), request=b"{}",
        request_id=None, stream=False, outcome="complete",
    )  # fmt: skip


async def test_a_batch_waits_for_more_only_where_the_store_commits_in_process(
    store_url: str,
) -> None:
    """SQLite commits on the proxy's own CPU: two completions waiting at once also take the
    one queued a loop pass later into their commit. PostgreSQL commits on its server: the
    two go at once, and the later one gets a commit of its own."""
    store = await open_store(store_url, StoreConfig(url=store_url))
    in_process = not store_url.startswith("postgresql://")
    assert store.commits_in_process is in_process
    writer = Writer(store)
    try:
        await commit_at(writer, (0, 0, 1), [_record(n) for n in range(3)])
    finally:
        await store.close()
    assert (writer.stats.committed, writer.stats.batches) == (3, 1 if in_process else 2)
