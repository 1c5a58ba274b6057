"""Where completions live: the ``Store`` interface and its SQLite implementation.

Everything SQL and SQLite-specific stays in ``SQLiteStore``, so a PostgreSQL store (several
proxy instances sharing one database) can implement the same interface.

SQLite specifics:
- WAL journal; one write connection, one read connection. Writes take ``BEGIN IMMEDIATE``
  under one lock, so batches, updates and deletes never interleave.
- ``synchronous=NORMAL`` by default: a commit survives the proxy being killed (``kill -9``)
  but the last commits may be lost on power failure; ``store.synchronous: full`` closes that
  at the cost of an fsync per batch.
- Pages are keyset-paginated on ``(created, seq)``: a stable total order, so pages never skip
  or repeat, and every list is an index range read.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosqlite
import orjson

from proxy.assemble import with_metadata
from proxy.migrations import migrate
from proxy.models import ListQuery, Order, PageQuery


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One captured completion, ready to be written."""

    id: str
    caller: str
    created: int
    model: str
    metadata: dict[str, str]
    completion: bytes  # the stored chat.completion JSON, without metadata
    request: bytes  # the client's request body, as sent
    request_id: str | None
    stream: bool
    outcome: str
    duration_ms: float | None = None
    request_key: str | None = None  # what replay matches on (see replay.request_key)
    stored_at: float | None = None  # set on import; now when None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ExchangeRecord:
    """An exchange that ended without a stored completion (failed, aborted), kept for audit."""

    request_id: str
    caller: str
    created: int
    model: str
    stream: bool
    outcome: str
    status: int | None
    request: bytes
    response: bytes | None  # the error body or the partial answer, capped
    duration_ms: float | None


Writable = CompletionRecord | ExchangeRecord


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    key_id: str
    role: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class UsageRow:
    group: dict[str, str]
    completions: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class PruneReport:
    completions: int
    exchanges: int
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True, slots=True)
class ExportFilter:
    model: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    since: int | None = None  # created >= since
    until: int | None = None  # created < until


@dataclass(frozen=True, slots=True)
class Page:
    items: list[tuple[str, bytes]]  # (id, API JSON)
    has_more: bool


class UnknownCursor(LookupError):
    """``after`` names an id this caller never had."""


class KeyExists(ValueError):
    """A proxy key with this name exists already."""


class _Rejected(Exception):
    """An import whose file had bad lines: the transaction is rolled back."""


class Store(Protocol):
    """The store. ``caller=None`` means every caller's records (an admin's view)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def write_batch(self, records: Sequence[Writable]) -> int: ...
    async def probe_write(self) -> None: ...
    async def get(self, caller: str | None, completion_id: str) -> bytes | None: ...
    async def request_of(self, caller: str | None, completion_id: str) -> bytes | None: ...
    async def list_completions(self, caller: str | None, query: ListQuery) -> Page: ...
    async def update_metadata(
        self, caller: str | None, completion_id: str, metadata: dict[str, str], actor: str
    ) -> bytes | None: ...
    async def delete(
        self, caller: str | None, completion_id: str, actor: str, *, purge: bool = True
    ) -> bool: ...
    async def list_exchanges(self, caller: str | None, page: PageQuery) -> Page: ...
    async def audit_entries(self, after: int, limit: int) -> list[bytes]: ...
    async def create_key(self, name: str, role: str, key_id: str, key_hash: bytes) -> None: ...
    async def revoke_key(self, name: str) -> bool: ...
    async def list_keys(self) -> list[KeyRecord]: ...
    async def find_key(self, key_id: str) -> tuple[KeyRecord, bytes] | None: ...
    async def usage(
        self, since: int | None, until: int | None, group_by: Sequence[str]
    ) -> list[UsageRow]: ...
    async def prune(self, before: int) -> PruneReport: ...
    async def setting(self, name: str, default: bytes) -> bytes: ...
    async def recordings(self, request_key: str, caller: str | None) -> list[bytes]: ...
    def export(self, where: ExportFilter) -> AsyncIterator[list[CompletionRecord]]: ...
    async def import_records(
        self, batches: AsyncIterable[Sequence[CompletionRecord]], accept: Callable[[], bool]
    ) -> int: ...


_INSERT_COMPLETION = """
INSERT INTO completions (
    seq, id, caller, created, model, metadata, completion, request,
    request_id, stream, outcome, stored_at, duration_ms, request_key,
    prompt_tokens, cached_tokens, completion_tokens
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (caller, id) DO NOTHING
"""

# Inserted through the completion row so a completion skipped as a duplicate gets no pairs.
_INSERT_METADATA = """
INSERT INTO completion_metadata (seq, key, value, caller, created)
SELECT seq, ?, ?, caller, created FROM completions WHERE seq = ? AND caller = ? AND id = ?
"""

_INSERT_EXCHANGE = """
INSERT INTO exchanges (
    request_id, caller, created, model, stream, outcome, status, request, response, duration_ms
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_COLUMNS = "c.id, c.completion, c.metadata, c.created, c.seq"

# Columns a soft delete copies into deleted_completions (named: the tables may drift).
_KEPT = (
    "seq, id, caller, created, model, metadata, completion, request, request_id, stream,"
    " outcome, stored_at, duration_ms, request_key, prompt_tokens, cached_tokens,"
    " completion_tokens"
)

CHECKPOINT_INTERVAL = 0.5  # seconds between WAL checkpoints while there are writes

_GROUPS = {"caller": "caller", "model": "model", "day": "date(created, 'unixepoch')"}


def _dump_metadata(metadata: dict[str, str]) -> bytes:
    return orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS)


def _page_sql(
    caller: str | None, query: ListQuery, cursor: tuple[int, int] | None, order: Order, limit: int
) -> tuple[str, list[object]]:
    """One keyset page as SQL: driven by the first metadata pair's index when filtering."""
    direction = "ASC" if order == "asc" else "DESC"
    compare = ">" if order == "asc" else "<"
    params: list[object] = []
    where: list[str] = []
    if query.metadata:
        (key, value), rest = query.metadata[0], query.metadata[1:]
        source = "completion_metadata m CROSS JOIN completions c ON c.seq = m.seq"
        if caller is not None:
            where.append("m.caller = ?")
            params.append(caller)
        where.append("m.key = ? AND m.value = ?")
        params += [key, value]
        keys = "m.created, m.seq"
        for key, value in rest:
            where.append(
                "EXISTS (SELECT 1 FROM completion_metadata x"
                " WHERE x.seq = c.seq AND x.key = ? AND x.value = ?)"
            )
            params += [key, value]
    else:
        source = "completions c"
        if caller is not None:
            where.append("c.caller = ?")
            params.append(caller)
        keys = "c.created, c.seq"
    if query.model is not None:
        where.append("c.model = ?")
        params.append(query.model)
    if query.owner is not None:
        where.append("c.caller = ?")
        params.append(query.owner)
    if cursor is not None:
        where.append(f"({keys}) {compare} (?, ?)")
        params += list(cursor)
    first, second = keys.split(", ")
    sql = (
        f"SELECT {_COLUMNS} FROM {source} WHERE {' AND '.join(where) or '1'}"
        f" ORDER BY {first} {direction}, {second} {direction} LIMIT ?"
    )
    params.append(limit + 1)
    return sql, params


class SQLiteStore:
    """The SQLite store: one file, WAL, one writer connection and one reader connection."""

    def __init__(
        self, path: str | Path, *, synchronous: str = "normal", max_bytes: int | None = None
    ) -> None:
        self.path = str(path)
        self._synchronous = synchronous.upper()
        self._max_bytes = max_bytes
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._written = False
        self._write_lock = asyncio.Lock()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute("PRAGMA busy_timeout = 5000")
        await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        await conn.execute("PRAGMA cache_size = -16384")  # 16 MiB: index pages stay cached
        # Deleted content is overwritten, not left in free pages: deleted means gone.
        await conn.execute("PRAGMA secure_delete = ON")
        if self._max_bytes is not None:
            # A size cap: past it writes fail with SQLITE_FULL, exactly as on a full disk.
            row = await self._fetchone(conn, "PRAGMA page_size")
            page_size = row[0] if row else 4096
            pages = max(1, self._max_bytes // page_size)
            await self._fetchone(conn, f"PRAGMA max_page_count = {pages}")  # answers a row
        return conn

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        await self._writer.execute("PRAGMA journal_mode = WAL")
        # Checkpoints run on their own connection (below), not inside the writer's commits,
        # where they cost about 40% of write throughput. The WAL file is cut back to 64 MiB
        # after a checkpoint that catches up.
        await self._fetchone(self._writer, "PRAGMA wal_autocheckpoint = 0")
        await self._fetchone(self._writer, "PRAGMA journal_size_limit = 67108864")
        await migrate(self._writer)
        self._reader = await self._connect()
        self._checkpointer = await self._connect()
        self._checkpoints = asyncio.create_task(self._checkpoint_forever(), name="wal-checkpoint")

    async def _checkpoint_forever(self) -> None:
        """Copy committed pages from the WAL into the database, beside the writer.

        PASSIVE never waits for or blocks the writer or readers; whatever it cannot copy yet
        is copied next time. The WAL keeps every commit durable meanwhile (kill -9 replays it).
        """
        assert self._checkpointer is not None
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            if self._written:
                self._written = False
                await self._fetchone(self._checkpointer, "PRAGMA wal_checkpoint(PASSIVE)")

    async def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            self._checkpoints = None
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error):  # tidy, not needed: the WAL is replayed
                await self._fetchone(self._writer, "PRAGMA wal_checkpoint(TRUNCATE)")
        for conn in (self._checkpointer, self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._checkpointer = self._reader = self._writer = None

    @property
    def _w(self) -> aiosqlite.Connection:
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

    async def _insert(self, conn: aiosqlite.Connection, records: Sequence[CompletionRecord]) -> int:
        """Insert inside the caller's transaction; return how many were new."""
        row = await self._fetchone(conn, "SELECT coalesce(max(seq), 0) FROM completions")
        base = row[0] if row else 0
        now = time.time()
        rows = []
        pairs = []
        for offset, record in enumerate(records, 1):
            seq = base + offset
            rows.append(
                (
                    seq,
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
            )
            pairs += [
                (key, value, seq, record.caller, record.id)
                for key, value in record.metadata.items()
            ]
        before = conn.total_changes
        await conn.executemany(_INSERT_COMPLETION, rows)
        inserted = conn.total_changes - before
        if pairs:
            await conn.executemany(_INSERT_METADATA, pairs)
        return inserted

    async def write_batch(self, records: Sequence[Writable]) -> int:
        """Write records in one transaction; return how many were new (duplicates are skipped)."""
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
        async with self._transaction() as conn:
            inserted = await self._insert(conn, completions) if completions else 0
            if exchanges:
                await conn.executemany(_INSERT_EXCHANGE, exchanges)
                inserted += len(exchanges)
        return inserted

    async def import_records(
        self, batches: AsyncIterable[Sequence[CompletionRecord]], accept: Callable[[], bool]
    ) -> int:
        """Insert everything in one transaction, committed only if ``accept()`` says so at the
        end: an import with a bad line leaves nothing half-written. Duplicates (same caller
        and id) are skipped, so importing a file twice adds nothing the second time."""
        inserted = 0
        try:
            async with self._transaction() as conn:
                async for batch in batches:
                    inserted += await self._insert(conn, batch)
                if not accept():
                    raise _Rejected
        except _Rejected:
            return 0
        return inserted

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """The writer connection inside ``BEGIN IMMEDIATE`` under the write lock: committed when
        the block ends, rolled back when it raises. A block that writes nothing commits nothing.
        """
        conn = self._w
        async with self._write_lock:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await self._rollback(conn)
                raise
            await conn.execute("COMMIT")
            self._written = True

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        # SQLite may have rolled back already (SQLITE_FULL ends the transaction).
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")

    async def probe_write(self) -> None:
        """A small real write, to tell whether a store that failed can write again."""
        async with self._write_lock:
            await self._w.execute(
                "INSERT INTO settings (name, value) VALUES ('probe', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(time.time()).encode(),),
            )

    async def _audit(  # noqa: PLR0917 - one row's columns, in the table's order
        self,
        conn: aiosqlite.Connection,
        actor: str,
        action: str,
        completion_id: str | None,
        owner: str | None,
        detail: dict[str, object],
    ) -> None:
        await conn.execute(
            "INSERT INTO audit_log (at, actor, action, completion_id, owner, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), actor, action, completion_id, owner, orjson.dumps(detail)),
        )

    async def _locate(
        self, conn: aiosqlite.Connection, caller: str | None, completion_id: str
    ) -> sqlite3.Row | None:
        """(seq, caller, created, metadata) of a completion this caller may see."""
        if caller is None:
            return await self._fetchone(
                conn,
                "SELECT seq, caller, created, metadata FROM completions WHERE id = ?"
                " ORDER BY seq LIMIT 1",
                (completion_id,),
            )
        return await self._fetchone(
            conn,
            "SELECT seq, caller, created, metadata FROM completions WHERE caller = ? AND id = ?",
            (caller, completion_id),
        )

    async def update_metadata(
        self, caller: str | None, completion_id: str, metadata: dict[str, str], actor: str
    ) -> bytes | None:
        """Replace the metadata map; the change (before and after) goes to the audit log."""
        encoded = _dump_metadata(metadata)
        async with self._transaction() as conn:
            found = await self._locate(conn, caller, completion_id)
            if found is None:
                return None
            seq, owner, created, before = found
            row = await self._fetchone(
                conn,
                "UPDATE completions SET metadata = ? WHERE seq = ? RETURNING completion",
                (encoded, seq),
            )
            assert row is not None
            await conn.execute("DELETE FROM completion_metadata WHERE seq = ?", (seq,))
            await conn.executemany(
                "INSERT INTO completion_metadata (seq, key, value, caller, created)"
                " VALUES (?, ?, ?, ?, ?)",
                [(seq, k, v, owner, created) for k, v in metadata.items()],
            )
            await self._audit(
                conn,
                actor,
                "update_metadata",
                completion_id,
                owner,
                {"before": orjson.loads(before), "after": metadata},
            )
        return with_metadata(row[0], encoded)

    async def delete(
        self, caller: str | None, completion_id: str, actor: str, *, purge: bool = True
    ) -> bool:
        """Delete a completion; with ``purge=False`` its row is kept in deleted_completions.

        Either way the deletion goes to the audit log, and the id keeps its place in the
        order (a tombstone) so paging with ``after=<deleted id>`` goes on.
        """
        async with self._transaction() as conn:
            found = await self._locate(conn, caller, completion_id)
            if found is None:
                return False
            seq, owner, created, metadata = found
            if not purge:
                await conn.execute(
                    f"INSERT INTO deleted_completions ({_KEPT}, deleted_at, deleted_by)"
                    f" SELECT {_KEPT}, ?, ? FROM completions WHERE seq = ?",
                    (time.time(), actor, seq),
                )
            await conn.execute("DELETE FROM completions WHERE seq = ?", (seq,))
            await conn.execute("DELETE FROM completion_metadata WHERE seq = ?", (seq,))
            await conn.execute(
                "INSERT OR REPLACE INTO tombstones (caller, id, created, seq, deleted_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (owner, completion_id, created, seq, time.time()),
            )
            await self._audit(
                conn,
                actor,
                "delete",
                completion_id,
                owner,
                {"metadata": orjson.loads(metadata), "content_purged": purge},
            )
        return True

    # -- keys ------------------------------------------------------------------------------

    async def create_key(self, name: str, role: str, key_id: str, key_hash: bytes) -> None:
        """Add a proxy key; raises ``KeyExists`` when the name is taken."""
        async with self._transaction() as conn:
            taken = await self._fetchone(conn, "SELECT 1 FROM proxy_keys WHERE name = ?", (name,))
            if taken is not None:
                raise KeyExists(name)
            await conn.execute(
                "INSERT INTO proxy_keys (name, key_id, key_hash, role, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, key_id, key_hash, role, time.time()),
            )
            await self._audit(conn, "cli", "key_created", None, name, {"role": role})

    async def revoke_key(self, name: str) -> bool:
        async with self._transaction() as conn:
            row = await self._fetchone(
                conn,
                "UPDATE proxy_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL"
                " RETURNING name",
                (time.time(), name),
            )
            if row is not None:
                await self._audit(conn, "cli", "key_revoked", None, name, {})
        return row is not None

    async def list_keys(self) -> list[KeyRecord]:
        async with self._r.execute(
            "SELECT name, key_id, role, created_at, revoked_at FROM proxy_keys ORDER BY name"
        ) as cursor:
            return [KeyRecord(*row) async for row in cursor]

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
        async with self._transaction() as conn:
            await conn.execute(
                "DELETE FROM completion_metadata WHERE seq IN"
                " (SELECT seq FROM completions WHERE created < ?)",
                (before,),
            )
            cursor = await conn.execute("DELETE FROM completions WHERE created < ?", (before,))
            completions = cursor.rowcount
            cursor = await conn.execute("DELETE FROM exchanges WHERE created < ?", (before,))
            exchanges = cursor.rowcount
            await conn.execute("DELETE FROM tombstones WHERE created < ?", (before,))
            await conn.execute("DELETE FROM deleted_completions WHERE created < ?", (before,))
            if completions or exchanges:
                await self._audit(
                    conn,
                    "retention",
                    "prune",
                    None,
                    None,
                    {"before": before, "completions": completions, "exchanges": exchanges},
                )
        async with self._write_lock:  # outside any transaction: VACUUM cannot run in one
            conn = self._w
            free = await self._fetchone(conn, "PRAGMA freelist_count")
            total = await self._fetchone(conn, "PRAGMA page_count")
            await self._fetchone(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
            if free and total and free[0] * 4 >= total[0]:
                await conn.execute("VACUUM")
                await self._fetchone(conn, "PRAGMA wal_checkpoint(TRUNCATE)")
        return PruneReport(completions, exchanges, bytes_before, self._size())

    async def setting(self, name: str, default: bytes) -> bytes:
        """The stored value of a setting, storing ``default`` first if there is none."""
        conn = self._w
        async with self._write_lock:
            await conn.execute(
                "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (name, default),
            )
            row = await self._fetchone(conn, "SELECT value FROM settings WHERE name = ?", (name,))
        assert row is not None
        value: bytes = row[0]
        return value

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

    async def get(self, caller: str | None, completion_id: str) -> bytes | None:
        row = await self._one("completion, metadata", caller, completion_id)
        return None if row is None else with_metadata(row[0], row[1])

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

    async def list_completions(self, caller: str | None, query: ListQuery) -> Page:
        page: PageQuery = query.page
        cursor = await self._cursor(caller, page.after) if page.after else None
        sql, params = _page_sql(caller, query, cursor, page.order, page.limit)
        async with self._r.execute(sql, params) as result:
            rows = list(await result.fetchall())
        items = [(row[0], with_metadata(row[1], row[2])) for row in rows[: page.limit]]
        return Page(items=items, has_more=len(rows) > page.limit)

    async def list_exchanges(self, caller: str | None, page: PageQuery) -> Page:
        """Audit records of exchanges that stored no completion, keyset-paged by request id."""
        where, params = (["caller = ?"], [caller]) if caller is not None else ([], [])
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
        items = []
        for row in rows[: page.limit]:
            response = row[8]
            items.append(
                (
                    row[0],
                    orjson.dumps(
                        {
                            "object": "exchange",
                            "request_id": row[0],
                            "caller": row[1],
                            "created": row[2],
                            "model": row[3],
                            "stream": bool(row[4]),
                            "outcome": row[5],
                            "status": row[6],
                            "request": orjson.Fragment(row[7]),
                            "response": None
                            if response is None
                            else bytes(response).decode("utf-8", "replace"),
                            "duration_ms": row[9],
                        }
                    ),
                )
            )
        return Page(items=items, has_more=len(rows) > page.limit)

    async def audit_entries(self, after: int, limit: int) -> list[bytes]:
        """The audit log from ``after`` (a seq), oldest first, each entry as JSON."""
        async with self._r.execute(
            "SELECT seq, at, actor, action, completion_id, owner, detail FROM audit_log"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ) as cursor:
            return [
                orjson.dumps(
                    {
                        "seq": row[0],
                        "at": row[1],
                        "actor": row[2],
                        "action": row[3],
                        "completion_id": row[4],
                        "owner": row[5],
                        "detail": orjson.Fragment(row[6]),
                    }
                )
                async for row in cursor
            ]

    async def usage(
        self, since: int | None, until: int | None, group_by: Sequence[str]
    ) -> list[UsageRow]:
        """Completions and tokens summed per group (any of caller, model, day)."""
        columns = [_GROUPS[name] for name in group_by]
        where, params = ["1"], []
        if since is not None:
            where.append("created >= ?")
            params.append(since)
        if until is not None:
            where.append("created < ?")
            params.append(until)
        selected = ", ".join([*columns, ""]) if columns else ""
        grouping = (
            f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}" if columns else ""
        )
        sql = (
            f"SELECT {selected}count(*), coalesce(sum(prompt_tokens), 0),"
            " coalesce(sum(cached_tokens), 0), coalesce(sum(completion_tokens), 0)"
            f" FROM completions WHERE {' AND '.join(where)}{grouping}"
        )
        async with self._r.execute(sql, params) as cursor:
            rows = list(await cursor.fetchall())
        width = len(columns)
        return [
            UsageRow(
                group={name: str(row[i]) for i, name in enumerate(group_by)},
                completions=row[width],
                prompt_tokens=row[width + 1],
                cached_tokens=row[width + 2],
                completion_tokens=row[width + 3],
            )
            for row in rows
            if row[width]
        ]

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
            clauses.append(
                "EXISTS (SELECT 1 FROM completion_metadata m"
                " WHERE m.seq = completions.seq AND m.key = ? AND m.value = ?)"
            )
            params += [key, value]
        sql = (
            "SELECT id, caller, created, model, metadata, completion, request, request_id,"
            " stream, outcome, duration_ms, request_key, stored_at FROM completions"
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
                    )
                    for row in rows
                ]

    async def explain_list(self, caller: str, query: ListQuery) -> list[str]:
        """SQLite's plan for a list query, so tests can prove it reads indexes, not the table."""
        sql, params = _page_sql(caller, query, (0, 0) if query.page.after else None, "asc", 1)
        async with self._r.execute("EXPLAIN QUERY PLAN " + sql, params) as result:
            return [str(row[3]) async for row in result]
