"""The PostgreSQL store: ``PostgresStore`` implements ``proxy.store.Store`` on one database that
several proxy instances share.

- A connection pool (asyncpg). Every write is one transaction; a batch from the writer is a
  single statement (``queries.WRITE_BATCH``), or two for a large batch (see ``write_batch``),
  and its search documents travel as binary ``tsvector`` values (``search.TSVECTOR_CODEC``).
- Every statement runs under ``statement_timeout`` and every connection attempt under the
  connect timeout, so a stuck or unreachable database turns into a ``StoreError`` in bounded
  time rather than a hung client.
- ``seq`` comes from an identity sequence shared by all instances: replay order and the list
  order's tie-break are the same through every instance.
- Retention takes a transaction-level advisory lock, so one instance prunes at a time; the
  others skip that run.
- Imports run in one transaction (chunks of rows as arrays, the next built while the server
  inserts one): a bad file or a failure rolls back everything it wrote, whatever other
  instances write meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import asyncpg
import orjson

from proxy.models import ListQuery, PageQuery
from proxy.store.errors import (
    RecordRefused,
    SearchOff,
    StoreError,
    StoreMissing,
    UnknownCursor,
    raises_store_errors,
)
from proxy.store.postgres import queries, search, writes
from proxy.store.postgres.migrations import index_unindexed, migrate
from proxy.store.records import (
    AuditEntry,
    CompletionRecord,
    ExchangeRecord,
    ExportFilter,
    Importable,
    KeyRecord,
    LogEntry,
    Page,
    PruneReport,
    StoredCompletion,
    UsageRow,
    Writable,
)
from proxy.store.text import filter_tags, preview

IMPORT_CHUNK = 2_000  # rows per statement during an import (see docs/benchmarks.md)
# Memory for each step of an import's statement: a chunk's rows (unnest's result, the usage
# trigger's transition table) stay in memory instead of spilling to temporary files.
IMPORT_WORK_MEM = "64MB"
SPLIT_BATCH = 64  # completions from which write_batch overlaps building and inserting
VACUUM_AFTER_IMPORT = 10_000  # rows an import adds before it vacuums what it filled
EXPORT_BATCH = 2_000
_GROUPS = {
    "caller": "caller",
    "model": "model",
    "day": "to_char(to_timestamp(created) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}
# The same groups in usage_by_day, whose day is a date.
_DAY_GROUPS = {"caller": "caller", "model": "model", "day": "to_char(day, 'YYYY-MM-DD')"}


# Failures of the database or of the way to it; everything else is a bug and stays itself.
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class _Rejected(Exception):
    """An import whose file had bad lines: its transaction is rolled back."""


def _failure(error: BaseException) -> StoreError:
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return StoreMissing(f"PostgreSQL: {error}")
    if isinstance(error, TimeoutError):
        return StoreError("PostgreSQL did not answer in time (connect or statement timeout)")
    reason = str(error) or type(error).__name__
    if isinstance(error, asyncpg.DataError):  # SQLSTATE class 22: a value, not the database
        return RecordRefused(f"PostgreSQL: {reason}")
    return StoreError(f"PostgreSQL: {reason}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    """Each pooled connection sends search documents as binary tsvectors."""
    await conn.set_type_codec("tsvector", **search.TSVECTOR_CODEC)


@raises_store_errors(_FAILURES, _failure)
class PostgresStore:
    """The PostgreSQL store: a pool of connections to one database (or one schema of it, when
    the URL sets ``search_path``), shared with other proxy instances."""

    def __init__(
        self,
        url: str,
        *,
        pool_min: int = 2,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        statement_timeout: float = 30.0,
        must_exist: bool = False,
        search: bool = True,
    ) -> None:
        self.url = url
        self._search = search
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._must_exist = must_exist
        self._pool: asyncpg.Pool | None = None

    def _connect_args(self) -> dict[str, Any]:
        return {
            "timeout": self._connect_timeout,
            # The client gives up a little after the server would have cancelled the
            # statement, so a network that stalls is bounded too.
            "command_timeout": self._statement_timeout + self._connect_timeout,
            "server_settings": {
                "statement_timeout": str(int(self._statement_timeout * 1000)),
                "application_name": "completions-proxy",
                # Every query here reads a page by an index and stops early; the planner's
                # cost of the whole walk it never finishes would set off JIT compilation,
                # which took far longer than the query itself.
                "jit": "off",
                # A page's best plan depends on the values (how common a word or a metadata
                # pair is): a generic plan, which PostgreSQL picks for a prepared statement
                # after five runs, walked a million rows for a search one value in six matched.
                "plan_cache_mode": "force_custom_plan",
            },
        }

    async def open(self) -> None:
        """Connect, migrate under the migration lock, then open the pool."""
        conn = await asyncpg.connect(self.url, **self._connect_args())
        try:
            schema = await conn.fetchval("SELECT current_schema()")
            if schema is None:
                raise StoreError("PostgreSQL: the search_path names no existing schema")
            if self._must_exist:
                found = await conn.fetchval("SELECT to_regclass('_migrations') IS NOT NULL")
                if not found:
                    raise StoreMissing("PostgreSQL: this database holds no completions store")
            # Migrations may rewrite tables: no statement timeout for them.
            await conn.execute("SET statement_timeout = 0")
            await migrate(conn)
            if self._search and not self._must_exist:
                await index_unindexed(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.url,
            min_size=min(self._pool_min, self._pool_max),
            max_size=self._pool_max,
            init=_init_connection,
            **self._connect_args(),
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @property
    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    def _acquire(self) -> Any:
        return self._p.acquire(timeout=self._connect_timeout)

    # -- writes ------------------------------------------------------------------------------

    async def write_batch(self, records: Sequence[Writable]) -> int:
        """Write records in one transaction; return how many were new.

        A batch is one statement (one round trip). A large batch is two, in one transaction:
        the second half's columns (search documents, most of this process's work) are built
        in a thread while the server inserts the first half, so the two overlap."""
        completions = [r for r in records if isinstance(r, CompletionRecord)]
        exchanges = [r for r in records if isinstance(r, ExchangeRecord)]
        now = time.time()
        async with self._acquire() as conn:
            if len(completions) < SPLIT_BATCH:
                inserted: int = await conn.fetchval(
                    queries.WRITE_BATCH,
                    *writes.columns(completions, now, self._search),
                    *writes.exchange_columns(exchanges),
                )
                return inserted
            half = len(completions) // 2
            first = writes.columns(completions[:half], now, self._search)
            later = asyncio.ensure_future(
                asyncio.to_thread(writes.columns, completions[half:], now, self._search)
            )
            try:
                async with conn.transaction():
                    inserted = await conn.fetchval(
                        queries.WRITE_BATCH, *first, *writes.exchange_columns(exchanges)
                    )
                    inserted += await conn.fetchval(queries.IMPORT_BATCH, *await later)
            finally:
                await asyncio.wait([later])
        return inserted

    async def probe_write(self) -> None:
        async with self._acquire() as conn:
            await writes.probe(conn)

    @property
    def commits_in_process(self) -> bool:
        return False

    @property
    def derive(self) -> Callable[[CompletionRecord], tuple[bytes | None, int]]:
        return functools.partial(writes.derive, index=self._search)

    async def import_records(
        self,
        batches: Iterable[Sequence[Importable]],
        accept: Callable[[], bool],
        chunk_rows: int | None = None,
    ) -> int:
        """Insert every batch in one transaction; return how many were new. Batches are
        gathered into chunks of ``chunk_rows`` and each chunk is one statement (arrays, as
        in ``write_batch``). The next chunk is read and its columns built (with the search
        documents, unless its rows come ``Prepared``) in a thread while the server inserts
        the current one, so the two overlap. If ``accept()`` turns false or anything fails,
        the transaction rolls back: nothing the import wrote stays, whatever else was
        written meanwhile."""
        chunk = chunk_rows or IMPORT_CHUNK
        pending = iter(batches)
        now = time.time()

        def next_chunk() -> list[list[Any]] | None:
            rows: list[Importable] = []
            while len(rows) < chunk and accept():
                batch = next(pending, None)
                if batch is None:
                    break
                rows += batch
            return writes.columns(rows, now, self._search) if rows else None

        inserted = 0
        async with self._acquire() as conn:
            ahead = asyncio.ensure_future(asyncio.to_thread(next_chunk))
            try:
                async with conn.transaction():
                    await conn.execute("SET LOCAL statement_timeout = 0")
                    await conn.execute(f"SET LOCAL work_mem = '{IMPORT_WORK_MEM}'")
                    while (columns := await ahead) is not None and accept():
                        ahead = asyncio.ensure_future(asyncio.to_thread(next_chunk))
                        inserted += await conn.fetchval(queries.IMPORT_BATCH, *columns)
                    if not accept():
                        raise _Rejected
            except _Rejected:
                await asyncio.to_thread(_drain, pending)  # the report names every bad line
                return 0
            finally:
                # The batches are read by one thread at a time: a failed insert waits for
                # the chunk being read before anything else reads on.
                await asyncio.wait([ahead])
            if inserted >= VACUUM_AFTER_IMPORT:
                # Lists with several metadata pairs read the pairs' index alone only where
                # the visibility map says so, and plans need the new rows' statistics:
                # both at once, rather than whenever autovacuum comes round.
                await conn.execute("SET statement_timeout = 0")
                try:
                    await conn.execute("VACUUM (ANALYZE) completion_metadata")
                    await conn.execute("ANALYZE completions")
                finally:
                    await conn.execute("RESET statement_timeout")
        return inserted

    async def update_metadata(
        self, caller: str | None, completion_id: str, metadata: dict[str, str], actor: str
    ) -> StoredCompletion | None:
        async with self._acquire() as conn:
            return await writes.update_metadata(conn, caller, completion_id, metadata, actor)

    async def delete(
        self, caller: str | None, completion_id: str, actor: str, *, purge: bool = True
    ) -> bool:
        async with self._acquire() as conn:
            return await writes.delete(conn, caller, completion_id, actor, purge=purge)

    # -- keys ------------------------------------------------------------------------------

    async def create_key(
        self, name: str, role: str, key_id: str, key_hash: bytes, *, actor: str = "cli"
    ) -> None:
        async with self._acquire() as conn:
            await writes.create_key(conn, name, role, key_id, key_hash, actor=actor)

    async def revoke_key(self, name: str, *, actor: str = "cli") -> bool:
        async with self._acquire() as conn:
            return await writes.revoke_key(conn, name, actor=actor)

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._p.fetch(
            "SELECT name, key_id, role, created_at, revoked_at FROM proxy_keys ORDER BY name"
        )
        return [KeyRecord(*row) for row in rows]

    async def find_key(self, key_id: str) -> tuple[KeyRecord, bytes] | None:
        row = await self._p.fetchrow(
            "SELECT name, key_id, role, created_at, revoked_at, key_hash FROM proxy_keys"
            " WHERE key_id = $1",
            key_id,
        )
        if row is None:
            return None
        return KeyRecord(*row[:5]), bytes(row[5])

    # -- retention, settings, sessions --------------------------------------------------------

    async def prune(self, before: int) -> PruneReport:
        async with self._acquire() as conn:
            return await writes.prune(conn, before)

    async def setting(self, name: str, default: bytes) -> bytes:
        async with self._acquire() as conn:
            return await writes.setting(conn, name, default)

    async def end_session(self, session_id: str, expires: float) -> None:
        async with self._acquire() as conn:
            await writes.end_session(conn, session_id, expires)

    async def session_ended(self, session_id: str) -> bool:
        found = await self._p.fetchval("SELECT 1 FROM ended_sessions WHERE sid = $1", session_id)
        return found is not None

    # -- reads -------------------------------------------------------------------------------

    async def _one(
        self, columns: str, caller: str | None, completion_id: str
    ) -> asyncpg.Record | None:
        if caller is None:
            return await self._p.fetchrow(
                f"SELECT {columns} FROM completions WHERE id = $1 ORDER BY seq LIMIT 1",
                completion_id,
            )
        return await self._p.fetchrow(
            f"SELECT {columns} FROM completions WHERE id = $1 AND caller = $2",
            completion_id,
            caller,
        )

    async def get(self, caller: str | None, completion_id: str) -> StoredCompletion | None:
        row = await self._one("completion, metadata", caller, completion_id)
        if row is None:
            return None
        return StoredCompletion(id=completion_id, completion=row[0], metadata=row[1])

    async def request_of(self, caller: str | None, completion_id: str) -> bytes | None:
        row = await self._one("request", caller, completion_id)
        return None if row is None else bytes(row[0])

    async def _cursor(self, caller: str | None, after: str) -> tuple[int, int]:
        if caller is None:
            row = await self._p.fetchrow(
                "(SELECT created, seq FROM completions WHERE id = $1 ORDER BY seq LIMIT 1)"
                " UNION ALL (SELECT created, seq FROM tombstones WHERE id = $1 LIMIT 1) LIMIT 1",
                after,
            )
        else:
            row = await self._p.fetchrow(
                "(SELECT created, seq FROM completions WHERE id = $1 AND caller = $2)"
                " UNION ALL (SELECT created, seq FROM tombstones WHERE id = $1 AND caller = $2)"
                " LIMIT 1",
                after,
                caller,
            )
        if row is None:
            raise UnknownCursor(after)
        return row[0], row[1]

    async def list_completions(
        self, caller: str | None, query: ListQuery
    ) -> Page[StoredCompletion]:
        rows, has_more = await self._select_page(caller, query, queries.PAGE_COLUMNS)
        items = [StoredCompletion(id=row[0], completion=row[1], metadata=row[2]) for row in rows]
        return Page(items=items, has_more=has_more)

    async def log_entries(self, caller: str | None, query: ListQuery) -> Page[LogEntry]:
        rows, has_more = await self._select_page(caller, query, queries.LOG_COLUMNS)
        return Page(items=[_log_entry(row) for row in rows], has_more=has_more)

    async def log_entry(self, caller: str | None, completion_id: str) -> LogEntry | None:
        where = "c.id = $1" if caller is None else "c.id = $1 AND c.caller = $2"
        params = (completion_id,) if caller is None else (completion_id, caller)
        row = await self._p.fetchrow(
            f"SELECT {queries.LOG_COLUMNS} FROM completions c WHERE {where} ORDER BY c.seq LIMIT 1",
            *params,
        )
        return None if row is None else _log_entry(row)

    async def _select_page(
        self, caller: str | None, query: ListQuery, columns: str
    ) -> tuple[list[asyncpg.Record], bool]:
        """The rows (``columns``) of one page and whether more follow."""
        page = query.page
        cursor = await self._cursor(caller, page.after) if page.after else None
        if query.owner is not None and caller not in (None, query.owner):
            return [], False
        scope = caller if query.owner is None else query.owner
        if query.search is not None:
            if not self._search:
                raise SearchOff
            tags = filter_tags(scope, query.model, query.metadata)
            match = search.query(query.search, tags)
            if match is None:
                return [], False
            return await self._search_page(
                scope, query, match, None if cursor is None else cursor[1], columns
            )
        else:
            driver = 0
            if scope is not None and len(query.metadata) > 1:
                sql, params = queries.rarity(scope, query.metadata)
                counts = await self._p.fetchrow(sql, *params)
                assert counts is not None
                driver = min(range(len(query.metadata)), key=lambda i: counts[i])
            sql, params = queries.page(scope, query, cursor, driver, columns)
        rows = await self._p.fetch(sql, *params)
        return rows[: page.limit], len(rows) > page.limit

    async def _search_page(
        self, scope: str | None, query: ListQuery, match: str, cursor: int | None, columns: str
    ) -> tuple[list[asyncpg.Record], bool]:
        """A page of search results in two steps, since no one plan fits every search.

        First the newest ``SEARCH_WINDOW`` completions in scope are tested one by one: a
        common word fills its page there at once. Only a search that does not is asked of
        the index alone (index scans and sequential scans turned off for that query): the
        words and filter tags are intersected inside the GIN index and only their matches
        are read, however the planner rates a combination it cannot foresee (a word and a
        pair that never meet would otherwise walk every completion)."""
        limit = query.page.limit
        sql, params = queries.search_page(
            scope, query, match, cursor, columns, window=queries.SEARCH_WINDOW
        )
        rows = await self._p.fetch(sql, *params)
        if len(rows) > limit:
            return rows[:limit], True
        sql, params = queries.search_page(scope, query, match, cursor, columns)
        async with self._acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off")
            await conn.execute("SET LOCAL enable_seqscan = off")
            rows = await conn.fetch(sql, *params)
        return rows[:limit], len(rows) > limit

    async def list_exchanges(
        self, caller: str | None, page: PageQuery, *, outcome: str | None = None
    ) -> Page[ExchangeRecord]:
        """Exchanges that stored no completion (those that ended with ``outcome``, when
        given), keyset-paged by request id."""
        p = queries.Params()
        where = [f"caller = {p(caller)}"] if caller is not None else []
        if outcome is not None:
            where.append(f"outcome = {p(outcome)}")
        compare, direction = (">", "ASC") if page.order == "asc" else ("<", "DESC")
        if page.after:
            row = await self._p.fetchrow(
                "SELECT created, seq FROM exchanges WHERE request_id = $1 ORDER BY seq LIMIT 1",
                page.after,
            )
            if row is None:
                raise UnknownCursor(page.after)
            where.append(f"(created, seq) {compare} ({p(row[0])}::bigint, {p(row[1])}::bigint)")
        sql = (
            "SELECT request_id, caller, created, model, stream, outcome, status, request,"
            f" response, duration_ms FROM exchanges WHERE {' AND '.join(where) or 'true'}"
            f" ORDER BY created {direction}, seq {direction} LIMIT {page.limit + 1}"
        )
        rows = await self._p.fetch(sql, *p.values)
        items = [ExchangeRecord(*row) for row in rows[: page.limit]]
        return Page(items=items, has_more=len(rows) > page.limit)

    async def audit_entries(self, after: int, limit: int) -> list[AuditEntry]:
        """The audit log after entry ``after`` (its seq), oldest first."""
        rows = await self._p.fetch(
            "SELECT seq, at, actor, action, completion_id, owner, detail FROM audit_log"
            " WHERE seq > $1 ORDER BY seq LIMIT $2",
            after,
            limit,
        )
        return [AuditEntry(*row) for row in rows]

    async def usage(
        self, since: int | None, until: int | None, group_by: Sequence[str]
    ) -> list[UsageRow]:
        """Completions and tokens summed per group (any of caller, model, day).

        Bounds on whole UTC days (or none) are read from ``usage_by_day``, which statement
        triggers keep (p005): a few rows per day, however many completions. Other bounds
        sum the completions themselves."""
        if all(bound is None or bound % 86400 == 0 for bound in (since, until)):
            return await self._usage_by_day(since, until, group_by)
        columns = [_GROUPS[name] for name in group_by]
        p = queries.Params()
        where = ["true"]
        if since is not None or until is not None:  # a range of each caller's order index
            where.append(f"caller IN ({queries.CALLERS} SELECT caller FROM callers)")
        if since is not None:
            where.append(f"created >= {p(since)}::bigint")
        if until is not None:
            where.append(f"created < {p(until)}::bigint")
        sql = UsageRow.sql(
            columns,
            "count(*), coalesce(sum(prompt_tokens), 0)::bigint,"
            " coalesce(sum(cached_tokens), 0)::bigint, coalesce(sum(completion_tokens), 0)::bigint",
            f"completions WHERE {' AND '.join(where)}",
        )
        rows = await self._p.fetch(sql, *p.values)
        return UsageRow.rows_of(rows, group_by)

    async def _usage_by_day(
        self, since: int | None, until: int | None, group_by: Sequence[str]
    ) -> list[UsageRow]:
        columns = [_DAY_GROUPS[name] for name in group_by]
        p = queries.Params()
        where = ["true"]
        if since is not None:
            where.append(f"day >= to_timestamp({p(since)}::bigint) AT TIME ZONE 'UTC'")
        if until is not None:
            where.append(f"day < to_timestamp({p(until)}::bigint) AT TIME ZONE 'UTC'")
        sql = UsageRow.sql(
            columns,
            "coalesce(sum(completions), 0)::bigint, coalesce(sum(prompt_tokens), 0)::bigint,"
            " coalesce(sum(cached_tokens), 0)::bigint, coalesce(sum(completion_tokens), 0)::bigint",
            f"usage_by_day WHERE {' AND '.join(where)}",
        )
        rows = await self._p.fetch(sql, *p.values)
        return UsageRow.rows_of(rows, group_by)

    async def recordings(self, request_key: str, caller: str | None) -> list[bytes]:
        """Stored completions made for requests with this key, oldest first (by the shared
        sequence, so every instance sees them in the same order)."""
        if caller is None:
            rows = await self._p.fetch(
                "SELECT completion FROM completions WHERE request_key = $1 ORDER BY seq LIMIT 1000",
                request_key,
            )
        else:
            rows = await self._p.fetch(
                "SELECT completion FROM completions WHERE request_key = $1 AND caller = $2"
                " ORDER BY seq LIMIT 1000",
                request_key,
                caller,
            )
        return [bytes(row[0]) for row in rows]

    async def export(self, where: ExportFilter) -> AsyncIterator[list[CompletionRecord]]:
        """Every stored completion matching ``where``, in insertion order, a batch at a time,
        read through a cursor in one snapshot (a repeatable-read transaction)."""
        p = queries.Params()
        clauses = ["true"]
        if where.model is not None:
            clauses.append(f"model = {p(where.model)}")
        if where.since is not None:
            clauses.append(f"created >= {p(where.since)}::bigint")
        if where.until is not None:
            clauses.append(f"created < {p(where.until)}::bigint")
        for key, value in where.metadata:
            clauses.append(
                "EXISTS (SELECT 1 FROM completion_metadata m"
                f" WHERE m.seq = completions.seq AND m.key = {p(key)} AND m.value = {p(value)})"
            )
        names = ", ".join(queries.COMPLETION_COLUMNS)
        sql = f"SELECT {names} FROM completions WHERE {' AND '.join(clauses)} ORDER BY seq"
        async with (
            self._acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = await conn.cursor(sql, *p.values)
            while rows := await cursor.fetch(EXPORT_BATCH):
                yield [_record(row) for row in rows]


def _log_entry(row: asyncpg.Record) -> LogEntry:
    """A log row; the preview is the last input message's text, read from the request."""
    try:
        request = orjson.loads(row[12])
        content = request["messages"][-1]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        content = None
    return LogEntry(
        id=row[0],
        caller=row[1],
        created=row[2],
        model=row[3],
        outcome=row[4],
        stream=row[5],
        duration_ms=row[6],
        stored_at=row[7],
        prompt_tokens=row[8],
        cached_tokens=row[9],
        completion_tokens=row[10],
        metadata=orjson.loads(row[11]),
        preview=preview(content),
    )


def _record(row: asyncpg.Record) -> CompletionRecord:
    return CompletionRecord(
        id=row[0],
        caller=row[1],
        created=row[2],
        model=row[3],
        metadata=orjson.loads(row[4]),
        completion=row[5],
        request=row[6],
        request_id=row[7],
        stream=row[8],
        outcome=row[9],
        stored_at=row[10],
        duration_ms=row[11],
        request_key=row[12],
        prompt_tokens=row[13],
        cached_tokens=row[14],
        completion_tokens=row[15],
    )


def _drain(pending: Iterator[Sequence[Importable]]) -> None:
    for _ in pending:
        pass
