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
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite
import orjson

from proxy.models import ListQuery, PageQuery
from proxy.store.errors import (
    SearchOff,
    StoreError,
    StoreMissing,
    UnknownCursor,
    raises_store_errors,
)
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
    encode_metadata,
)
from proxy.store.sqlite import queries, writes
from proxy.store.sqlite.connection import ThreadedConnection
from proxy.store.sqlite.migrations import migrate
from proxy.store.sqlite.search import add_functions, index_backlog
from proxy.store.sqlite.writes import Derived, derive
from proxy.store.text import filter_tags, fts5_query

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
IMPORT_CHUNK = 20_000  # rows per import transaction through the WAL (see writes.import_chunks)
# Rows per transaction when the import writes the file directly (see writes.go_direct). Larger,
# since no WAL has to stay small: once an index that takes rows at random places (the
# request key's) has fewer leaf pages than a chunk has rows, every chunk rewrites, and
# journals, nearly all of them (measurements in docs/benchmarks.md).
IMPORT_CHUNK_DIRECT = 100_000
IMPORT_CACHE_KIB = 256 * 1024  # the page cache while an import runs (see writes.import_chunks)


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
    busy = writes.fetchone(conn, "PRAGMA busy_timeout")[0]
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        writes.checkpoint(conn, "TRUNCATE")
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(busy)}")


def _prepare_writer(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    # Checkpoints run on their own connection (see _checkpoint_forever), not inside the
    # writer's commits, where they cost about 40% of write throughput. The WAL file is cut
    # back to 64 MiB when it starts over (see SQLiteStore._checkpoint_forever).
    writes.fetchone(conn, "PRAGMA wal_autocheckpoint = 0")
    writes.fetchone(conn, "PRAGMA journal_size_limit = 67108864")
    migrate(conn)


def _index_backlog(conn: sqlite3.Connection) -> int:
    with writes.transaction(conn):
        return index_backlog(conn)


def _make_room(path: str, *, must_exist: bool) -> None:
    """Make the folder a new database file goes in; or, with ``must_exist``, refuse a file
    that is not there (a read-only command must not leave an empty database behind)."""
    if must_exist and not Path(path).is_file():
        raise StoreMissing(f"no database at {path}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def _failure(error: BaseException) -> StoreError:
    return StoreError(str(error))


@raises_store_errors((sqlite3.Error,), _failure)
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
    def commits_in_process(self) -> bool:
        return True

    @property
    def derive(self) -> Callable[[CompletionRecord], Derived]:
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
        if (
            writes.fetchone(conn, "PRAGMA page_count")[0] == 0
        ):  # a new database: nothing written yet
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        page_size = writes.fetchone(conn, "PRAGMA page_size")[0]
        for pragma in self._pragmas(page_size):
            writes.fetchone(conn, pragma)
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
        writer = ThreadedConnection(self._connect, "store-writer")
        await writer.open()  # stops its thread itself when the file cannot be opened
        self._writer = writer
        try:
            if self.path != ":memory:":
                # Once the connection has read the file as a database: a file that is not
                # one gets no ``-lock`` file beside it.
                self._lock = _open_lock(self.path)
                self._checkpoint_lock = _open_lock(self.path)
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
            frames = await checkpointer.run(writes.checkpoint, "PASSIVE")
            if frames >= self._wal_restart_frames:
                await checkpointer.run(_locked, self._checkpoint_lock, writes.checkpoint, "PASSIVE")

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
        return await self._write(writes.write_batch, records, self._search)

    async def import_records(
        self,
        batches: Iterable[Sequence[Importable]],
        accept: Callable[[], bool],
        chunk_rows: int | None = None,
    ) -> int:
        """Insert every batch; return how many were new. Duplicates (same caller and id) are
        skipped, so importing a file twice adds nothing the second time. If ``accept()`` is
        false at any point (the file had a bad line) or a write fails, nothing the import
        wrote stays (see ``writes.import_chunks``).

        ``batches`` is consumed on the writer's thread, so producing them never blocks the
        event loop. The import writes the file directly, in rollback-journal mode, when no
        other connection is on it (see ``writes.go_direct``): this store's reader and checkpointer
        are closed for it and reopened after, so its reads fail meanwhile and its other
        writes wait. With another connection on the file, it writes through the WAL.
        ``chunk_rows`` is the rows per transaction: by default ``IMPORT_CHUNK_DIRECT`` when
        direct, ``IMPORT_CHUNK`` through the WAL."""
        writer = self._w
        await self._close_beside()
        direct = False
        try:
            direct = await writer.run(writes.go_direct)
            if not direct:
                await self._open_beside()
            return await writer.run(  # not under the write lock: see the class docstring
                writes.import_chunks,
                batches,
                accept,
                chunk_rows or (IMPORT_CHUNK_DIRECT if direct else IMPORT_CHUNK),
                copy_beside=None if direct else self._copy_beside,
                cache_kib=IMPORT_CACHE_KIB,
                search=self._search,
            )
        finally:
            if direct:
                await writer.run(writes.leave_direct, self._synchronous)
            if self._reader is None:
                await self._open_beside()

    def _copy_beside(self) -> Future[int]:
        """A PASSIVE checkpoint on the checkpointer's thread, while the writer goes on."""
        if self._checkpointer is None:
            raise RuntimeError("store is not open")
        return self._checkpointer.submit(writes.checkpoint, "PASSIVE")

    async def probe_write(self) -> None:
        """A small real write, to tell whether a store that failed can write again."""
        await self._write(writes.probe)

    async def update_metadata(
        self, caller: str | None, completion_id: str, metadata: dict[str, str], actor: str
    ) -> StoredCompletion | None:
        """Replace the metadata map; the change (before and after) goes to the audit log."""
        encoded = encode_metadata(metadata)
        completion = await self._write(
            writes.update_metadata, caller, completion_id, metadata, encoded, actor
        )
        return None if completion is None else StoredCompletion(completion_id, completion, encoded)

    async def delete(
        self, caller: str | None, completion_id: str, actor: str, *, purge: bool = True
    ) -> bool:
        """Delete a completion; with ``purge=False`` its row is kept in deleted_completions.

        Either way the deletion goes to the audit log, and the id keeps its place in the
        order (a tombstone) so paging with ``after=<deleted id>`` goes on.
        """
        return await self._write(writes.delete, caller, completion_id, actor, purge)

    # -- keys ------------------------------------------------------------------------------

    async def create_key(
        self, name: str, role: str, key_id: str, key_hash: bytes, *, actor: str = "cli"
    ) -> None:
        """Add a proxy key; raises ``KeyExists`` when the name is taken."""
        await self._write(writes.create_key, name, role, key_id, key_hash, actor)

    async def revoke_key(self, name: str, *, actor: str = "cli") -> bool:
        return await self._write(writes.revoke_key, name, actor)

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
        completions, exchanges = await self._write(writes.prune, before)
        return PruneReport(completions, exchanges, bytes_before, self._size())

    async def setting(self, name: str, default: bytes) -> bytes:
        """The stored value of a setting, storing ``default`` first if there is none."""
        return await self._write(writes.setting, name, default)

    async def end_session(self, session_id: str, expires: float) -> None:
        await self._write(writes.end_session, session_id, expires)

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
        rows, has_more = await self._select_page(caller, query, queries.COLUMNS)
        items = [StoredCompletion(row[0], row[1], row[2]) for row in rows]
        return Page(items=items, has_more=has_more)

    async def log_entries(self, caller: str | None, query: ListQuery) -> Page[LogEntry]:
        rows, has_more = await self._select_page(caller, query, queries.LOG_COLUMNS)
        return Page(items=[queries.log_entry(row) for row in rows], has_more=has_more)

    async def log_entry(self, caller: str | None, completion_id: str) -> LogEntry | None:
        where = "c.id = ?" if caller is None else "c.caller = ? AND c.id = ?"
        params = (completion_id,) if caller is None else (caller, completion_id)
        row = await self._fetchone(
            self._r,
            f"SELECT {queries.LOG_COLUMNS} FROM completions c WHERE {where} ORDER BY c.seq LIMIT 1",
            params,
        )
        return None if row is None else queries.log_entry(row)

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
            sql, params = queries.search_sql(
                scope, query, match, None if cursor is None else cursor[1], columns
            )
            rows: list[Sequence[Any]] = list(await self._r.execute_fetchall(sql, params))
            has_more = len(rows) > page.limit
        elif scope is None:
            rows, has_more = await self._page_across_callers(query, cursor, columns)
        else:
            rows = []
            if len(query.metadata) > 1:  # first, the pair given first, a few entries of it
                walked = queries.walked_sql(
                    scope, query, cursor, page.order, page.limit, columns, queries.FIRST_WALK
                )
                rows = list(await self._r.execute_fetchall(*walked))
            if len(rows) <= page.limit:  # not a full page yet: the whole of the rarest pair
                driver = await self._rarest(scope, query.metadata)
                sql, params = queries.page_sql(
                    scope, query, cursor, page.order, page.limit, driver=driver, columns=columns
                )
                rows = list(await self._r.execute_fetchall(sql, params))
            has_more = len(rows) > page.limit
        return rows[: page.limit], has_more

    async def _rarest(self, caller: str, pairs: Sequence[tuple[str, str]]) -> int:
        """The index of the pair with the fewest rows for ``caller`` (0 for fewer than two
        pairs). Walking it and checking the others costs its rows, not the first pair's:
        two pairs that each match thousands of rows but never the same one read only the
        rarer one's. Past ``queries.RAREST_CAP`` rows pairs count as equal, and the first wins."""
        if len(pairs) < 2:
            return 0
        row = await self._fetchone(self._r, *queries.rarest_sql(caller, pairs))
        counts = list(row) if row is not None else [0]
        return counts.index(min(counts))

    async def _page_across_callers(
        self, query: ListQuery, cursor: tuple[int, int] | None, columns: str
    ) -> tuple[list[Sequence[Any]], bool]:
        """An admin's page: each caller's first keys, read from that caller's index, merged;
        then the rows of the page. One short index read per caller, however many rows."""
        page = query.page
        callers = [row[0] for row in await self._r.execute_fetchall(queries.CALLERS)]
        keys: list[tuple[int, int]] = []
        for start in range(0, len(callers), CALLERS_PER_READ):
            parts = [
                queries.page_sql(caller, query, cursor, page.order, page.limit, keys_only=True)
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
        columns = [queries.GROUPS[name] for name in group_by]
        where, params = ["1"], []
        if since is not None or until is not None:  # a range of each caller's order index
            where.append(f"caller IN ({queries.CALLERS})")
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
            clauses.append(f"EXISTS ({queries.PAIR_OF.format(row='completions')})")
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
        sql, params = queries.page_sql(
            caller, query, cursor, "asc", 1, keys_only=keys_only, driver=driver
        )
        async with self._r.execute("EXPLAIN QUERY PLAN " + sql, params) as result:
            return [str(row[3]) async for row in result]
