"""The SQLite store's writes: each function is one whole transaction (or, for an import, a
series of them) that ``SQLiteStore`` runs on its writer's thread, given the writer's
connection. Also what an insert derives from a completion (``derive``), which an import's
parse workers compute before the rows reach the writer."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, cast

import orjson

from proxy.store.errors import KeyExists
from proxy.store.records import (
    CompletionRecord,
    ExchangeRecord,
    Importable,
    Prepared,
    Writable,
    encode_metadata,
)
from proxy.store.signature import signature
from proxy.store.sqlite.queries import CALLERS
from proxy.store.sqlite.search import merge_step
from proxy.store.text import filter_tags, searchable


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

# Columns a soft delete copies into deleted_completions (named: the tables may drift).
_KEPT = (
    "seq, id, caller, created, model, metadata, completion, request, request_id, stream,"
    " outcome, stored_at, duration_ms, request_key, prompt_tokens, cached_tokens,"
    " completion_tokens"
)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
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


def fetchone(conn: sqlite3.Connection, sql: str, params: Sequence[object] = ()) -> Any:
    return conn.execute(sql, params).fetchone()


def _last_seq(conn: sqlite3.Connection) -> int:
    """The largest seq ever given to a completion (AUTOINCREMENT's counter: a deleted
    completion's seq is never given again)."""
    row = fetchone(conn, "SELECT seq FROM sqlite_sequence WHERE name = 'completions'")
    return 0 if row is None else int(row[0])


def _columns(record: CompletionRecord, now: float) -> tuple[Any, ...]:
    """``record`` as the insert takes it; ``now`` is its stored_at unless it has one."""
    return (
        record.id,
        record.caller,
        record.created,
        record.model,
        encode_metadata(record.metadata),
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


def derive(record: CompletionRecord, search: bool = True) -> Derived:
    """What the insert computes from a completion (``Store.derive``): its metadata's
    signature and, with search on, its searchable text and filter tags (None, None with
    search off: the completion then goes to the backlog)."""
    items = record.metadata.items()
    if not search:
        return signature(items), None, None
    return (
        signature(items),
        searchable(record.request, record.completion, record.parsed),
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
        record, derived = item if isinstance(item, Prepared) else (item, derive(item, search))
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


def write_batch(conn: sqlite3.Connection, records: Sequence[Writable], search: bool) -> int:
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
    with transaction(conn):
        now = time.time()
        inserted = _insert(conn, completions, now, search) if completions else 0
        if exchanges:
            conn.executemany(_INSERT_EXCHANGE, exchanges)
            inserted += len(exchanges)
    return inserted


def import_chunks(
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
    rollback-journal mode (see ``go_direct``) and pages go straight to the database; the
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
    cache_size = fetchone(conn, "PRAGMA cache_size")[0]
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
            with transaction(conn):
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
                checkpoint(conn, "PASSIVE")
            elif copying is None:
                copying = copy_beside()
            else:
                copying.result()
                copying = None
                checkpoint(conn, "PASSIVE")
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


def go_direct(conn: sqlite3.Connection) -> bool:
    """Switch the file to a rollback journal for an import, if no other connection is on it.

    In WAL mode every new page is written twice, to the WAL and then to the database; with a
    rollback journal it is written once (only the pages a transaction changes are copied to
    the journal first). Leaving WAL needs the
    file to itself, so with another connection open (a running proxy, an export) this returns
    False at once and the import stays in WAL. ``synchronous = FULL`` while direct: with a
    rollback journal, NORMAL can lose more than the last commit on power failure.
    """
    busy = fetchone(conn, "PRAGMA busy_timeout")[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        mode = fetchone(conn, "PRAGMA journal_mode = DELETE")[0]
    except sqlite3.OperationalError:  # locked: another connection has the file open
        return False
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy)}")
    if mode != "delete":  # an in-memory database keeps its own journal
        return False
    conn.execute("PRAGMA synchronous = FULL")
    return True


def leave_direct(conn: sqlite3.Connection, synchronous: str) -> None:
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
    with transaction(conn):
        for first, last in taken:
            conn.execute(_DELETE_METADATA.format(rows="c.seq BETWEEN ? AND ?"), (first, last))
            conn.execute("DELETE FROM completions WHERE seq BETWEEN ? AND ?", (first, last))


def probe(conn: sqlite3.Connection) -> None:
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
        return fetchone(
            conn,
            "SELECT seq, caller, created, metadata FROM completions WHERE id = ?"
            " ORDER BY seq LIMIT 1",
            (completion_id,),
        )
    return fetchone(
        conn,
        "SELECT seq, caller, created, metadata FROM completions WHERE caller = ? AND id = ?",
        (caller, completion_id),
    )


def update_metadata(  # noqa: PLR0917 - the operation's arguments, in order
    conn: sqlite3.Connection,
    caller: str | None,
    completion_id: str,
    metadata: dict[str, str],
    encoded: bytes,
    actor: str,
) -> bytes | None:
    with transaction(conn):
        found = _locate(conn, caller, completion_id)
        if found is None:
            return None
        seq, owner, created, before = found
        sig = signature(metadata.items())
        # The old pairs are found from the metadata column, so they go before it changes.
        conn.execute(_DELETE_METADATA.format(rows="c.seq = ?"), (seq,))
        # The search index's tags follow (the completions_search_update trigger).
        row = fetchone(
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


def delete(
    conn: sqlite3.Connection, caller: str | None, completion_id: str, actor: str, purge: bool
) -> bool:
    with transaction(conn):
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


def create_key(  # noqa: PLR0917 - the operation's arguments, in order
    conn: sqlite3.Connection, name: str, role: str, key_id: str, key_hash: bytes, actor: str
) -> None:
    with transaction(conn):
        if fetchone(conn, "SELECT 1 FROM proxy_keys WHERE name = ?", (name,)) is not None:
            raise KeyExists(name)
        conn.execute(
            "INSERT INTO proxy_keys (name, key_id, key_hash, role, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (name, key_id, key_hash, role, time.time()),
        )
        _audit(conn, actor, "key_created", None, name, {"role": role})


def revoke_key(conn: sqlite3.Connection, name: str, actor: str) -> bool:
    with transaction(conn):
        row = fetchone(
            conn,
            "UPDATE proxy_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"
            " RETURNING name",
            (time.time(), name),
        )
        if row is not None:
            _audit(conn, actor, "key_revoked", None, name, {})
    return row is not None


def prune(conn: sqlite3.Connection, before: int) -> tuple[int, int]:
    with transaction(conn):
        # Caller by caller: the rows before ``before`` are a range of each one's order index.
        old = f"caller IN ({CALLERS}) AND created < ?"
        conn.execute(
            _DELETE_METADATA.format(rows=f"c.caller IN ({CALLERS}) AND c.created < ?"), (before,)
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
    free = fetchone(conn, "PRAGMA freelist_count")[0]
    total = fetchone(conn, "PRAGMA page_count")[0]
    checkpoint(conn, "TRUNCATE")
    if total and free * 4 >= total:
        conn.execute("VACUUM")
        checkpoint(conn, "TRUNCATE")
    return completions, exchanges


def end_session(conn: sqlite3.Connection, session_id: str, expires: float) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM ended_sessions WHERE expires < ?", (time.time(),))
        conn.execute(
            "INSERT OR REPLACE INTO ended_sessions (sid, expires) VALUES (?, ?)",
            (session_id, expires),
        )


def setting(conn: sqlite3.Connection, name: str, default: bytes) -> bytes:
    conn.execute(
        "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (name, default),
    )
    value: bytes = fetchone(conn, "SELECT value FROM settings WHERE name = ?", (name,))[0]
    return value


def checkpoint(conn: sqlite3.Connection, mode: str) -> int:
    """Run a checkpoint; return how many frames the WAL holds (-1 when none is in use)."""
    frames: int = fetchone(conn, f"PRAGMA wal_checkpoint({mode})")[1]
    return frames
