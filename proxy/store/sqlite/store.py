"""The SQLite store: ``SQLiteStore`` implements ``proxy.store.Store`` on one database file.

- WAL journal; one write connection, owned by one thread where each write transaction
  (``BEGIN IMMEDIATE`` … ``COMMIT``) runs whole, so writes never interleave and a commit is
  one hand-off; one read connection; one checkpointer.
- ``synchronous=NORMAL`` by default: a commit survives the proxy being killed (``kill -9``)
  but the last commits may be lost on power failure; ``store.synchronous: full`` closes that
  at the cost of an fsync per batch.
- Pages are keyset-paginated on ``(created, seq)``: a stable total order, so pages never skip
  or repeat, and every list is an index range read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import inspect
import itertools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import aiosqlite
import orjson

from proxy.models import ListQuery, Order, PageQuery
from proxy.store.errors import KeyExists, SearchOff, StoreError, StoreMissing, UnknownCursor
from proxy.store.records import (
    AuditEntry,
    CompletionRecord,
    ExchangeRecord,
    ExportFilter,
    Importable,
    KeyRecord,
    LogEntry,
    Page,
    Prepared,
    PruneReport,
    StoredCompletion,
    UsageRow,
    Writable,
)
from proxy.store.signature import signature
from proxy.store.sqlite.connection import ThreadedConnection
from proxy.store.sqlite.migrations import migrate
from proxy.store.sqlite.search import add_functions, index_backlog, merge_step
from proxy.store.text import Parsed, filter_tags, fts5_query, preview, searchable


class _Rejected(Exception):
    """An import whose file had bad lines: everything it wrote is taken back."""


_INSERT_COMPLETION = """
INSERT INTO completions (
    id, caller, created, model, metadata, completion, request,
    request_id, stream, outcome, stored_at, duration_ms, request_key,
    prompt_tokens, cached_tokens, completion_tokens
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (caller, id) DO NOTHING
"""

_INSERT_METADATA = """
INSERT INTO completion_metadata (seq, key, value, caller, created, sig) VALUES (?, ?, ?, ?, ?, ?)
"""

# A set of completions' metadata rows, each found by its whole key from the completion's
# metadata column: the table is ordered for lookups (m020), not by seq. ``rows`` picks the
# completions (as ``c``); they must still hold the metadata their rows were written with.
_DELETE_METADATA = (
    "DELETE FROM completion_metadata WHERE (caller, key, value, created, seq) IN"
    " (SELECT c.caller, j.key, j.value, c.created, c.seq FROM completions c,"
    " json_each(CAST(c.metadata AS TEXT)) j WHERE {rows})"
)

# One metadata pair of the completion ``row`` (with caller, created and seq): a lookup of
# the whole key.
_PAIR_OF = (
    "SELECT 1 FROM completion_metadata x WHERE x.caller = {row}.caller AND x.key = ?"
    " AND x.value = ? AND x.created = {row}.created AND x.seq = {row}.seq"
)

_INSERT_EXCHANGE = """
INSERT INTO exchanges (
    request_id, caller, created, model, stream, outcome, status, request, response, duration_ms
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# A batch's new completions per (UTC day, caller, model), added to the usage rollup; the day
# is SQLite's date() of a created time in that day, as the delete trigger computes it.
_ADD_USAGE = """
INSERT INTO usage_by_day VALUES (date(?, 'unixepoch'), ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, caller, model) DO UPDATE SET
    completions = completions + excluded.completions,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens
"""

_INSERT_TEXT = "INSERT INTO completions_fts (rowid, body, tags) VALUES (?, ?, ?)"
_DEFER_TEXT = "INSERT INTO search_backlog (seq) VALUES (?)"

_COLUMNS = "c.id, c.completion, c.metadata"
# A log row (``LogEntry``): the promoted columns and the last input message's content,
# read from the request without loading it into Python.
_LOG_COLUMNS = (
    "c.id, c.caller, c.created, c.model, c.outcome, c.stream, c.duration_ms, c.stored_at,"
    " c.prompt_tokens, c.cached_tokens, c.completion_tokens, c.metadata,"
    " CASE WHEN json_valid(CAST(c.request AS TEXT))"
    " THEN json_extract(CAST(c.request AS TEXT), '$.messages[#-1].content') END"
)

# Every caller with a stored completion, oldest name first: one seek in the caller-order
# index per caller (a skip scan), not a read of every row. Admins read across callers with
# it, caller by caller, since every list index leads with the caller (see m008).
_CALLERS = (
    "WITH RECURSIVE callers(caller) AS ("
    " SELECT min(caller) FROM completions"
    " UNION ALL SELECT (SELECT min(caller) FROM completions WHERE caller > callers.caller)"
    " FROM callers WHERE callers.caller IS NOT NULL)"
    " SELECT caller FROM callers WHERE caller IS NOT NULL"
)

# Columns a soft delete copies into deleted_completions (named: the tables may drift).
_KEPT = (
    "seq, id, caller, created, model, metadata, completion, request, request_id, stream,"
    " outcome, stored_at, duration_ms, request_key, prompt_tokens, cached_tokens,"
    " completion_tokens"
)

P = ParamSpec("P")
T = TypeVar("T")

# Seconds between WAL checkpoints while there are writes. Short: each copies little, so the
# burst of CPU and I/O that a commit may wait behind stays short (docs/benchmarks.md).
CHECKPOINT_INTERVAL = 0.1
# Past this many frames (2 MiB of PAGE_SIZE pages, 4 MiB in a file made with 4 KiB pages)
# the writer restarts the WAL (see _write).
# Small on purpose: every page read searches the WAL's index, so a short WAL keeps reads and
# commits fast (measurements in docs/storage.md).
WAL_RESTART_FRAMES = 1024
# New databases get 2 KiB pages; an existing file keeps the size it was made with. A commit
# writes every B-tree page it changes to the WAL whole, mostly index leaves that gain a few
# bytes, so smaller pages mean less to write and to fsync at each checkpoint, during which
# commits stall (measurements in docs/storage.md).
PAGE_SIZE = 2048
CALLERS_PER_READ = 100  # callers whose keys an admin's page reads in one statement
# A list with several metadata pairs walks the rarest pair's rows; each pair's rows are
# counted up to this many to find it (an index range each, about 50 ns a row).
RAREST_CAP = 5_000
# Before counting, a list with several pairs reads this many of the first pair's entries:
# when its matches are dense the page fills there, in one statement and no count.
FIRST_WALK = 1_000
IMPORT_CHUNK = 20_000  # rows per import transaction through the WAL (see _import)
# Rows per transaction when the import writes the file directly (see _go_direct). Larger,
# since no WAL has to stay small: once an index that takes rows at random places (the
# request key's) has fewer leaf pages than a chunk has rows, every chunk rewrites, and
# journals, nearly all of them (measurements in docs/benchmarks.md).
IMPORT_CHUNK_DIRECT = 100_000
IMPORT_CACHE_KIB = 256 * 1024  # the page cache while an import runs (see _import)

_GROUPS = {"caller": "caller", "model": "model", "day": "date(created, 'unixepoch')"}


def _dump_metadata(metadata: dict[str, str]) -> bytes:
    return orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS)


def _page_sql(
    caller: str,
    query: ListQuery,
    cursor: tuple[int, int] | None,
    order: Order,
    limit: int,
    *,
    keys_only: bool = False,
    driver: int = 0,
    columns: str = _COLUMNS,
) -> tuple[str, list[object]]:
    """One caller's keyset page as SQL, read in order from an index that leads with the
    caller: when filtering by metadata, the index range of pair ``driver`` (the rarest, see
    ``_rarest``), each row checked for the other pairs: first by the signature on its index
    entry, then, for the few that pass, exactly by primary key, before its completion is
    read; else the model's or the plain order. With ``keys_only`` it reads just the
    page's ``(created, seq)``, from the indexes alone when there is no model filter. A time
    range bounds the same index range."""
    direction = "ASC" if order == "asc" else "DESC"
    compare = ">" if order == "asc" else "<"
    params: list[object] = []
    where: list[str] = []
    if query.metadata:
        (key, value) = query.metadata[driver]
        rest = query.metadata[:driver] + query.metadata[driver + 1 :]
        source = "completion_metadata m"
        if not keys_only or query.model is not None:
            source += " CROSS JOIN completions c ON c.seq = m.seq"
        where.append("m.caller = ? AND m.key = ? AND m.value = ?")
        params += [caller, key, value]
        keys = "m.created, m.seq"
        if rest:
            where.append("(m.sig & ?) = ?")
            params += [signature(rest)] * 2
        for key, value in rest:
            where.append(f"EXISTS ({_PAIR_OF.format(row='m')})")
            params += [key, value]
    else:
        source = "completions c"
        where.append("c.caller = ?")
        params.append(caller)
        keys = "c.created, c.seq"
    if query.model is not None:
        where.append("c.model = ?")
        params.append(query.model)
    first, second = keys.split(", ")
    if query.since is not None:
        where.append(f"{first} >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append(f"{first} < ?")
        params.append(query.until)
    if cursor is not None:
        where.append(f"({keys}) {compare} (?, ?)")
        params += list(cursor)
    sql = (
        f"SELECT {keys if keys_only else columns} FROM {source}"
        f" WHERE {' AND '.join(where)}"
        f" ORDER BY {first} {direction}, {second} {direction} LIMIT ?"
    )
    params.append(limit + 1)
    return sql, params


def _walked_sql(  # noqa: PLR0917 - a page query's parts, as _page_sql takes them
    caller: str,
    query: ListQuery,
    cursor: tuple[int, int] | None,
    order: Order,
    limit: int,
    columns: str,
    walk: int,
) -> tuple[str, list[object]]:
    """A page with several metadata pairs driven by the first, reading at most ``walk`` of
    its index entries (in a subquery, in list order). When the page fills within them it is
    the page ``_page_sql`` gives; when it does not, nothing is known (see ``_select_page``)."""
    direction = "ASC" if order == "asc" else "DESC"
    compare = ">" if order == "asc" else "<"
    (key, value), rest = query.metadata[0], query.metadata[1:]
    inner = ["caller = ?", "key = ?", "value = ?"]
    params: list[object] = [caller, key, value]
    if query.since is not None:
        inner.append("created >= ?")
        params.append(query.since)
    if query.until is not None:
        inner.append("created < ?")
        params.append(query.until)
    if cursor is not None:
        inner.append(f"(created, seq) {compare} (?, ?)")
        params += list(cursor)
    params.append(walk)
    outer = ["(m.sig & ?) = ?"]
    params += [signature(rest)] * 2
    for key, value in rest:
        outer.append(f"EXISTS ({_PAIR_OF.format(row='m')})")
        params += [key, value]
    if query.model is not None:
        outer.append("c.model = ?")
        params.append(query.model)
    params.append(limit + 1)
    # No ORDER BY outside: rows come in the subquery's order, since CROSS JOIN keeps it the
    # outer loop; sorting them again would check all ``walk`` entries before the first row.
    sql = (
        f"SELECT {columns} FROM (SELECT caller, created, seq, sig FROM completion_metadata"
        f" WHERE {' AND '.join(inner)} ORDER BY created {direction}, seq {direction} LIMIT ?) m"
        f" CROSS JOIN completions c ON c.seq = m.seq WHERE {' AND '.join(outer)} LIMIT ?"
    )
    return sql, params


def _rarest_sql(caller: str, pairs: Sequence[tuple[str, str]]) -> tuple[str, list[object]]:
    """How many rows each pair has for ``caller``, each counted up to ``RAREST_CAP``: a
    range of the metadata index, read from the index alone."""
    counts = ", ".join(
        "(SELECT count(*) FROM (SELECT 1 FROM completion_metadata"
        " WHERE caller = ? AND key = ? AND value = ? LIMIT ?))"
        for _ in pairs
    )
    params: list[object] = []
    for key, value in pairs:
        params += [caller, key, value, RAREST_CAP]
    return f"SELECT {counts}", params


def _search_sql(
    caller: str | None, query: ListQuery, match: str, cursor: int | None, columns: str
) -> tuple[str, list[object]]:
    """A page of completions whose text matches, in storage order (seq), read from the
    full-text index in that order and stopped at the page's end: the newest matches of a
    common word are the first ones read. The caller, model and metadata filters are tags
    inside the index (``match`` requires them), so they narrow the walk itself; they are
    checked again on the rows, with the time range."""
    page = query.page
    direction, compare = ("ASC", ">") if page.order == "asc" else ("DESC", "<")
    where = ["completions_fts MATCH ?"]
    params: list[object] = [match]
    for clause, value in (
        ("c.caller = ?", caller),
        ("c.model = ?", query.model),
        ("c.created >= ?", query.since),
        ("c.created < ?", query.until),
        (f"completions_fts.rowid {compare} ?", cursor),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    for key, value in query.metadata:
        where.append(f"EXISTS ({_PAIR_OF.format(row='c')})")
        params += [key, value]
    # CROSS JOIN keeps the index outermost, so rows come in its (rowid) order.
    sql = (
        f"SELECT {columns} FROM completions_fts CROSS JOIN completions c"
        f" ON c.seq = completions_fts.rowid WHERE {' AND '.join(where)}"
        f" ORDER BY completions_fts.rowid {direction} LIMIT ?"
    )
    params.append(page.limit + 1)
    return sql, params


def _log_entry(row: Sequence[Any]) -> LogEntry:
    return LogEntry(
        id=row[0],
        caller=row[1],
        created=row[2],
        model=row[3],
        outcome=row[4],
        stream=bool(row[5]),
        duration_ms=row[6],
        stored_at=row[7],
        prompt_tokens=row[8],
        cached_tokens=row[9],
        completion_tokens=row[10],
        metadata=orjson.loads(row[11]),
        preview=preview(row[12]),
    )


# -- the writer's transactions: each runs whole on the writer's thread ---------------------


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE``; committed when the block ends, rolled back when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        # SQLite may have rolled back already (SQLITE_FULL ends the transaction).
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _fetchone(conn: sqlite3.Connection, sql: str, params: Sequence[object] = ()) -> Any:
    return conn.execute(sql, params).fetchone()


def _last_seq(conn: sqlite3.Connection) -> int:
    """The largest seq ever given to a completion (AUTOINCREMENT's counter: a deleted
    completion's seq is never given again)."""
    row = _fetchone(conn, "SELECT seq FROM sqlite_sequence WHERE name = 'completions'")
    return 0 if row is None else int(row[0])


def _columns(record: CompletionRecord, now: float) -> tuple[Any, ...]:
    """``record`` as the insert takes it; ``now`` is its stored_at unless it has one."""
    return (
        record.id,
        record.caller,
        record.created,
        record.model,
        _dump_metadata(record.metadata),
        record.completion,
        record.request,
        record.request_id,
        int(record.stream),
        record.outcome,
        record.stored_at if record.stored_at is not None else now,
        record.duration_ms,
        record.request_key,
        record.prompt_tokens,
        record.cached_tokens,
        record.completion_tokens,
    )


Derived = tuple[int, str | None, str | None]


def derive(record: CompletionRecord, parsed: Parsed | None = None, search: bool = True) -> Derived:
    """What the insert computes from a completion (``Store.derive``): its metadata's
    signature and, with search on, its searchable text and filter tags (None, None with
    search off: the completion then goes to the backlog)."""
    items = record.metadata.items()
    if not search:
        return signature(items), None, None
    return (
        signature(items),
        searchable(record.request, record.completion, parsed),
        " ".join(filter_tags(record.caller, record.model, items)),
    )


def usage_deltas(records: Iterable[CompletionRecord]) -> list[tuple[object, ...]]:
    """New completions summed per (UTC day, caller, model), as ``_ADD_USAGE`` takes them
    (a time in the day, caller, model, then the sums): one upsert per group rather than one
    per completion, which a trigger did at about a tenth of an insert's cost."""
    totals: dict[tuple[int, str, str], list[int]] = {}
    for r in records:
        key = (r.created // 86_400, r.caller, r.model)
        total = totals.get(key)
        if total is None:
            totals[key] = [1, r.prompt_tokens, r.cached_tokens, r.completion_tokens]
        else:
            total[0] += 1
            total[1] += r.prompt_tokens
            total[2] += r.cached_tokens
            total[3] += r.completion_tokens
    return [(day * 86_400, caller, model, *total) for (day, caller, model), total in totals.items()]


def _insert(conn: sqlite3.Connection, items: Iterable[Importable], now: float, search: bool) -> int:
    """Insert inside the caller's transaction; return how many were new.

    One statement per completion, so a duplicate (same caller and id, kept as first written)
    is known at once and gets no metadata rows; the metadata rows then go in as plain values,
    which costs less than half what deriving them from the completion rows did. SQLite
    gives each new row the next seq, never one a deleted row had (AUTOINCREMENT, m009).
    New rows are indexed for search in the same transaction; with ``search`` off they go to
    the backlog instead (see ``proxy.store.sqlite.search``). In Python rather than by a
    trigger calling the text functions, which cost about 25 us more per row; the usage
    rollup likewise, one upsert per group of the batch (``usage_deltas``).
    """
    cursor = conn.cursor()
    pairs = []
    texts = []
    later = []
    new = []
    for item in items:
        record, derived = item if isinstance(item, Prepared) else (item, derive(item, None, search))
        cursor.execute(_INSERT_COMPLETION, _columns(record, now))
        if cursor.rowcount:  # zero for a duplicate
            new.append(record)
            # The row just inserted: its seq is set.
            seq, caller, created = cast(int, cursor.lastrowid), record.caller, record.created
            sig, text, tags = derived
            pairs += [
                (seq, key, value, caller, created, sig) for key, value in record.metadata.items()
            ]
            if text is not None:
                texts.append((seq, text, tags))
            else:
                later.append((seq,))
    if pairs:
        conn.executemany(_INSERT_METADATA, pairs)
    # In the completion's own transaction: search never misses a committed completion.
    conn.executemany(_INSERT_TEXT, texts)
    merge_step(conn, (seq for seq, _, _ in texts))
    conn.executemany(_DEFER_TEXT, later)
    conn.executemany(_ADD_USAGE, usage_deltas(new))
    return len(new)


def _write_batch(conn: sqlite3.Connection, records: Sequence[Writable], search: bool) -> int:
    completions = [r for r in records if isinstance(r, CompletionRecord)]
    exchanges = [
        (
            r.request_id,
            r.caller,
            r.created,
            r.model,
            int(r.stream),
            r.outcome,
            r.status,
            r.request,
            r.response,
            r.duration_ms,
        )
        for r in records
        if isinstance(r, ExchangeRecord)
    ]
    with _transaction(conn):
        now = time.time()
        inserted = _insert(conn, completions, now, search) if completions else 0
        if exchanges:
            conn.executemany(_INSERT_EXCHANGE, exchanges)
            inserted += len(exchanges)
    return inserted


def _import(
    conn: sqlite3.Connection,
    batches: Iterable[Sequence[Importable]],
    accept: Callable[[], bool],
    chunk_rows: int,
    *,
    copy_beside: Callable[[], Future[int]] | None,
    cache_kib: int,
    search: bool = True,
) -> int:
    """Insert in transactions of about ``chunk_rows`` rows, noting the seq range each one
    took. When ``accept()`` turns false (a bad line) or anything fails, the open transaction
    is rolled back and the ranges already committed are deleted, so nothing stays behind;
    the remaining batches are still read, so every bad line gets reported.

    The ranges hold this import's rows and nothing else, whoever else writes to the file
    meanwhile (another proxy, another import): each is read from AUTOINCREMENT's counter
    at the start and end of its own ``BEGIN IMMEDIATE`` transaction, which no other writer
    can interleave with, and a seq is never given twice, so a row written later by someone
    else never falls in one, even after the import's newest row was deleted.

    Chunks rather than one transaction: through the WAL, the WAL stays the size of two
    chunks (one transaction of a million rows made a WAL larger than the database); when
    direct, a chunk's journal and dirty pages stay bounded; and other processes
    writing to the same file wait for one chunk, not the whole import. A crash mid-import
    leaves the chunks committed so far (whole records); importing the file again completes
    it.

    In WAL mode each chunk's pages are then copied from the WAL into the database. Every
    other chunk is copied by ``copy_beside`` (the checkpointer's thread) while the next chunk
    is inserted; after that next chunk the writer copies what is left itself, so the chunk
    after it writes the WAL from its start again. The copy and its two fsyncs were a third of
    an import's time when the writer did every one. With ``copy_beside`` None the file is in
    rollback-journal mode (see ``_go_direct``) and pages go straight to the database; the
    writer still checkpoints after each chunk, a no-op unless another process has switched
    the file back to WAL meanwhile, so the WAL stays bounded then too.

    The page cache is ``cache_kib`` for the import: the id and request-key indexes take each
    row at a random place, and once they outgrow the cache every chunk reads and spills
    their pages again and again.
    """
    taken: list[tuple[int, int]] = []
    inserted = 0
    pending = iter(batches)
    copying: Future[int] | None = None
    cache_size = _fetchone(conn, "PRAGMA cache_size")[0]
    conn.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
    try:
        while True:
            # A chunk's first batch is awaited before its transaction begins, so a producer
            # that is slow to start (parsing a large file) keeps no other writer waiting.
            first = next(pending, None)
            if first is None:
                if not accept():
                    raise _Rejected
                return inserted
            with _transaction(conn):
                base = _last_seq(conn)
                rows = 0
                now = time.time()
                for batch in itertools.chain([first], pending):
                    if not accept():
                        raise _Rejected
                    inserted += _insert(conn, batch, now, search)
                    rows += len(batch)
                    if rows >= chunk_rows:
                        break
                if not accept():
                    raise _Rejected
                end = _last_seq(conn)
            if end > base:
                taken.append((base + 1, end))
            if rows < chunk_rows:
                return inserted
            if copy_beside is None:
                _checkpoint(conn, "PASSIVE")
            elif copying is None:
                copying = copy_beside()
            else:
                copying.result()
                copying = None
                _checkpoint(conn, "PASSIVE")
    except _Rejected:
        for _ in pending:  # read on: the report names every bad line
            pass
        _undo(conn, taken)
        return 0
    except BaseException:
        _undo(conn, taken)
        raise
    finally:
        if copying is not None:
            with contextlib.suppress(sqlite3.Error):
                copying.result()
        conn.execute(f"PRAGMA cache_size = {cache_size}")


def _go_direct(conn: sqlite3.Connection) -> bool:
    """Switch the file to a rollback journal for an import, if no other connection is on it.

    In WAL mode every new page is written twice, to the WAL and then to the database; with a
    rollback journal it is written once (only the pages a transaction changes are copied to
    the journal first). Leaving WAL needs the
    file to itself, so with another connection open (a running proxy, an export) this returns
    False at once and the import stays in WAL. ``synchronous = FULL`` while direct: with a
    rollback journal, NORMAL can lose more than the last commit on power failure.
    """
    busy = _fetchone(conn, "PRAGMA busy_timeout")[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        mode = _fetchone(conn, "PRAGMA journal_mode = DELETE")[0]
    except sqlite3.OperationalError:  # locked: another connection has the file open
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy)}")
    if mode != "delete":  # an in-memory database keeps its own journal
        return False
    conn.execute("PRAGMA synchronous = FULL")
    return True


def _leave_direct(conn: sqlite3.Connection, synchronous: str) -> None:
    """Back to WAL after a direct import. If another process is reading at that moment for
    longer than the busy timeout, the file stays in rollback mode until the next open of a
    store switches it (every open does): nothing is lost either way."""
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    with contextlib.suppress(sqlite3.OperationalError):
        conn.execute("PRAGMA journal_mode = WAL")


def _undo(conn: sqlite3.Connection, taken: Sequence[tuple[int, int]]) -> None:
    """Delete the rows an import committed (its seq ranges) in one transaction."""
    if not taken:
        return
    with _transaction(conn):
        for first, last in taken:
            conn.execute(_DELETE_METADATA.format(rows="c.seq BETWEEN ? AND ?"), (first, last))
            conn.execute("DELETE FROM completions WHERE seq BETWEEN ? AND ?", (first, last))


def _probe(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO settings (name, value) VALUES ('probe', ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (str(time.time()).encode(),),
    )


def _audit(  # noqa: PLR0917 - one row's columns, in the table's order
    conn: sqlite3.Connection,
    actor: str,
    action: str,
    completion_id: str | None,
    owner: str | None,
    detail: dict[str, object],
) -> None:
    conn.execute(
        "INSERT INTO audit_log (at, actor, action, completion_id, owner, detail)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), actor, action, completion_id, owner, orjson.dumps(detail)),
    )


def _locate(conn: sqlite3.Connection, caller: str | None, completion_id: str) -> Any:
    """(seq, caller, created, metadata) of a completion this caller may see, or None."""
    if caller is None:
        return _fetchone(
            conn,
            "SELECT seq, caller, created, metadata FROM completions WHERE id = ?"
            " ORDER BY seq LIMIT 1",
            (completion_id,),
        )
    return _fetchone(
        conn,
        "SELECT seq, caller, created, metadata FROM completions WHERE caller = ? AND id = ?",
        (caller, completion_id),
    )


def _update_metadata(  # noqa: PLR0917 - the operation's arguments, in order
    conn: sqlite3.Connection,
    caller: str | None,
    completion_id: str,
    metadata: dict[str, str],
    encoded: bytes,
    actor: str,
) -> bytes | None:
    with _transaction(conn):
        found = _locate(conn, caller, completion_id)
        if found is None:
            return None
        seq, owner, created, before = found
        sig = signature(metadata.items())
        # The old pairs are found from the metadata column, so they go before it changes.
        conn.execute(_DELETE_METADATA.format(rows="c.seq = ?"), (seq,))
        # The search index's tags follow (the completions_search_update trigger).
        row = _fetchone(
            conn,
            "UPDATE completions SET metadata = ? WHERE seq = ? RETURNING completion",
            (encoded, seq),
        )
        conn.executemany(
            _INSERT_METADATA,
            [(seq, k, v, owner, created, sig) for k, v in metadata.items()],
        )
        _audit(
            conn,
            actor,
            "update_metadata",
            completion_id,
            owner,
            {"before": orjson.loads(before), "after": metadata},
        )
    completion: bytes = row[0]
    return completion


def _delete(
    conn: sqlite3.Connection, caller: str | None, completion_id: str, actor: str, purge: bool
) -> bool:
    with _transaction(conn):
        found = _locate(conn, caller, completion_id)
        if found is None:
            return False
        seq, owner, created, metadata = found
        if not purge:
            conn.execute(
                f"INSERT INTO deleted_completions ({_KEPT}, deleted_at, deleted_by)"
                f" SELECT {_KEPT}, ?, ? FROM completions WHERE seq = ?",
                (time.time(), actor, seq),
            )
        conn.execute(_DELETE_METADATA.format(rows="c.seq = ?"), (seq,))
        conn.execute("DELETE FROM completions WHERE seq = ?", (seq,))
        conn.execute(
            "INSERT OR REPLACE INTO tombstones (caller, id, created, seq, deleted_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (owner, completion_id, created, seq, time.time()),
        )
        _audit(
            conn,
            actor,
            "delete",
            completion_id,
            owner,
            {"metadata": orjson.loads(metadata), "content_purged": purge},
        )
    return True


def _create_key(  # noqa: PLR0917 - the operation's arguments, in order
    conn: sqlite3.Connection, name: str, role: str, key_id: str, key_hash: bytes, actor: str
) -> None:
    with _transaction(conn):
        if _fetchone(conn, "SELECT 1 FROM proxy_keys WHERE name = ?", (name,)) is not None:
            raise KeyExists(name)
        conn.execute(
            "INSERT INTO proxy_keys (name, key_id, key_hash, role, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (name, key_id, key_hash, role, time.time()),
        )
        _audit(conn, actor, "key_created", None, name, {"role": role})


def _revoke_key(conn: sqlite3.Connection, name: str, actor: str) -> bool:
    with _transaction(conn):
        row = _fetchone(
            conn,
            "UPDATE proxy_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"
            " RETURNING name",
            (time.time(), name),
        )
        if row is not None:
            _audit(conn, actor, "key_revoked", None, name, {})
    return row is not None


def _prune(conn: sqlite3.Connection, before: int) -> tuple[int, int]:
    with _transaction(conn):
        # Caller by caller: the rows before ``before`` are a range of each one's order index.
        old = f"caller IN ({_CALLERS}) AND created < ?"
        conn.execute(
            _DELETE_METADATA.format(rows=f"c.caller IN ({_CALLERS}) AND c.created < ?"), (before,)
        )
        completions = conn.execute(f"DELETE FROM completions WHERE {old}", (before,)).rowcount
        exchanges = conn.execute("DELETE FROM exchanges WHERE created < ?", (before,)).rowcount
        conn.execute("DELETE FROM tombstones WHERE created < ?", (before,))
        conn.execute("DELETE FROM deleted_completions WHERE created < ?", (before,))
        if completions or exchanges:
            _audit(
                conn,
                "retention",
                "prune",
                None,
                None,
                {"before": before, "completions": completions, "exchanges": exchanges},
            )
    # Outside any transaction: VACUUM cannot run in one.
    free = _fetchone(conn, "PRAGMA freelist_count")[0]
    total = _fetchone(conn, "PRAGMA page_count")[0]
    _checkpoint(conn, "TRUNCATE")
    if total and free * 4 >= total:
        conn.execute("VACUUM")
        _checkpoint(conn, "TRUNCATE")
    return completions, exchanges


def _end_session(conn: sqlite3.Connection, session_id: str, expires: float) -> None:
    with _transaction(conn):
        conn.execute("DELETE FROM ended_sessions WHERE expires < ?", (time.time(),))
        conn.execute(
            "INSERT OR REPLACE INTO ended_sessions (sid, expires) VALUES (?, ?)",
            (session_id, expires),
        )


def _setting(conn: sqlite3.Connection, name: str, default: bytes) -> bytes:
    conn.execute(
        "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (name, default),
    )
    value: bytes = _fetchone(conn, "SELECT value FROM settings WHERE name = ?", (name,))[0]
    return value


def _checkpoint(conn: sqlite3.Connection, mode: str) -> int:
    """Run a checkpoint; return how many frames the WAL holds (-1 when none is in use)."""
    frames: int = _fetchone(conn, f"PRAGMA wal_checkpoint({mode})")[1]
    return frames


def _locked(
    conn: sqlite3.Connection,
    lock: int | None,
    fn: Callable[Concatenate[sqlite3.Connection, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn(conn, ...)`` holding the file's write lock (see ``SQLiteStore``): a writer of
    another process waits in the kernel and is woken the moment this one is done, instead of
    SQLite's busy handler, which sleeps 1, 2, 5, 10 ... ms between tries."""
    if lock is None:
        return fn(conn, *args, **kwargs)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        return fn(conn, *args, **kwargs)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def _wal_state(path: str) -> tuple[int, int] | None:
    """The WAL file's size and modification time, None when there is none."""
    try:
        status = os.stat(path + "-wal")
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def _open_lock(path: str) -> int:
    return os.open(path + "-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _tidy(conn: sqlite3.Connection) -> None:
    """Truncate the WAL if nobody else is using the file right now; never wait for it."""
    busy = _fetchone(conn, "PRAGMA busy_timeout")[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        _checkpoint(conn, "TRUNCATE")
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy)}")


def _prepare_writer(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    # Checkpoints run on their own connection (see _checkpoint_forever), not inside the
    # writer's commits, where they cost about 40% of write throughput. The WAL file is cut
    # back to 64 MiB when it starts over (see SQLiteStore._checkpoint_forever).
    _fetchone(conn, "PRAGMA wal_autocheckpoint = 0")
    _fetchone(conn, "PRAGMA journal_size_limit = 67108864")
    migrate(conn)


def _index_backlog(conn: sqlite3.Connection) -> int:
    with _transaction(conn):
        return index_backlog(conn)


def _make_room(path: str, *, must_exist: bool) -> None:
    """Make the folder a new database file goes in; or, with ``must_exist``, refuse a file
    that is not there (a read-only command must not leave an empty database behind)."""
    if must_exist and not Path(path).is_file():
        raise StoreMissing(f"no database at {path}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)


Cls = TypeVar("Cls", bound=type)


def _store_errors(cls: Cls) -> Cls:
    """Every public coroutine (and the export generator) of ``cls`` raises ``StoreError``
    where SQLite raised ``sqlite3.Error``, so nothing outside this package sees SQLite's."""

    def coroutine(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except sqlite3.Error as error:
                raise StoreError(str(error)) from error

        return wrapper

    def generator(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except sqlite3.Error as error:
                raise StoreError(str(error)) from error

        return wrapper

    for name, fn in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if inspect.iscoroutinefunction(fn):
            setattr(cls, name, coroutine(fn))
        elif inspect.isasyncgenfunction(fn):
            setattr(cls, name, generator(fn))
    return cls


@_store_errors
class SQLiteStore:
    """The SQLite store: one file, WAL; a writer connection on its own thread (every write is
    one function there, see ``connection``), a reader connection, and a checkpointer.

    Several processes may share the file (``serve --workers N``, a CLI command beside a
    running server). Their write transactions take turns on an ``flock`` of ``<file>-lock``
    before ``BEGIN IMMEDIATE``, so one never meets another's transaction in SQLite: a wait
    for the lock is a wait in the kernel, woken at once, never a "database is locked"
    error or a busy-handler sleep. Imports run outside that lock (they commit in chunks and
    other writers wait for SQLite's busy handler meanwhile). With ``checkpoints=False`` the
    process leaves WAL checkpoints to another process on the file: one checkpointer per file.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "normal",
        max_bytes: int | None = None,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        wal_restart_frames: int = WAL_RESTART_FRAMES,
        must_exist: bool = False,
        checkpoints: bool = True,
        search: bool = True,
    ) -> None:
        self.path = str(path)
        self._search = search
        self._checkpoints_on = checkpoints
        # <file>-lock, opened twice: an flock belongs to an open file, so the writer and the
        # checkpointer exclude each other only through descriptors of their own.
        self._lock: int | None = None
        self._checkpoint_lock: int | None = None
        self._must_exist = must_exist
        self._checkpoint_interval = checkpoint_interval
        self._wal_restart_frames = wal_restart_frames
        self._synchronous = synchronous.upper()
        self._max_bytes = max_bytes
        self._writer: ThreadedConnection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: ThreadedConnection | None = None
        self._checkpoints: asyncio.Task[None] | None = None

    @property
    def derive(self) -> Callable[[CompletionRecord, Parsed | None], Derived]:
        return functools.partial(derive, search=self._search)

    def _pragmas(self, page_size: int) -> list[str]:
        pragmas = [
            "PRAGMA busy_timeout = 5000",
            f"PRAGMA synchronous = {self._synchronous}",
            "PRAGMA cache_size = -16384",  # 16 MiB: index pages stay cached
            # Deleted content is overwritten, not left in free pages: deleted means gone.
            "PRAGMA secure_delete = ON",
        ]
        if self._max_bytes is not None:
            # A size cap: past it writes fail with SQLITE_FULL, exactly as on a full disk.
            pragmas.append(f"PRAGMA max_page_count = {max(1, self._max_bytes // page_size)}")
        return pragmas

    def _connect(self) -> sqlite3.Connection:
        """A connection for a ``ThreadedConnection`` (called on its thread)."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        add_functions(conn)
        if _fetchone(conn, "PRAGMA page_count")[0] == 0:  # a new database: nothing written yet
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        page_size = _fetchone(conn, "PRAGMA page_size")[0]
        for pragma in self._pragmas(page_size):
            _fetchone(conn, pragma)
        return conn

    async def _connect_reader(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        row = await self._fetchone(conn, "PRAGMA page_size")
        for pragma in self._pragmas(row[0] if row else 4096):
            await self._fetchone(conn, pragma)
        return conn

    async def open(self) -> None:
        """Open the file (made, with its folder, unless ``must_exist``) and migrate it; with
        search on (and not ``must_exist``: a command that only reads), index what was written
        while it was off."""
        if self.path != ":memory:":
            _make_room(self.path, must_exist=self._must_exist)
            self._lock = _open_lock(self.path)
            self._checkpoint_lock = _open_lock(self.path)
        self._writer = ThreadedConnection(self._connect, "store-writer")
        await self._writer.open()
        try:
            await self._writer.run(_locked, self._lock, _prepare_writer)
            await self._open_beside()  # the checkpointer keeps the WAL short meanwhile
            if self._search and not self._must_exist:
                while await self._write(_index_backlog):
                    pass
        except BaseException:
            await self.close()
            raise

    async def _open_beside(self) -> None:
        """The connections beside the writer: the reader and the checkpointer."""
        self._reader = await self._connect_reader()
        self._checkpointer = ThreadedConnection(self._connect, "store-checkpointer")
        await self._checkpointer.open()
        if self._checkpoints_on:
            self._checkpoints = asyncio.create_task(
                self._checkpoint_forever(), name="wal-checkpoint"
            )

    async def _close_beside(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            self._checkpoints = None
        if self._checkpointer is not None:
            await self._checkpointer.close()
        if self._reader is not None:
            await self._reader.close()
        self._checkpointer = self._reader = None

    async def _checkpoint_forever(self) -> None:
        """Copy committed pages from the WAL into the database, beside the writer.

        PASSIVE never waits for or blocks the writers or readers; whatever it cannot copy yet
        is copied next time. The WAL keeps every commit durable meanwhile (kill -9 replays it).

        The WAL starts over only if, when a transaction begins, every frame in it has been
        copied; under steady writes a checkpoint beside them never wins that race and the WAL
        would grow without end. So once it is long, the checkpointer takes the write lock
        and copies the little that is left: the next transaction, in whichever process, then
        writes the WAL from its start (a file over 64 MiB is cut back to that).
        """
        assert self._checkpointer is not None
        checkpointer = self._checkpointer
        seen: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(self._checkpoint_interval)
            # Only when the WAL changed, by this process or another: a stat, not a trip to
            # the checkpointer's thread, while nothing is written.
            now = _wal_state(self.path)
            if now == seen:
                continue
            seen = now
            frames = await checkpointer.run(_checkpoint, "PASSIVE")
            if frames >= self._wal_restart_frames:
                await checkpointer.run(_locked, self._checkpoint_lock, _checkpoint, "PASSIVE")

    async def close(self) -> None:
        await self._close_beside()
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error):  # tidy, not needed: the WAL is replayed
                await self._writer.run(_locked, self._lock, _tidy)
            await self._writer.close()
        self._writer = None
        for lock in (self._lock, self._checkpoint_lock):
            if lock is not None:
                os.close(lock)
        self._lock = self._checkpoint_lock = None

    @property
    def _w(self) -> ThreadedConnection:
        if self._writer is None:
            raise RuntimeError("store is not open")
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    async def _fetchone(
        self, conn: aiosqlite.Connection, sql: str, params: Sequence[object] = ()
    ) -> sqlite3.Row | None:
        # One trip to SQLite's thread (execute, fetch and close in one call), not three.
        rows = await conn.execute_fetchall(sql, params)
        for row in rows:
            return row
        return None

    # -- writes ------------------------------------------------------------------------------

    async def _write(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        return await self._w.run(_locked, self._lock, fn, *args, **kwargs)

    async def write_batch(self, records: Sequence[Writable]) -> int:
        """Write records in one transaction; return how many were new (duplicates are skipped)."""
        return await self._write(_write_batch, records, self._search)

    async def import_records(
        self,
        batches: Iterable[Sequence[Importable]],
        accept: Callable[[], bool],
        chunk_rows: int | None = None,
    ) -> int:
        """Insert every batch; return how many were new. Duplicates (same caller and id) are
        skipped, so importing a file twice adds nothing the second time. If ``accept()`` is
        false at any point (the file had a bad line) or a write fails, nothing the import
        wrote stays (see ``_import``).

        ``batches`` is consumed on the writer's thread, so producing them never blocks the
        event loop. The import writes the file directly, in rollback-journal mode, when no
        other connection is on it (see ``_go_direct``): this store's reader and checkpointer
        are closed for it and reopened after, so its reads fail meanwhile and its other
        writes wait. With another connection on the file, it writes through the WAL.
        ``chunk_rows`` is the rows per transaction: by default ``IMPORT_CHUNK_DIRECT`` when
        direct, ``IMPORT_CHUNK`` through the WAL."""
        writer = self._w
        await self._close_beside()
        direct = False
        try:
            direct = await writer.run(_go_direct)
            if not direct:
                await self._open_beside()
            return await writer.run(  # not under the write lock: see the class docstring
                _import,
                batches,
                accept,
                chunk_rows or (IMPORT_CHUNK_DIRECT if direct else IMPORT_CHUNK),
                copy_beside=None if direct else self._copy_beside,
                cache_kib=IMPORT_CACHE_KIB,
                search=self._search,
            )
        finally:
            if direct:
                await writer.run(_leave_direct, self._synchronous)
            if self._reader is None:
                await self._open_beside()

    def _copy_beside(self) -> Future[int]:
        """A PASSIVE checkpoint on the checkpointer's thread, while the writer goes on."""
        if self._checkpointer is None:
            raise RuntimeError("store is not open")
        return self._checkpointer.submit(_checkpoint, "PASSIVE")

    async def probe_write(self) -> None:
        """A small real write, to tell whether a store that failed can write again."""
        await self._write(_probe)

    async def update_metadata(
        self, caller: str | None, completion_id: str, metadata: dict[str, str], actor: str
    ) -> StoredCompletion | None:
        """Replace the metadata map; the change (before and after) goes to the audit log."""
        encoded = _dump_metadata(metadata)
        completion = await self._write(
            _update_metadata, caller, completion_id, metadata, encoded, actor
        )
        return None if completion is None else StoredCompletion(completion_id, completion, encoded)

    async def delete(
        self, caller: str | None, completion_id: str, actor: str, *, purge: bool = True
    ) -> bool:
        """Delete a completion; with ``purge=False`` its row is kept in deleted_completions.

        Either way the deletion goes to the audit log, and the id keeps its place in the
        order (a tombstone) so paging with ``after=<deleted id>`` goes on.
        """
        return await self._write(_delete, caller, completion_id, actor, purge)

    # -- keys ------------------------------------------------------------------------------

    async def create_key(
        self, name: str, role: str, key_id: str, key_hash: bytes, *, actor: str = "cli"
    ) -> None:
        """Add a proxy key; raises ``KeyExists`` when the name is taken."""
        await self._write(_create_key, name, role, key_id, key_hash, actor)

    async def revoke_key(self, name: str, *, actor: str = "cli") -> bool:
        return await self._write(_revoke_key, name, actor)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._r.execute_fetchall(
            "SELECT name, key_id, role, created_at, revoked_at FROM proxy_keys ORDER BY name"
        )
        return [KeyRecord(*row) for row in rows]

    async def find_key(self, key_id: str) -> tuple[KeyRecord, bytes] | None:
        row = await self._fetchone(
            self._r,
            "SELECT name, key_id, role, created_at, revoked_at, key_hash FROM proxy_keys"
            " WHERE key_id = ?",
            (key_id,),
        )
        if row is None:
            return None
        return KeyRecord(*row[:5]), bytes(row[5])

    # -- retention ---------------------------------------------------------------------------

    def _size(self) -> int:
        return sum(
            Path(self.path + suffix).stat().st_size
            for suffix in ("", "-wal", "-shm")
            if Path(self.path + suffix).exists()
        )

    async def prune(self, before: int) -> PruneReport:
        """Delete everything created before ``before`` and give the space back to the disk.

        Deleted content is overwritten (``secure_delete``), the file is rebuilt (``VACUUM``)
        when a quarter or more of it is free, and the WAL is truncated, so neither the file
        nor the WAL keeps what was deleted.
        """
        bytes_before = self._size()
        completions, exchanges = await self._write(_prune, before)
        return PruneReport(completions, exchanges, bytes_before, self._size())

    async def setting(self, name: str, default: bytes) -> bytes:
        """The stored value of a setting, storing ``default`` first if there is none."""
        return await self._write(_setting, name, default)

    async def end_session(self, session_id: str, expires: float) -> None:
        await self._write(_end_session, session_id, expires)

    async def session_ended(self, session_id: str) -> bool:
        row = await self._fetchone(
            self._r, "SELECT 1 FROM ended_sessions WHERE sid = ?", (session_id,)
        )
        return row is not None

    # -- reads -------------------------------------------------------------------------------

    async def _one(
        self, columns: str, caller: str | None, completion_id: str
    ) -> sqlite3.Row | None:
        if caller is None:
            return await self._fetchone(
                self._r,
                f"SELECT {columns} FROM completions WHERE id = ? ORDER BY seq LIMIT 1",
                (completion_id,),
            )
        return await self._fetchone(
            self._r,
            f"SELECT {columns} FROM completions WHERE caller = ? AND id = ?",
            (caller, completion_id),
        )

    async def get(self, caller: str | None, completion_id: str) -> StoredCompletion | None:
        row = await self._one("id, completion, metadata", caller, completion_id)
        return None if row is None else StoredCompletion(row[0], row[1], row[2])

    async def request_of(self, caller: str | None, completion_id: str) -> bytes | None:
        row = await self._one("request", caller, completion_id)
        return None if row is None else bytes(row[0])

    async def _cursor(self, caller: str | None, after: str) -> tuple[int, int]:
        if caller is None:
            sql = (
                "SELECT created, seq FROM completions WHERE id = ?"
                " UNION ALL SELECT created, seq FROM tombstones WHERE id = ? LIMIT 1"
            )
            params: tuple[str, ...] = (after, after)
        else:
            sql = (
                "SELECT created, seq FROM completions WHERE caller = ? AND id = ?"
                " UNION ALL SELECT created, seq FROM tombstones WHERE caller = ? AND id = ?"
                " LIMIT 1"
            )
            params = (caller, after, caller, after)
        row = await self._fetchone(self._r, sql, params)
        if row is None:
            raise UnknownCursor(after)
        return row[0], row[1]

    async def list_completions(
        self, caller: str | None, query: ListQuery
    ) -> Page[StoredCompletion]:
        rows, has_more = await self._select_page(caller, query, _COLUMNS)
        items = [StoredCompletion(row[0], row[1], row[2]) for row in rows]
        return Page(items=items, has_more=has_more)

    async def log_entries(self, caller: str | None, query: ListQuery) -> Page[LogEntry]:
        rows, has_more = await self._select_page(caller, query, _LOG_COLUMNS)
        return Page(items=[_log_entry(row) for row in rows], has_more=has_more)

    async def log_entry(self, caller: str | None, completion_id: str) -> LogEntry | None:
        where = "c.id = ?" if caller is None else "c.caller = ? AND c.id = ?"
        params = (completion_id,) if caller is None else (caller, completion_id)
        row = await self._fetchone(
            self._r,
            f"SELECT {_LOG_COLUMNS} FROM completions c WHERE {where} ORDER BY c.seq LIMIT 1",
            params,
        )
        return None if row is None else _log_entry(row)

    async def _select_page(
        self, caller: str | None, query: ListQuery, columns: str
    ) -> tuple[list[Sequence[Any]], bool]:
        """The rows (``columns``) of one page and whether more follow."""
        page: PageQuery = query.page
        cursor = await self._cursor(caller, page.after) if page.after else None
        if query.owner is not None and caller not in (None, query.owner):
            return [], False
        scope = caller if query.owner is None else query.owner
        if query.search is not None:
            if not self._search:
                raise SearchOff
            match = fts5_query(query.search, filter_tags(scope, query.model, query.metadata))
            if match is None:
                return [], False
            sql, params = _search_sql(
                scope, query, match, None if cursor is None else cursor[1], columns
            )
            rows: list[Sequence[Any]] = list(await self._r.execute_fetchall(sql, params))
            has_more = len(rows) > page.limit
        elif scope is None:
            rows, has_more = await self._page_across_callers(query, cursor, columns)
        else:
            rows = []
            if len(query.metadata) > 1:  # first, the pair given first, a few entries of it
                walked = _walked_sql(
                    scope, query, cursor, page.order, page.limit, columns, FIRST_WALK
                )
                rows = list(await self._r.execute_fetchall(*walked))
            if len(rows) <= page.limit:  # not a full page yet: the whole of the rarest pair
                driver = await self._rarest(scope, query.metadata)
                sql, params = _page_sql(
                    scope, query, cursor, page.order, page.limit, driver=driver, columns=columns
                )
                rows = list(await self._r.execute_fetchall(sql, params))
            has_more = len(rows) > page.limit
        return rows[: page.limit], has_more

    async def _rarest(self, caller: str, pairs: Sequence[tuple[str, str]]) -> int:
        """The index of the pair with the fewest rows for ``caller`` (0 for fewer than two
        pairs). Walking it and checking the others costs its rows, not the first pair's:
        two pairs that each match thousands of rows but never the same one read only the
        rarer one's. Past ``RAREST_CAP`` rows pairs count as equal, and the first wins."""
        if len(pairs) < 2:
            return 0
        row = await self._fetchone(self._r, *_rarest_sql(caller, pairs))
        counts = list(row) if row is not None else [0]
        return counts.index(min(counts))

    async def _page_across_callers(
        self, query: ListQuery, cursor: tuple[int, int] | None, columns: str
    ) -> tuple[list[Sequence[Any]], bool]:
        """An admin's page: each caller's first keys, read from that caller's index, merged;
        then the rows of the page. One short index read per caller, however many rows."""
        page = query.page
        callers = [row[0] for row in await self._r.execute_fetchall(_CALLERS)]
        keys: list[tuple[int, int]] = []
        for start in range(0, len(callers), CALLERS_PER_READ):
            parts = [
                _page_sql(caller, query, cursor, page.order, page.limit, keys_only=True)
                for caller in callers[start : start + CALLERS_PER_READ]
            ]
            sql = " UNION ALL ".join(f"SELECT * FROM ({part})" for part, _ in parts)
            params = [param for _, part_params in parts for param in part_params]
            keys += [(row[0], row[1]) for row in await self._r.execute_fetchall(sql, params)]
        keys.sort(reverse=page.order == "desc")
        seqs = [seq for _, seq in keys[: page.limit]]
        found = {
            row[0]: row[1:]
            for row in await self._r.execute_fetchall(
                f"SELECT c.seq, {columns} FROM completions c"
                f" WHERE c.seq IN ({', '.join('?' * len(seqs))})",
                seqs,
            )
        }
        # A row deleted since its key was read is left out; the page is one shorter.
        return [found[seq] for seq in seqs if seq in found], len(keys) > page.limit

    async def list_exchanges(
        self, caller: str | None, page: PageQuery, *, outcome: str | None = None
    ) -> Page[ExchangeRecord]:
        """Audit records of exchanges that stored no completion, keyset-paged by request id."""
        where, params = (["caller = ?"], [caller]) if caller is not None else ([], [])
        if outcome is not None:
            where.append("outcome = ?")
            params.append(outcome)
        compare, direction = (">", "ASC") if page.order == "asc" else ("<", "DESC")
        if page.after:
            row = await self._fetchone(
                self._r, "SELECT created, seq FROM exchanges WHERE request_id = ?", (page.after,)
            )
            if row is None:
                raise UnknownCursor(page.after)
            where.append(f"(created, seq) {compare} (?, ?)")
            params += [row[0], row[1]]
        sql = (
            "SELECT request_id, caller, created, model, stream, outcome, status, request,"
            f" response, duration_ms FROM exchanges WHERE {' AND '.join(where) or '1'}"
            f" ORDER BY created {direction}, seq {direction} LIMIT ?"
        )
        async with self._r.execute(sql, [*params, page.limit + 1]) as result:
            rows = list(await result.fetchall())
        items = [
            ExchangeRecord(
                request_id=row[0],
                caller=row[1],
                created=row[2],
                model=row[3],
                stream=bool(row[4]),
                outcome=row[5],
                status=row[6],
                request=bytes(row[7]),
                response=None if row[8] is None else bytes(row[8]),
                duration_ms=row[9],
            )
            for row in rows[: page.limit]
        ]
        return Page(items=items, has_more=len(rows) > page.limit)

    async def audit_entries(self, after: int, limit: int) -> list[AuditEntry]:
        """The audit log from ``after`` (a seq), oldest first."""
        async with self._r.execute(
            "SELECT seq, at, actor, action, completion_id, owner, detail FROM audit_log"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ) as cursor:
            return [
                AuditEntry(row[0], row[1], row[2], row[3], row[4], row[5], bytes(row[6]))
                async for row in cursor
            ]

    async def usage(
        self, since: int | None, until: int | None, group_by: Sequence[str]
    ) -> list[UsageRow]:
        """Completions and tokens summed per group (any of caller, model, day).

        Bounds on whole UTC days (or none) are read from ``usage_by_day``, which the
        completions' triggers keep (m011): a few rows per day, however many completions.
        Other bounds sum the completions themselves."""
        if all(bound is None or bound % 86400 == 0 for bound in (since, until)):
            return await self._usage_by_day(since, until, group_by)
        columns = [_GROUPS[name] for name in group_by]
        where, params = ["1"], []
        if since is not None or until is not None:  # a range of each caller's order index
            where.append(f"caller IN ({_CALLERS})")
        if since is not None:
            where.append("created >= ?")
            params.append(since)
        if until is not None:
            where.append("created < ?")
            params.append(until)
        sql = UsageRow.sql(
            columns,
            "count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(cached_tokens), 0),"
            " coalesce(sum(completion_tokens), 0)",
            f"completions WHERE {' AND '.join(where)}",
        )
        async with self._r.execute(sql, params) as cursor:
            rows = list(await cursor.fetchall())
        return UsageRow.rows_of(rows, group_by)

    async def _usage_by_day(
        self, since: int | None, until: int | None, group_by: Sequence[str]
    ) -> list[UsageRow]:
        columns = list(group_by)
        where, params = ["1"], []
        if since is not None:
            where.append("day >= date(?, 'unixepoch')")
            params.append(since)
        if until is not None:
            where.append("day < date(?, 'unixepoch')")
            params.append(until)
        sql = UsageRow.sql(
            columns,
            "coalesce(sum(completions), 0), coalesce(sum(prompt_tokens), 0),"
            " coalesce(sum(cached_tokens), 0), coalesce(sum(completion_tokens), 0)",
            f"usage_by_day WHERE {' AND '.join(where)}",
        )
        rows = await self._r.execute_fetchall(sql, params)
        return UsageRow.rows_of(rows, group_by)

    async def recordings(self, request_key: str, caller: str | None) -> list[bytes]:
        """Stored completions made for requests with this key, oldest first."""
        if caller is None:
            sql = "SELECT completion FROM completions WHERE request_key = ? ORDER BY seq LIMIT 1000"
            params: tuple[str, ...] = (request_key,)
        else:
            sql = (
                "SELECT completion FROM completions WHERE request_key = ? AND caller = ?"
                " ORDER BY seq LIMIT 1000"
            )
            params = (request_key, caller)
        async with self._r.execute(sql, params) as cursor:
            return [bytes(row[0]) async for row in cursor]

    async def export(self, where: ExportFilter) -> AsyncIterator[list[CompletionRecord]]:
        """Every stored completion matching ``where``, in insertion order, a batch at a time."""
        clauses = ["1"]
        params: list[object] = []
        if where.model is not None:
            clauses.append("model = ?")
            params.append(where.model)
        if where.since is not None:
            clauses.append("created >= ?")
            params.append(where.since)
        if where.until is not None:
            clauses.append("created < ?")
            params.append(where.until)
        for key, value in where.metadata:
            clauses.append(f"EXISTS ({_PAIR_OF.format(row='completions')})")
            params += [key, value]
        sql = (
            "SELECT id, caller, created, model, metadata, completion, request, request_id,"
            " stream, outcome, duration_ms, request_key, stored_at, prompt_tokens,"
            " cached_tokens, completion_tokens FROM completions"
            f" WHERE {' AND '.join(clauses)} ORDER BY seq"
        )
        async with self._r.execute(sql, params) as cursor:
            # The next batch is read (in SQLite's thread) while this one is being written out.
            ahead = asyncio.ensure_future(cursor.fetchmany(2000))
            while rows := await ahead:
                ahead = asyncio.ensure_future(cursor.fetchmany(2000))
                yield [
                    CompletionRecord(
                        id=row[0],
                        caller=row[1],
                        created=row[2],
                        model=row[3],
                        metadata=orjson.loads(row[4]),
                        completion=bytes(row[5]),
                        request=bytes(row[6]),
                        request_id=row[7],
                        stream=bool(row[8]),
                        outcome=row[9],
                        duration_ms=row[10],
                        request_key=row[11],
                        stored_at=row[12],
                        prompt_tokens=row[13],
                        cached_tokens=row[14],
                        completion_tokens=row[15],
                    )
                    for row in rows
                ]

    async def explain_list(
        self, caller: str, query: ListQuery, *, keys_only: bool = False
    ) -> list[str]:
        """SQLite's plan for a list query, so tests can prove it reads indexes, not the table."""
        cursor = (0, 0) if query.page.after else None
        driver = await self._rarest(caller, query.metadata)
        sql, params = _page_sql(caller, query, cursor, "asc", 1, keys_only=keys_only, driver=driver)
        async with self._r.execute("EXPLAIN QUERY PLAN " + sql, params) as result:
            return [str(row[3]) async for row in result]
