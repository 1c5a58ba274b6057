"""What is specific to the PostgreSQL store: migrations under an advisory lock, kill -9 with a
client ledger, the database going away and coming back, statement and connect timeouts,
several proxy instances on one database, and what retention leaves in the database's files.
Behaviour shared with SQLite is in test_backends (run on both)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.config import StoreConfig
from proxy.models import ListQuery, PageQuery
from proxy.store import CompletionRecord, StoreError, open_store
from proxy.store.postgres import search
from proxy.store.postgres import store as pg_store
from proxy.store.postgres.migrations import LOCK_SPACE, MIGRATIONS, RETENTION_LOCK, applied, migrate
from tests import pg
from tests.conftest import make_config, sdk
from tests.fakes import FakeUpstream
from tests.processes import ProxyProcess, run_cli

POLL = 0.05


async def until(check: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll ``check`` (a coroutine function returning truthy when done); seconds it took."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(POLL)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_two_instances_starting_at_once_migrate_exactly_once(pg_url: str) -> None:
    conns = [await asyncpg.connect(pg_url) for _ in range(2)]
    try:
        done = await asyncio.gather(*(migrate(conn) for conn in conns))
        names = [m.name for m in MIGRATIONS]
        assert sorted(done, key=len) == [[], names]  # one applied every step, the other none
        assert await applied(conns[0]) == names
        assert await migrate(conns[1]) == []  # and a later start applies nothing
        assert await conns[0].fetchval("SELECT count(*) FROM _migrations") == len(names)
    finally:
        for conn in conns:
            await conn.close()


async def test_two_stores_opening_at_once_both_work(pg_url: str) -> None:
    settings = StoreConfig(url=pg_url)
    stores = await asyncio.gather(*(open_store(pg_url, settings) for _ in range(2)))
    try:
        record = CompletionRecord(
            id="c1", caller="a", created=1, model="m", metadata={}, completion=b"{}",
            request=b"{}", request_id=None, stream=False, outcome="complete",
        )  # fmt: skip
        assert await stores[0].write_batch([record]) == 1
        assert await stores[1].write_batch([record]) == 0  # the same caller and id: kept once
        assert (await stores[1].get("a", "c1")) is not None
    finally:
        for store in stores:
            await store.close()


async def test_a_read_only_command_refuses_a_database_without_a_store(
    pg_database: pg.TestDatabase,
) -> None:
    url = pg_database.url(await pg_database.schema())
    result = await asyncio.to_thread(run_cli, "export", "--db", url)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT to_regclass('completions')") is None  # nothing made
    finally:
        await conn.close()


async def test_connect_timeout_bounds_a_database_that_never_answers() -> None:
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(  # accepts, then says nothing
        lambda reader, writer: held.append(writer), "127.0.0.1", 0
    )
    port = silent.sockets[0].getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/none"
    settings = StoreConfig(url=url, postgres={"connect_timeout": 0.3})
    started = time.monotonic()
    try:
        with pytest.raises(StoreError, match="in time"):
            await open_store(url, settings)
    finally:
        silent.close()
        for writer in held:
            writer.close()
        await silent.wait_closed()
    assert time.monotonic() - started < 3


# -- one proxy, in process, on a database that fails -------------------------------------------


@pytest.fixture
async def gate(pg_database: pg.TestDatabase) -> AsyncIterator[pg.Gate]:
    gate = pg.Gate(pg_database.host_port)
    await gate.open()
    yield gate
    await gate.shut()


async def _proxy_on(
    aiohttp_client: Any, upstream: FakeUpstream, tmp_path: Path, url: str, **postgres: Any
) -> TestClient[web.Request, web.Application]:
    config = make_config(
        tmp_path,
        upstream.url,  # type: ignore[attr-defined]
        store={"url": url, "postgres": {"connect_timeout": 1, **postgres}},
    )
    return await aiohttp_client(create_app(config))


async def test_database_gone_gets_503_before_upstream_and_recovers_by_itself(
    aiohttp_client: Any,
    upstream: FakeUpstream,
    tmp_path: Path,
    pg_database: pg.TestDatabase,
    gate: pg.Gate,
) -> None:
    schema = await pg_database.schema()
    proxy = await _proxy_on(
        aiohttp_client, upstream, tmp_path, pg_database.url(schema, port=gate.port)
    )
    async with sdk(proxy) as client:
        kept = await client.chat.completions.create(
            model="gpt-test", messages=ask("before"), store=True
        )
        await gate.shut()
        # The first write after the database went away fails: logged with its id and counted
        # (as on SQLite), and from then on the store is known broken.
        with contextlib.suppress(openai.APIStatusError):
            await client.chat.completions.create(model="gpt-test", messages=ask("lost"), store=True)
        calls = len(upstream.received)
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="gpt-test", messages=ask("no"), store=True)
        assert caught.value.status_code == 503
        assert len(upstream.received) == calls  # refused before any upstream call
        health = await proxy.get("/healthz")
        body = await health.json()
        assert health.status == 503 and "PostgreSQL" in body["store"]["reason"]
        assert body["store"]["failed"] == 1
        with pytest.raises(openai.InternalServerError) as caught:  # reads: 503, not a hang
            await client.chat.completions.retrieve(kept.id)
        assert caught.value.status_code == 503
        # Without store the proxy still forwards.
        await client.chat.completions.create(model="gpt-test", messages=ask("no store"))

        await gate.open()

        async def healthy() -> bool:
            return (await proxy.get("/healthz")).status == 200

        await until(healthy, 15, "/healthz after the database came back")
        again = await client.chat.completions.create(
            model="gpt-test", messages=ask("after"), store=True
        )
        assert [c.id async for c in client.chat.completions.list()] == [kept.id, again.id]


async def test_a_locked_table_never_hangs_a_client(
    aiohttp_client: Any, upstream: FakeUpstream, tmp_path: Path, pg_url: str
) -> None:
    proxy = await _proxy_on(aiohttp_client, upstream, tmp_path, pg_url, statement_timeout=0.5)
    async with sdk(proxy) as client:
        kept = await client.chat.completions.create(model="gpt-test", messages=ask("a"), store=True)
        locker = await asyncpg.connect(pg_url)
        try:
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE completions IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.retrieve(kept.id)
            with contextlib.suppress(openai.APIStatusError):  # not stored: logged, counted
                await client.chat.completions.create(
                    model="gpt-test", messages=ask("b"), store=True
                )
            assert time.monotonic() - started < 5  # a few statement timeouts, not a hang
            assert (await (await proxy.get("/healthz")).json())["store"]["failed"] == 1
            await transaction.rollback()
        finally:
            await locker.close()

        async def healthy() -> bool:
            return (await proxy.get("/healthz")).status == 200

        await until(healthy, 15, "/healthz after the lock was released")
        assert (await client.chat.completions.retrieve(kept.id)).id == kept.id


# -- real processes: kill -9, and several instances on one database ----------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    made: list[ProxyProcess] = []

    def make(url: str, upstream_url: str, *extra: str) -> ProxyProcess:
        process = ProxyProcess(
            db=url,  # type: ignore[arg-type]
            upstream_url=upstream_url,
            log_path=tmp_path / f"proxy{len(made)}.log",
            extra_args=extra,
        )
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()


async def _exchange(
    session: aiohttp.ClientSession, base_url: str, token: str, index: int, acked: list[str]
) -> None:
    """One store:true request (odd ones streamed); its id goes to ``acked`` only once the
    client has the whole answer (a plain body to its end, a stream through [DONE])."""
    stream = index % 2 == 1
    body = {"model": "gpt-test", "messages": ask(f"ledger {index}"), "store": True}
    with contextlib.suppress(aiohttp.ClientError, ConnectionError, ValueError, TimeoutError):
        async with session.post(
            base_url + "/chat/completions",
            json={**body, "stream": stream},
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            if response.status != 200:
                return
            if not stream:
                acked.append(orjson.loads(await response.read())["id"])
                return
            first = None
            async for line in response.content:
                if line.startswith(b"data: [DONE]") and first is not None:
                    acked.append(first)
                elif line.startswith(b"data: ") and first is None:
                    first = orjson.loads(line[6:])["id"]


async def _stored_ids(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [row[0] for row in await conn.fetch("SELECT id FROM completions")]
    finally:
        await conn.close()


async def _load_then_kill(
    proxy: ProxyProcess, acked: list[str], counter: Iterator[int], goal: int
) -> None:
    """20 clients send store:true requests until ``goal`` were acknowledged, then kill -9
    the proxy while requests are in flight."""
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while not stop.is_set():
                await _exchange(session, proxy.base_url, "sk-ledger", next(counter), acked)

        workers = [asyncio.create_task(worker()) for _ in range(20)]

        async def reached() -> bool:
            return len(acked) >= goal

        await until(reached, 60, "acknowledged completions")
        proxy.kill()
        await proxy.wait_exit(10)
        stop.set()
        await asyncio.gather(*workers)


async def test_kill_9_mid_load_loses_no_acknowledged_completion(
    upstream: FakeUpstream, pg_url: str, processes: Callable[..., ProxyProcess]
) -> None:
    proxy = processes(pg_url, upstream.url)  # type: ignore[attr-defined]
    acked: list[str] = []
    counter = itertools.count()
    for _ in range(2):
        proxy.start()
        restart = await proxy.wait_healthy()
        assert restart < 5, proxy.log_tail()
        await _load_then_kill(proxy, acked, counter, len(acked) + 150)
    stored = await _stored_ids(pg_url)
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged completions lost, e.g. {sorted(missing)[:3]}"
    assert len(stored) == len(set(stored))


async def test_several_instances_share_one_database(
    upstream: FakeUpstream,
    pg_url: str,
    processes: Callable[..., ProxyProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-instances")
    config = tmp_path / "team.yaml"
    config.write_text("auth: {mode: keys, key_cache_seconds: 1}\n")
    keys = {}
    for name in ("alice", "bob"):
        result = await asyncio.to_thread(run_cli, "keys", "create", name, "--db", pg_url)
        assert result.returncode == 0, result.stderr
        keys[name] = result.stdout.strip()
    a = processes(pg_url, upstream.url, "--config", str(config))  # type: ignore[attr-defined]
    b = processes(pg_url, upstream.url, "--config", str(config))  # type: ignore[attr-defined]
    for process in (a, b):
        process.start()
    await asyncio.gather(a.wait_healthy(), b.wait_healthy())

    alice_a = openai.AsyncOpenAI(base_url=a.base_url, api_key=keys["alice"], max_retries=0)
    alice_b = openai.AsyncOpenAI(base_url=b.base_url, api_key=keys["alice"], max_retries=0)
    async with alice_a, alice_b:
        made = []
        for n in range(3):  # read-your-writes: B shows what A stored as soon as A answered
            plain = await alice_a.chat.completions.create(
                model="gpt-test", messages=ask(f"a{n}"), store=True, metadata={"n": str(n)}
            )
            made.append(plain.id)
            assert (await alice_b.chat.completions.retrieve(plain.id)).id == plain.id
            stream = await alice_a.chat.completions.create(
                model="gpt-test", messages=ask(f"s{n}"), store=True, stream=True
            )
            made.append({chunk.id async for chunk in stream}.pop())
            listed = [c.id async for c in alice_b.chat.completions.list(limit=2)]
            assert listed == made
        # Writes through both instances interleave in one order, seen the same through each.
        other = await alice_b.chat.completions.create(
            model="gpt-test", messages=ask("b"), store=True
        )
        made.append(other.id)
        assert [c.id async for c in alice_a.chat.completions.list()] == made
        assert [c.id async for c in alice_b.chat.completions.list(order="desc")] == made[::-1]

    # A key revoked (here by the command line, on the shared database) stops working on every
    # instance within the key cache window (1 s).
    bob_clients = [
        openai.AsyncOpenAI(base_url=p.base_url, api_key=keys["bob"], max_retries=0) for p in (a, b)
    ]
    for client in bob_clients:
        await client.models.list()
    result = await asyncio.to_thread(run_cli, "keys", "revoke", "bob", "--db", pg_url)
    assert result.returncode == 0, result.stderr
    revoked_at = time.monotonic()
    for client in bob_clients:

        async def refused(client: openai.AsyncOpenAI = client) -> bool:
            try:
                await client.models.list()
            except openai.AuthenticationError:
                return True
            return False

        await until(refused, 5, "the revoked key refused")
        await client.close()
    assert time.monotonic() - revoked_at < 1 + 1.0  # the window plus a poll's slack


# -- retention -------------------------------------------------------------------------------


def _record(n: int, created: int, text: str = "x") -> CompletionRecord:
    return CompletionRecord(
        id=f"c{n}", caller="a", created=created, model="m", metadata={"n": str(n)},
        completion=orjson.dumps({"id": f"c{n}", "text": text}), request=b"{}",
        request_id=None, stream=False, outcome="complete",
    )  # fmt: skip


async def test_retention_runs_on_one_instance_at_a_time(pg_url: str) -> None:
    settings = StoreConfig(url=pg_url)
    stores = await asyncio.gather(*(open_store(pg_url, settings) for _ in range(2)))
    try:
        await stores[0].write_batch([_record(n, 100 + n) for n in range(50)])
        holder = await asyncpg.connect(pg_url)
        try:  # another instance is pruning: hold its lock
            await holder.execute(
                "SELECT pg_advisory_lock($1, hashtext(current_schema()))",
                LOCK_SPACE + RETENTION_LOCK,
            )
            skipped = await stores[0].prune(200)
            assert (skipped.completions, skipped.exchanges) == (0, 0)
            assert await stores[0].get("a", "c0") is not None
        finally:
            await holder.close()
        reports = await asyncio.gather(*(store.prune(200) for store in stores))
        assert sorted(r.completions for r in reports) in ([0, 50], [50, 0])
        audit = [e for e in await stores[0].audit_entries(0, 100) if e.action == "prune"]
        assert len(audit) == 1
    finally:
        for store in stores:
            await store.close()


async def test_pruned_content_is_gone_from_the_database_files(pg_url: str) -> None:
    """A canary in a completion older than the cutoff, with nine in ten rows deleted: after the
    retention run it is in no file of the database's directory (tables, TOAST, indexes)."""
    # lz4 keeps a run of bytes whole unless it repeats one before it: no four bytes of the
    # canary repeat, within it or with the JSON before it (whose `":"c` a "c" would continue).
    canary = "kanary-0123456789bdefghijlmopqsuvwxyz"
    store = await open_store(pg_url, StoreConfig(url=pg_url))
    conn = await asyncpg.connect(pg_url)
    try:
        # Rows of 3 KB of random text (inline, or out of line in TOAST), as written by the bench.
        old = [_record(n, 100, os.urandom(1500 if n % 2 else 900).hex()) for n in range(900)]
        old[17] = _record(17, 100, canary + os.urandom(3000).hex())
        await store.write_batch(old)
        await store.write_batch([_record(n, 10_000) for n in range(900, 1000)])
        await conn.execute("CHECKPOINT")  # the canary is in the files now, not only in memory
        directory = Path(
            await conn.fetchval("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
        ) / "base" / str(await conn.fetchval(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        ))  # fmt: skip
        if not directory.is_dir():
            pytest.skip(f"the database's files are not readable here ({directory})")

        def files_with_canary() -> list[str]:
            found = [p for p in directory.iterdir() if p.is_file()]
            return [p.name for p in found if canary.encode() in p.read_bytes()]

        assert await asyncio.to_thread(files_with_canary)  # the test can see it
        report = await store.prune(1000)
        assert report.completions == 900
        await conn.execute("CHECKPOINT")
        assert await asyncio.to_thread(files_with_canary) == []
        assert report.bytes_after is not None and report.bytes_before is not None
        assert report.bytes_after < report.bytes_before * 0.3
    finally:
        await conn.close()
        await store.close()


def test_a_password_in_the_store_url_is_never_printed(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("store: {url: 'postgresql://proxy:hunter2@127.0.0.1:1/none'}\n")
    shown = run_cli("check-config", str(config))
    assert shown.returncode == 0 and "proxy:***@127.0.0.1:1/none" in shown.stdout
    failed = run_cli("serve", "--config", str(config), "--port", "0")
    assert failed.returncode == 1 and "proxy:***@" in failed.stdout + failed.stderr
    assert "hunter2" not in shown.stdout + shown.stderr + failed.stdout + failed.stderr


async def test_a_database_from_the_first_schema_is_brought_forward(pg_url: str) -> None:
    """A database with only the first step (rows in it) gets the later steps at the next
    open, its rows backfilled: search finds a completion stored before search existed."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "CREATE TABLE _migrations (name text PRIMARY KEY, applied_at double precision)"
        )
        for statement in MIGRATIONS[0].statements:
            await conn.execute(statement)
        await conn.execute("INSERT INTO _migrations VALUES ($1, 0)", MIGRATIONS[0].name)
        await conn.execute(
            "INSERT INTO completions (id, caller, created, model, metadata, completion, request,"
            " stream, outcome, stored_at) VALUES ('c-old', 'a', 1, 'm', '\\x7b7d', $1, $2,"
            " false, 'complete', 0)",
            b'{"choices": [{"message": {"content": "an old answer"}}]}',
            b'{"messages": [{"role": "user", "content": "a question"}]}',
        )
    finally:
        await conn.close()
    store = await open_store(pg_url, StoreConfig(url=pg_url))
    try:
        page = await store.list_completions("a", ListQuery(search="old answer"))
        assert [item.id for item in page.items] == ["c-old"]
        entry = await store.log_entry("a", "c-old")
        assert entry is not None and entry.preview == "a question"
    finally:
        await store.close()


async def test_a_search_document_reads_back_as_its_words_and_positions(pg_url: str) -> None:
    """The binary tsvector the store sends is what PostgreSQL reads: words folded, each once
    with its positions, at most 256 positions a word, positions past the last one kept at
    it, words too long for a lexeme left out."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.set_type_codec("tsvector", **search.TSVECTOR_CODEC)

        async def read(text: str) -> str:
            return await conn.fetchval("SELECT $1::tsvector::text", search.vector(text))

        assert await read("Café, café: don't X_y") == "'cafe':1,2 'don':3 't':4 'x':5 'y':6"
        assert await read("Zebra apple") == "'apple':2 'zebra':1"  # sorted by the server
        assert await read("") == ""
        many = await read("w " * 300)
        assert many == "'w':" + ",".join(map(str, range(1, 257)))
        late = await read("a " * search.MAX_POSITION + "b c a")
        assert late.endswith("'b':16383 'c':16383")
        assert await read("x" * 3000 + " kept") == "'kept':2"
    finally:
        await conn.close()


async def test_an_import_rejected_or_failing_after_several_chunks_leaves_nothing(
    pg_url: str,
) -> None:
    """Chunks are inserted while the next one is read; a file found bad after several of
    them, or an insert that fails, leaves none of the import's rows, and a completion another
    instance stored meanwhile stays. The batches are read to the end (every bad line gets
    reported), by one thread at a time."""
    store = await open_store(pg_url, StoreConfig(url=pg_url))
    other = await open_store(pg_url, StoreConfig(url=pg_url))
    try:
        read: list[int] = []

        def batches() -> Iterator[list[CompletionRecord]]:
            for k in range(8):
                read.append(k)
                yield [_record(n, 100) for n in range(k * 4, k * 4 + 4)]

        async def rejected() -> int:
            return await store.import_records(batches(), accept=lambda: len(read) < 6, chunk_rows=4)

        inserted, _ = await asyncio.gather(rejected(), other.write_batch([_record(1000, 100)]))
        assert inserted == 0 and len(read) == 8
        assert [c.id for c in (await store.list_completions("a", ListQuery())).items] == ["c1000"]

        def failing() -> Iterator[list[CompletionRecord]]:
            yield [_record(n, 100) for n in range(8)]
            yield [_record(n, 100) for n in range(8, 12)]
            yield [replace(_record(12, 100), model=None)]  # type: ignore[arg-type]

        with pytest.raises(StoreError):
            await store.import_records(failing(), accept=lambda: True, chunk_rows=4)
        assert len((await store.list_completions("a", ListQuery())).items) == 1
        assert await store.import_records(batches(), accept=lambda: True, chunk_rows=5) == 32
    finally:
        await store.close()
        await other.close()


async def test_several_pairs_are_read_from_the_rarest_and_checked_by_signature(
    pg_url: str,
) -> None:
    """Whatever order the pairs come in and whichever way the list goes, the answer is the
    same; a metadata update moves a completion's signature with its pairs; metadata rows
    stored before signatures existed get theirs when the store opens."""
    conn = await asyncpg.connect(pg_url)
    try:  # a store as p004 left it, with one completion and its metadata rows
        await conn.execute(
            "CREATE TABLE _migrations (name text PRIMARY KEY, applied_at double precision)"
        )
        for step in MIGRATIONS:
            if step.name < "p009":
                for statement in step.statements:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO _migrations VALUES ($1, 0)", step.name)
        seq = await conn.fetchval(
            "INSERT INTO completions (id, caller, created, model, metadata, completion, request,"
            " stream, outcome, stored_at) VALUES ('c-old', 'a', 1, 'm', $1, '\\x7b7d',"
            " '\\x7b7d', false, 'complete', 0) RETURNING seq",
            b'{"env":"prod","user":"u1"}',
        )
        await conn.execute(
            "INSERT INTO completion_metadata (seq, key, value, caller, created)"
            " VALUES ($1, 'env', 'prod', 'a', 1), ($1, 'user', 'u1', 'a', 1)",
            seq,
        )
    finally:
        await conn.close()
    store = await open_store(pg_url, StoreConfig(url=pg_url))
    try:
        common, rare, other = ("env", "prod"), ("user", "u1"), ("user", "u2")
        records = [
            replace(
                _record(n, 100 + n),
                metadata={"env": "prod", "user": "u1" if n in (3, 7) else f"x{n}"},
            )
            for n in range(1, 41)
        ] + [
            replace(_record(n, 100 + n), metadata={"env": "dev", "user": "u2"})
            for n in range(41, 61)
        ]
        await store.write_batch(records)
        for pairs in ((common, rare), (rare, common)):
            for order in ("asc", "desc"):
                page = await store.list_completions(
                    "a", ListQuery(metadata=pairs, page=PageQuery(order=order))
                )
                expected = ["c-old", "c3", "c7"]
                assert [item.id for item in page.items] == (
                    expected if order == "asc" else expected[::-1]
                )
        for pairs in ((common, other), (other, common)):  # many rows each, never the same one
            page = await store.list_completions("a", ListQuery(metadata=pairs))
            assert page.items == [] and not page.has_more
        await store.update_metadata("a", "c41", {"env": "prod", "user": "u1"}, "test")
        page = await store.list_completions("a", ListQuery(metadata=(rare, common)))
        assert [item.id for item in page.items] == ["c-old", "c3", "c7", "c41"]
        found = await store.list_completions("a", ListQuery(metadata=(other, ("env", "dev"))))
        assert "c41" not in [item.id for item in found.items]
    finally:
        await store.close()


async def test_an_import_in_several_chunks_is_searched_and_counted(pg_url: str) -> None:
    """Every row of an import of several statements is found by search and counted by the
    usage rollup (whole days) as by the completions (other bounds); importing it again adds
    nothing to either."""
    store = await open_store(pg_url, StoreConfig(url=pg_url))
    try:
        answer = b'{"choices": [{"message": {"content": "an imported answer"}}]}'
        records = [replace(_record(n, 86400 + n), completion=answer) for n in range(23)]

        def batches() -> Iterator[list[CompletionRecord]]:
            return (records[k : k + 5] for k in range(0, 23, 5))

        async def state() -> tuple[list[str], list[int]]:
            page = await store.list_completions(
                "a", ListQuery(search="imported answer", page=PageQuery(limit=100))
            )
            days = await store.usage(86400, 2 * 86400, ["caller"])
            rows = await store.usage(86400, 86400 + 23, ["caller"])
            return sorted(c.id for c in page.items), [r.completions for r in days + rows]

        assert await store.import_records(batches(), accept=lambda: True, chunk_rows=7) == 23
        expected = (sorted(r.id for r in records), [23, 23])
        assert await state() == expected
        assert await store.import_records(batches(), accept=lambda: True, chunk_rows=7) == 0
        assert await state() == expected
    finally:
        await store.close()


async def test_a_large_import_vacuums_the_pairs_and_analyses_the_completions(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import of many rows ends with the pairs' table vacuumed (lists read its index
    alone) and both tables analysed; a small one leaves that to autovacuum."""
    monkeypatch.setattr(pg_store, "VACUUM_AFTER_IMPORT", 50)
    store = await open_store(pg_url, StoreConfig(url=pg_url))
    conn = await asyncpg.connect(pg_url)

    async def maintained() -> list[tuple[str, bool, bool]]:
        rows = await conn.fetch(
            "SELECT relname, last_vacuum IS NOT NULL, last_analyze IS NOT NULL"
            " FROM pg_stat_user_tables WHERE schemaname = current_schema()"
            " AND relname IN ('completions', 'completion_metadata') ORDER BY relname"
        )
        return [tuple(row) for row in rows]

    try:
        await store.import_records([[_record(n, 100) for n in range(10)]], accept=lambda: True)
        assert await maintained() == [
            ("completion_metadata", False, False),
            ("completions", False, False),
        ]
        batches = [[_record(n, 100) for n in range(k, k + 25)] for k in range(10, 110, 25)]
        assert await store.import_records(batches, accept=lambda: True) == 100
        assert await maintained() == [
            ("completion_metadata", True, True),
            ("completions", False, True),
        ]
    finally:
        await conn.close()
        await store.close()


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_a_value_postgresql_refuses_fails_only_its_own_record(
    proxy: TestClient[web.Request, web.Application],
) -> None:
    """A value PostgreSQL cannot hold (here a NUL in the model asked for) is that record's
    fault: it is not stored, and the store stays writable for everyone else."""
    async with sdk(proxy, "sk-pg-refused") as client:
        await client.chat.completions.create(model="gpt\x00", messages=ask("nul"), store=True)
        kept = await client.chat.completions.create(
            model="gpt-test", messages=ask("after"), store=True
        )
        assert (await client.chat.completions.retrieve(kept.id)).id == kept.id
    health = await (await proxy.get("/healthz")).json()
    assert health["status"] == "ok"
    assert health["store"]["writable"] is True
