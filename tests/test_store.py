"""The SQLite store: migrations from blank and from an old file, index-only plans, writes."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from proxy.models import ListQuery, PageQuery
from proxy.responses import stored_completion
from proxy.store import CompletionRecord, StoreError, UnknownCursor
from proxy.store.signature import pair_bits, signature
from proxy.store.sqlite import SQLiteStore, queries
from proxy.store.sqlite.migrations import MIGRATIONS, migrate
from proxy.store.sqlite.search import add_functions
from proxy.store.sqlite.store import CALLERS_PER_READ, PAGE_SIZE
from proxy.writer import LINGER_PASSES, Writer
from tests.helpers import commit_at


def record(n: int, caller: str = "caller_a", created: int = 1000, **changes) -> CompletionRecord:
    values = {
        "id": f"chatcmpl-{n}",
        "caller": caller,
        "created": created,
        "model": "gpt-test",
        "metadata": {"n": str(n), "parity": "odd" if n % 2 else "even"},
        "completion": orjson.dumps({"id": f"chatcmpl-{n}", "object": "chat.completion"}),
        "request": b'{"model":"gpt-test","messages":[]}',
        "request_id": f"req-{n}",
        "stream": False,
        "outcome": "complete",
    }
    values.update(changes)
    return CompletionRecord(**values)


def rows(records: Iterable[CompletionRecord]) -> list[CompletionRecord]:
    """An import's batch: the records as its workers hand them over."""
    now = time.time()
    return [replace(r, stored_at=now) for r in records]


async def body(store: SQLiteStore, caller: str | None, completion_id: str) -> bytes | None:
    """A stored completion as the API serves it."""
    found = await store.get(caller, completion_id)
    return None if found is None else stored_completion(found)


@pytest.fixture
async def store(tmp_path: Path):
    store = SQLiteStore(tmp_path / "store.db")
    await store.open()
    yield store
    await store.close()


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {
            row[0]
            for row in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")
        }


async def test_migrates_a_blank_file(tmp_path: Path) -> None:
    path = tmp_path / "blank.db"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as db:
        applied = [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY rowid")]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert applied == [m.name for m in MIGRATIONS]
    assert {"completions", "completion_metadata", "tombstones", "settings"} <= tables(path)


async def test_reopening_applies_nothing(tmp_path: Path) -> None:
    path = tmp_path / "again.db"
    for _ in range(2):
        store = SQLiteStore(path)
        await store.open()
        await store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(conn) == []
    finally:
        conn.close()


async def test_migrates_an_old_file_forward_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path, isolation_level=None) as db:  # a file made by the first release
        db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        for statement in MIGRATIONS[0].statements:
            db.execute(statement)
        db.execute("INSERT INTO _migrations VALUES (?, 0)", (MIGRATIONS[0].name,))
        db.execute(
            "INSERT INTO completions VALUES (1, 'chatcmpl-old', 'caller_a', 5, 'gpt-test',"
            " ?, ?, ?, NULL, 0, 'complete', 0, NULL)",
            (b"{}", orjson.dumps({"id": "chatcmpl-old"}), b"{}"),
        )
    store = SQLiteStore(path)
    await store.open()
    try:
        assert await body(store, "caller_a", "chatcmpl-old") == (
            b'{"id":"chatcmpl-old","metadata":{}}'
        )
        assert await store.delete("caller_a", "chatcmpl-old", "tester")  # uses the tombstones step
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY rowid")] == [
            m.name for m in MIGRATIONS
        ]


@pytest.mark.parametrize(
    "query",
    [
        ListQuery(),
        ListQuery(page=PageQuery(after="chatcmpl-1")),
        ListQuery(page=PageQuery(order="desc", after="chatcmpl-1")),
        ListQuery(model="gpt-test"),
        ListQuery(model="gpt-test", page=PageQuery(after="chatcmpl-1")),
        ListQuery(metadata=(("parity", "odd"),)),
        ListQuery(metadata=(("parity", "odd"),), page=PageQuery(after="chatcmpl-1", order="desc")),
        ListQuery(metadata=(("parity", "odd"), ("n", "3")), model="gpt-test"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("keys_only", [False, True], ids=["rows", "keys"])
async def test_list_plans_read_indexes_in_order(
    store: SQLiteStore, query: ListQuery, keys_only: bool
) -> None:
    plan = await store.explain_list("caller_a", query, keys_only=keys_only)
    text = " | ".join(plan)
    # An index, or the metadata table, which is keyed like one (caller first).
    read_from = ("USING INDEX", "USING COVERING INDEX", "USING PRIMARY KEY (caller=?")
    assert any(way in text for way in read_from), text
    assert "TEMP B-TREE" not in text, text  # no sort: rows come in list order from the index
    for line in plan:
        if line.startswith("SCAN"):
            raise AssertionError(f"full scan in plan: {text}")


CALLERS = ("caller_b", "caller_a", "caller_d", "caller_c")


def spread(n: int) -> CompletionRecord:
    """Rows of four callers and two models, whose ``created`` does not follow insertion."""
    return record(
        n,
        caller=CALLERS[n % 4],
        created=1000 + (n * 7) % 13,
        model=("gpt-test", "gpt-other")[n % 3 == 0],
    )


def listed(records: list[CompletionRecord], query: ListQuery) -> list[str]:
    """What a list should give, worked out in Python: filters, then (created, insertion)."""
    kept = [
        (r.created, n, r.id)
        for n, r in enumerate(records)
        if (query.model is None or r.model == query.model)
        and (query.owner is None or r.caller == query.owner)
        and all(r.metadata.get(k) == v for k, v in query.metadata)
    ]
    return [id_ for _, _, id_ in sorted(kept, reverse=query.page.order == "desc")]


async def every_page(store: SQLiteStore, query: ListQuery, limit: int) -> list[str]:
    seen: list[str] = []
    after = None
    while True:
        page = replace(query.page, limit=limit, after=after)
        result = await store.list_completions(None, replace(query, page=page))
        seen += [item.id for item in result.items]
        if not result.has_more:
            return seen
        after = seen[-1]


@pytest.mark.parametrize(
    "query",
    [
        ListQuery(),
        ListQuery(page=PageQuery(order="desc")),
        ListQuery(model="gpt-other"),
        ListQuery(metadata=(("parity", "odd"),), page=PageQuery(order="desc")),
        ListQuery(metadata=(("parity", "even"), ("n", "8")), model="gpt-test"),
        ListQuery(owner="caller_c", metadata=(("parity", "odd"),)),
    ],
    ids=repr,
)
async def test_an_admin_pages_through_every_caller_in_one_order(
    store: SQLiteStore, query: ListQuery
) -> None:
    records = [spread(n) for n in range(1, 61)]
    await store.write_batch(records)
    expected = listed(records, query)
    assert expected  # every case lists something
    for limit in (1, 7, 100):
        assert await every_page(store, query, limit) == expected


async def test_an_admin_lists_more_callers_than_one_read_takes(store: SQLiteStore) -> None:
    callers = 2 * CALLERS_PER_READ + 5
    records = [
        record(n, caller=f"caller_{n % callers:04d}", created=1000 + n % 17) for n in range(600)
    ]
    await store.write_batch(records)
    for query in (ListQuery(), ListQuery(metadata=(("parity", "odd"),))):
        assert await every_page(store, query, 50) == listed(records, query)


async def test_an_admin_pages_on_past_the_ids_deleted_behind_it(store: SQLiteStore) -> None:
    assert await every_page(store, ListQuery(), 5) == []  # no callers yet
    records = [spread(n) for n in range(1, 41)]
    await store.write_batch(records)
    seen: list[str] = []
    after = None
    while True:
        page = await store.list_completions(None, ListQuery(page=PageQuery(limit=6, after=after)))
        seen += [item.id for item in page.items]
        after = seen[-1]
        assert await store.delete(None, after, "admin")  # the cursor's own row is gone
        if not page.has_more:
            break
    assert seen == listed(records, ListQuery())


async def test_usage_over_a_time_range_counts_every_caller(store: SQLiteStore) -> None:
    records = [spread(n) for n in range(1, 61)]
    await store.write_batch(records)
    rows = await store.usage(1003, 1009, ["caller"])
    counted = {row.group["caller"]: row.completions for row in rows}
    for caller in CALLERS:
        assert counted[caller] == sum(
            1 for r in records if r.caller == caller and 1003 <= r.created < 1009
        )
    report = await store.prune(1005)
    assert report.completions == sum(1 for r in records if r.created < 1005)
    left = await every_page(store, ListQuery(), 9)
    assert left == listed([r for r in records if r.created >= 1005], ListQuery())


async def test_callers_are_found_by_seeks_not_a_scan(store: SQLiteStore) -> None:
    await store.write_batch([spread(n) for n in range(1, 21)])
    with sqlite3.connect(store.path) as db:
        found = [row[0] for row in db.execute(queries.CALLERS)]
        plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + queries.CALLERS)]
    assert found == sorted(CALLERS)
    assert not [line for line in plan if line.startswith("SCAN completions")], plan
    assert any("COVERING INDEX completions_caller_order (caller>?)" in line for line in plan)


async def test_pages_are_a_stable_total_order(store: SQLiteStore) -> None:
    # Equal `created` values are ordered by insertion; pages never skip or repeat.
    await store.write_batch([record(n, created=1000 + n // 4) for n in range(1, 21)])
    seen: list[str] = []
    after = None
    while True:
        page = await store.list_completions(
            "caller_a", ListQuery(page=PageQuery(after=after, limit=3))
        )
        seen += [item.id for item in page.items]
        if not page.has_more:
            break
        after = page.items[-1].id
    assert seen == [f"chatcmpl-{n}" for n in range(1, 21)]


async def test_unknown_cursor(store: SQLiteStore) -> None:
    await store.write_batch([record(1)])
    with pytest.raises(UnknownCursor):
        await store.list_completions("caller_a", ListQuery(page=PageQuery(after="chatcmpl-404")))
    with pytest.raises(UnknownCursor):  # another caller's id is unknown too
        await store.list_completions("caller_b", ListQuery(page=PageQuery(after="chatcmpl-1")))


async def test_duplicate_ids_keep_the_first_and_get_no_extra_metadata(store: SQLiteStore) -> None:
    assert await store.write_batch([record(1)]) == 1
    assert await store.write_batch([record(1, metadata={"x": "y"}), record(2)]) == 1
    assert orjson.loads(await body(store, "caller_a", "chatcmpl-1") or b"")["metadata"] == {
        "n": "1",
        "parity": "odd",
    }
    page = await store.list_completions("caller_a", ListQuery(metadata=(("x", "y"),)))
    assert page.items == []
    # The same id under another caller is a different completion.
    assert await store.write_batch([record(1, caller="caller_b")]) == 1


async def test_settings_persist(tmp_path: Path) -> None:
    path = tmp_path / "settings.db"
    store = SQLiteStore(path)
    await store.open()
    first = await store.setting("caller_secret", b"first")
    await store.close()
    store = SQLiteStore(path)
    await store.open()
    assert await store.setting("caller_secret", b"second") == first == b"first"
    await store.close()


async def test_one_writer_groups_concurrent_commits(tmp_path: Path) -> None:
    """R4's mechanism: many completions committed at once share transactions (WAL, one writer)."""
    store = SQLiteStore(tmp_path / "group.db")
    await store.open()
    writer = Writer(store, batch_size=256)
    writer.start()
    try:
        await asyncio.gather(*(writer.commit(record(n)) for n in range(1, 1001)))
    finally:
        await writer.close()
        await store.close()
    assert writer.stats.committed == 1000
    assert writer.stats.batches <= 1000 // 10, writer.stats.batches  # grouped, not one by one
    with sqlite3.connect(tmp_path / "group.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM completions").fetchone()[0] == 1000


async def test_a_batch_under_load_takes_what_the_next_loop_passes_queue(store: SQLiteStore) -> None:
    """Two records waiting at once mean more are close behind: the batch takes the records
    queued in the loop's next passes too, so five records queued over three turns share one
    commit (without the wait, the first two would commit alone)."""
    writer = Writer(store)
    await commit_at(writer, (0, 0, 1, 1, 2), [record(n) for n in range(5)])
    assert (writer.stats.committed, writer.stats.batches) == (5, 1)


async def test_a_batch_waits_a_bounded_number_of_loop_passes(store: SQLiteStore) -> None:
    """Records that keep arriving, one more every pass of the loop, do not hold a batch
    open: it is written after ``LINGER_PASSES`` passes and the rest go in the next."""
    writer = Writer(store)
    passes = [0, 0, *range(1, 3 * LINGER_PASSES)]
    await commit_at(writer, passes, [record(n) for n in range(len(passes))])
    assert writer.stats.committed == len(passes)
    assert writer.stats.batches >= 2


async def test_a_lone_record_commits_without_waiting_for_more(store: SQLiteStore) -> None:
    """One record waiting alone is written at once: a record queued a pass later goes in a
    commit of its own."""
    writer = Writer(store)
    await commit_at(writer, (0, 1), [record(n) for n in range(2)])
    assert (writer.stats.committed, writer.stats.batches) == (2, 2)


async def test_a_commit_whose_waiter_is_cancelled_is_still_committed(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """A client that goes away while its completion waits in the writer's queue cancels its
    wait, never the commit; the records queued with it are committed and their waiters told."""
    writer = Writer(store)
    waiters = [asyncio.create_task(writer.commit(record(n))) for n in range(1, 4)]
    await asyncio.sleep(0)  # one turn of the loop: all three are queued, the writer not started
    waiters[1].cancel()
    writer.start()
    try:
        await asyncio.gather(waiters[0], waiters[2])
        with pytest.raises(asyncio.CancelledError):
            await waiters[1]
    finally:
        await writer.close()
    assert writer.stats.committed == 3 and writer.stats.failed == 0
    assert rows_of(tmp_path / "store.db")[0] == ["chatcmpl-1", "chatcmpl-2", "chatcmpl-3"]


def pairs_in(path: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The metadata rows, and the rows the completions' metadata columns say there should be."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        stored = db.execute(
            "SELECT caller, key, value, created, seq FROM completion_metadata ORDER BY seq, key"
        ).fetchall()
        expected = [
            (caller, key, value, created, seq)
            for caller, created, seq, metadata in db.execute(
                "SELECT caller, created, seq, metadata FROM completions ORDER BY seq"
            )
            for key, value in sorted(orjson.loads(metadata).items())
        ]
    return stored, expected


async def test_metadata_rows_follow_their_completion(store: SQLiteStore, tmp_path: Path) -> None:
    """Update, delete and prune find a completion's metadata rows by its metadata column
    (the table is keyed for lookups, not by seq): none is left behind, none of another
    completion goes, whatever the keys and values hold."""
    odd = {"q": 'a "quoted" \\ value', "ключ": "✓ ünïcode", "empty": "", "n": "1"}
    await store.write_batch(
        [
            record(1, metadata=odd),
            record(2, metadata=odd),
            record(3, caller="caller_b", metadata=odd),
            record(4, created=5000, metadata=odd),
            record(5, created=5000),
        ]
    )
    assert (await store.update_metadata("caller_a", "chatcmpl-2", {"n": "2\n"}, "t")) is not None
    assert await store.delete("caller_a", "chatcmpl-1", "t")
    await store.prune(2000)  # chatcmpl-2 and chatcmpl-3, of both callers
    stored, expected = pairs_in(tmp_path / "store.db")
    assert stored == expected
    assert sorted({row[4] for row in stored}) == [4, 5]
    for pairs in [(("q", odd["q"]),), (("ключ", odd["ключ"]), ("empty", ""))]:
        page = await store.list_completions("caller_a", ListQuery(metadata=pairs))
        assert [item.id for item in page.items] == ["chatcmpl-4"]


# -- import: chunked transactions, taken back whole ------------------------------------------


def rows_of(path: Path) -> tuple[list[str], int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM completions ORDER BY seq")]
        pairs = db.execute("SELECT count(*) FROM completion_metadata").fetchone()[0]
    return ids, pairs


async def test_import_commits_in_chunks_and_skips_duplicates(
    store: SQLiteStore, tmp_path: Path
) -> None:
    await store.write_batch([record(3), record(5)])
    batches = [rows(record(n) for n in range(k, k + 4)) for k in range(1, 21, 4)]  # 1..20
    assert await store.import_records(batches, accept=lambda: True, chunk_rows=6) == 18
    ids, pairs = rows_of(tmp_path / "store.db")
    assert sorted(ids) == sorted(f"chatcmpl-{n}" for n in range(1, 21))
    assert len(ids) == len(set(ids)) == 20
    assert pairs == 2 * 20  # duplicates got no second metadata rows
    page = await store.list_completions("caller_a", ListQuery(metadata=(("n", "20"),)))
    assert [item.id for item in page.items] == ["chatcmpl-20"]


@pytest.fixture(params=["alone", "shared"])
def journal(request: pytest.FixtureRequest, store: SQLiteStore, tmp_path: Path):
    """The journal an import writes through: with the file to itself, a rollback journal
    ("delete"); with another connection on it, the WAL."""
    if request.param == "alone":
        yield "delete"
        return
    with contextlib.closing(sqlite3.connect(tmp_path / "store.db")) as other:
        other.execute("SELECT count(*) FROM completions").fetchone()
        yield "wal"


def journal_of(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        mode: str = db.execute("PRAGMA journal_mode").fetchone()[0]
    return mode


async def test_an_import_alone_writes_the_file_directly_then_returns_to_wal(
    store: SQLiteStore, tmp_path: Path
) -> None:
    path = tmp_path / "store.db"
    await store.write_batch([record(1)])
    seen: list[tuple[bool, str]] = []

    def batches():
        for k in range(2, 30, 4):
            # No WAL: pages go straight into the database, under a rollback journal.
            seen.append((Path(f"{path}-wal").exists(), journal_of(path)))
            yield rows(record(n) for n in range(k, k + 4))

    assert await store.import_records(batches(), accept=lambda: True, chunk_rows=8) == 28
    assert set(seen) == {(False, "delete")}
    assert journal_of(path) == "wal"
    # The store reads and writes as before: its reader and checkpointer are back.
    assert await store.get("caller_a", "chatcmpl-29") is not None
    assert await store.write_batch([record(99)]) == 1
    assert len(rows_of(path)[0]) == 30


async def test_an_import_beside_another_connection_goes_through_the_wal(
    store: SQLiteStore, tmp_path: Path
) -> None:
    path = tmp_path / "store.db"
    with contextlib.closing(sqlite3.connect(path)) as other:  # say, a proxy serving this file
        other.execute("SELECT count(*) FROM completions").fetchone()
        seen: list[str] = []

        def batches():
            for k in range(0, 20, 4):
                seen.append(journal_of(path))
                yield rows(record(n) for n in range(k, k + 4))

        assert await store.import_records(batches(), accept=lambda: True, chunk_rows=8) == 20
        assert set(seen) == {"wal"}
        assert other.execute("SELECT count(*) FROM completions").fetchone()[0] == 20
    assert journal_of(path) == "wal"
    assert await store.get("caller_a", "chatcmpl-19") is not None


async def test_a_rejected_import_takes_back_every_committed_chunk(
    store: SQLiteStore, tmp_path: Path, journal: str
) -> None:
    await store.write_batch([record(3), record(100)])
    before = rows_of(tmp_path / "store.db")
    read: list[int] = []
    bad_after = 4  # batches; chunks of 6 rows mean two chunks are committed by then

    def batches():
        for k in range(10):
            read.append(k)
            assert journal_of(tmp_path / "store.db") == journal
            yield rows(record(n) for n in range(k * 4 + 1, k * 4 + 5))

    inserted = await store.import_records(
        batches(), accept=lambda: len(read) <= bad_after, chunk_rows=6
    )
    assert inserted == 0
    assert rows_of(tmp_path / "store.db") == before  # what was there before stays, nothing else
    assert len(read) == 10  # read to the end, so every bad line can be reported
    # The store still works normally afterwards, and nothing was audited or tombstoned.
    assert await store.import_records([rows([record(7)])], accept=lambda: True) == 1
    with sqlite3.connect(tmp_path / "store.db") as db:
        assert db.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 0


async def test_an_import_that_fails_to_write_takes_back_what_it_wrote(
    store: SQLiteStore, tmp_path: Path, journal: str
) -> None:
    before = rows_of(tmp_path / "store.db")

    def batches():
        assert journal_of(tmp_path / "store.db") == journal
        yield rows(record(n) for n in range(1, 9))
        yield [record(9, completion=object())]  # cannot be bound: it fails

    with pytest.raises(StoreError):
        await store.import_records(batches(), accept=lambda: True, chunk_rows=4)
    assert rows_of(tmp_path / "store.db") == before
    assert journal_of(tmp_path / "store.db") == "wal"


async def test_a_long_import_keeps_the_wal_to_about_two_chunks(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Through the WAL (another connection is on the file), every other chunk is copied
    beside the next one's inserts, then the writer copies the rest: the WAL starts over every
    two chunks, however long the import."""
    big = orjson.dumps({"text": "x" * 3000})
    batches = [rows(record(n, completion=big) for n in range(k, k + 10)) for k in range(0, 600, 10)]
    db, wal = tmp_path / "store.db", tmp_path / "store.db-wal"
    with contextlib.closing(sqlite3.connect(db)) as other:
        other.execute("SELECT count(*) FROM completions").fetchone()
        assert await store.import_records(batches, accept=lambda: True, chunk_rows=20) == 600
        assert wal.stat().st_size < db.stat().st_size / 4  # never restarted: the whole import
    ids, pairs = rows_of(db)
    assert len(ids) == 600
    assert pairs == 2 * 600


async def test_steady_writes_do_not_grow_the_wal_without_end(tmp_path: Path) -> None:
    """Writes back to back never leave the checkpointer a moment when the whole WAL is copied;
    it then copies the rest holding the write lock, so the next transaction restarts the WAL,
    which stays bounded however much is written."""
    path = tmp_path / "steady.db"
    store = SQLiteStore(path, checkpoint_interval=0.02, wal_restart_frames=64)
    await store.open()
    wal = Path(str(path) + "-wal")
    written = 0
    try:
        big = orjson.dumps({"text": "x" * 4000})
        n = 0
        while written < 48 * 1024 * 1024:
            batch = [record(n + k, completion=big) for k in range(20)]
            n += len(batch)
            await store.write_batch(batch)
            written += sum(len(r.completion) for r in batch)
        assert wal.stat().st_size < written / 2  # without the restart: about 3 x written
    finally:
        await store.close()


async def test_a_new_database_gets_small_pages_and_an_existing_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    """New files are made with PAGE_SIZE pages (less to write per commit); a file made
    elsewhere with other pages keeps them, through opens, writes and a VACUUM by pruning."""
    fresh, old = tmp_path / "fresh.db", tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(old)) as conn:
        conn.execute("PRAGMA page_size = 4096")
        conn.execute("CREATE TABLE kept (a)")
    for path in (fresh, old):
        store = SQLiteStore(path)
        await store.open()
        try:
            await store.write_batch([record(n, created=100) for n in range(50)])
            assert (await store.prune(before=200)).completions == 50  # all: VACUUM runs
        finally:
            await store.close()
    sizes = {}
    for path in (fresh, old):
        with contextlib.closing(sqlite3.connect(path)) as conn:
            sizes[path.name] = conn.execute("PRAGMA page_size").fetchone()[0]
    assert PAGE_SIZE != 4096
    assert sizes == {"fresh.db": PAGE_SIZE, "old.db": 4096}


async def test_a_write_whose_waiter_is_cancelled_still_commits_whole(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """The writer's thread runs a transaction to its end even if nobody waits any more."""
    task = asyncio.create_task(store.write_batch([record(1), record(2)]))
    await asyncio.sleep(0)  # one turn of the loop: the transaction is handed to the thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.write_batch([record(3)])  # runs after it on the same thread
    ids, pairs = rows_of(tmp_path / "store.db")
    assert ids == ["chatcmpl-1", "chatcmpl-2", "chatcmpl-3"]
    assert pairs == 6


# -- seq: never given twice ------------------------------------------------------------------


async def test_a_completion_stored_after_the_newest_was_deleted_is_listed_after_it(
    store: SQLiteStore,
) -> None:
    """Paging after a deleted id goes on past completions stored since (same ``created``)."""
    await store.write_batch([record(1), record(2)])
    assert await store.delete("caller_a", "chatcmpl-2", "tester")
    await store.write_batch([record(3)])
    after = await store.list_completions("caller_a", ListQuery(page=PageQuery(after="chatcmpl-2")))
    assert [item.id for item in after.items] == ["chatcmpl-3"]
    before = await store.list_completions(
        "caller_a", ListQuery(page=PageQuery(after="chatcmpl-2", order="desc"))
    )
    assert [item.id for item in before.items] == ["chatcmpl-1"]


async def test_an_old_file_gets_seqs_past_its_deleted_ones(tmp_path: Path) -> None:
    """A file from before m009 whose newest completion was deleted: the next one stored is
    listed after the deleted id, not given its seq."""
    path = tmp_path / "old.db"
    steps = [m for m in MIGRATIONS if m.name < "m009"]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        for step in steps:
            for statement in step.statements:
                db.execute(statement)
            db.execute("INSERT INTO _migrations VALUES (?, 0)", (step.name,))
        for seq in (1, 2):
            db.execute(
                "INSERT INTO completions (seq, id, caller, created, model, metadata, completion,"
                " request, stream, outcome, stored_at) VALUES (?, ?, 'caller_a', 1000,"
                " 'gpt-test', '{}', '{}', '{}', 0, 'complete', 0)",
                (seq, f"chatcmpl-{seq}"),
            )
        db.execute("INSERT INTO tombstones VALUES ('caller_a', 'chatcmpl-3', 1000, 3, 0)")
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.write_batch([record(4)])
        page = await store.list_completions(
            "caller_a", ListQuery(page=PageQuery(after="chatcmpl-3"))
        )
        assert [item.id for item in page.items] == ["chatcmpl-4"]
        assert await store.get("caller_a", "chatcmpl-1") is not None
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        plan = " ".join(
            row[3]
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT seq FROM completions"
                " WHERE caller = 'caller_a' ORDER BY created, seq"
            )
        )
    assert "completions_caller_order" in plan  # the indexes came back with the table


async def test_a_rejected_import_takes_back_only_its_own_rows_beside_another_writer(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Another writer on the file between two of the import's chunks (a proxy serving it)
    deletes the import's newest row and stores a completion of its own: when the import is
    then rejected, its rows go and the other writer's completion stays."""
    path = tmp_path / "store.db"
    read: list[int] = []

    def batches():
        for k in range(4):
            if k == 2:  # the first chunk (two batches) is committed; no transaction is open
                with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
                    add_functions(other)  # as another proxy's connection has them
                    other.execute("DELETE FROM completions WHERE id = 'chatcmpl-8'")
                    other.execute(
                        "INSERT INTO completions (id, caller, created, model, metadata,"
                        " completion, request, stream, outcome, stored_at) VALUES"
                        " ('chatcmpl-other', 'caller_b', 1000, 'gpt-test', '{}', '{}', '{}',"
                        " 0, 'complete', 0)"
                    )
            read.append(k)
            yield rows(record(n) for n in range(k * 4 + 1, k * 4 + 5))

    inserted = await store.import_records(batches(), accept=lambda: len(read) < 4, chunk_rows=8)
    assert inserted == 0
    assert rows_of(path)[0] == ["chatcmpl-other"]


# -- several metadata pairs: the rarest drives -------------------------------------------------


async def test_a_list_with_several_pairs_walks_the_rarest_one(store: SQLiteStore) -> None:
    """Whatever order the pairs come in, the page is read from the rarest pair's rows (each
    checked for the others), and the answer is the same."""
    records = [
        record(n, metadata={"env": "prod", "user": "u1" if n in (3, 7) else f"x{n}"})
        for n in range(1, 41)
    ] + [record(n, metadata={"env": "dev", "user": "u2"}) for n in range(41, 61)]
    await store.write_batch(records)
    common, rare, other = ("env", "prod"), ("user", "u1"), ("user", "u2")
    assert await store._rarest("caller_a", (common, rare)) == 1
    assert await store._rarest("caller_a", (rare, common)) == 0
    assert await store._rarest("caller_a", (common, other)) == 1  # 20 rows against 40
    for pairs in ((common, rare), (rare, common)):
        for order in ("asc", "desc"):
            page = await store.list_completions(
                "caller_a", ListQuery(metadata=pairs, page=PageQuery(order=order))
            )
            expected = ["chatcmpl-3", "chatcmpl-7"]
            assert [item.id for item in page.items] == (
                expected if order == "asc" else expected[::-1]
            )
    for pairs in ((common, other), (other, common)):  # many rows each, never the same one
        page = await store.list_completions("caller_a", ListQuery(metadata=pairs))
        assert page.items == []
        assert not page.has_more


async def test_an_old_file_gets_the_signatures_of_its_metadata(tmp_path: Path) -> None:
    """Metadata rows stored before m014 are given their completion's signature, so lists
    with several pairs find them."""
    path = tmp_path / "old.db"
    steps = [m for m in MIGRATIONS if m.name < "m014"]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        for step in steps:
            for statement in step.statements:
                db.execute(statement)
            db.execute("INSERT INTO _migrations VALUES (?, 0)", (step.name,))
        for seq, env in ((1, "prod"), (2, "dev"), (3, "prod")):
            metadata = {"env": env, "user": "u1"}
            db.execute(
                "INSERT INTO completions (seq, id, caller, created, model, metadata, completion,"
                " request, stream, outcome, stored_at) VALUES (?, ?, 'caller_a', 1000,"
                " 'gpt-test', ?, '{}', '{}', 0, 'complete', 0)",
                (seq, f"chatcmpl-{seq}", orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS)),
            )
            db.executemany(
                "INSERT INTO completion_metadata (seq, key, value, caller, created)"
                " VALUES (?, ?, ?, 'caller_a', 1000)",
                [(seq, key, value) for key, value in metadata.items()],
            )
    store = SQLiteStore(path)
    await store.open()
    try:
        for pairs in ((("user", "u1"), ("env", "prod")), (("env", "prod"), ("user", "u1"))):
            page = await store.list_completions("caller_a", ListQuery(metadata=pairs))
            assert [item.id for item in page.items] == ["chatcmpl-1", "chatcmpl-3"]
    finally:
        await store.close()
    stored, expected = pairs_in(path)  # and m020 moved every pair to the one table
    assert stored == expected and len(stored) == 6


def test_a_pair_signature_never_changes() -> None:
    """Signatures are stored in database files: the same pair must give the same bits in
    every process and every release, or lists with several pairs would miss stored rows."""
    assert pair_bits("env", "prod") == 77309411328
    assert signature([("env", "prod"), ("user", "u1")]) == 77313605888
    assert signature([]) == 0
    assert all(0 < pair_bits(str(n), "v") < 1 << 63 for n in range(1000))


def test_a_record_crosses_processes_whole() -> None:
    """Import workers pickle records: every field, in its place, survives the trip."""
    sent = record(
        5,
        duration_ms=12.5,
        request_key="k",
        stored_at=3.0,
        prompt_tokens=7,
        cached_tokens=2,
        completion_tokens=9,
        stream=True,
    )
    assert pickle.loads(pickle.dumps(sent)) == sent


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_pages_with_several_pairs_are_the_same_whichever_way_they_are_read(
    store: SQLiteStore, order: str
) -> None:
    """Pages that fill within the first pair's first entries, and pages that do not (read
    from the rarest pair), page through the same matches in the same order."""
    records = [
        record(
            n,
            created=1000 + n % 7,
            metadata={"env": "prod" if n % 2 else "dev", "team": "a" if n % 3 else "b"},
        )
        for n in range(1, 121)
    ]
    await store.write_batch(records)
    for pairs in ((("env", "prod"), ("team", "b")), (("team", "b"), ("env", "prod"))):
        query = ListQuery(metadata=pairs, page=PageQuery(order=order))  # type: ignore[arg-type]
        for limit in (1, 3, 100):
            seen: list[str] = []
            after = None
            while True:
                page = replace(query.page, limit=limit, after=after)
                result = await store.list_completions("caller_a", replace(query, page=page))
                seen += [item.id for item in result.items]
                if not result.has_more:
                    break
                after = seen[-1]
            assert seen == listed(records, query), (pairs, limit)
