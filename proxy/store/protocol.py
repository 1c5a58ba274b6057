"""The ``Store`` protocol: what the proxy asks of a store, in records, whatever the backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Protocol

from proxy.models import ListQuery, PageQuery
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


class Store(Protocol):
    """The store. ``caller=None`` means every caller's records (an admin's view).

    Failures of the database itself are raised as ``StoreError``; ``UnknownCursor`` and
    ``KeyExists`` are answers, not failures.
    """

    async def open(self) -> None:
        """Connect, and bring the schema up to date."""

    async def close(self) -> None: ...
    async def write_batch(self, records: Sequence[Writable]) -> int:
        """Write in one transaction; return how many were new (a duplicate caller and id is
        skipped, the first write kept)."""

    async def probe_write(self) -> None:
        """A small real write, to tell whether a store that failed can write again."""

    @property
    def commits_in_process(self) -> bool:
        """Whether a commit's work runs in this process (SQLite's writer thread, on the CPU
        the event loop needs too) rather than in a database server (PostgreSQL). The writer
        waits for fuller batches under load only when it does (``Writer._gather``)."""

    async def get(self, caller: str | None, completion_id: str) -> StoredCompletion | None: ...
    async def request_of(self, caller: str | None, completion_id: str) -> bytes | None: ...
    async def list_completions(
        self, caller: str | None, query: ListQuery
    ) -> Page[StoredCompletion]:
        """A keyset page in ``(created, insertion)`` order; an ``after`` id that was deleted
        keeps its place. Raises ``UnknownCursor`` for an id this caller never had."""

    async def log_entries(self, caller: str | None, query: ListQuery) -> Page[LogEntry]:
        """The same page as ``list_completions`` (every filter, the same order and cursor),
        as log rows for people.

        ``query.since``/``until`` bound ``created``. ``query.search`` keeps completions whose
        searchable text (``proxy.store.text.searchable``) holds every word, through an index
        kept in the same transaction as the completion: never missing a committed one, never
        showing a deleted or pruned one. With a search, the order is storage order; a store
        opened with search off raises ``SearchOff`` instead.
        """

    async def log_entry(self, caller: str | None, completion_id: str) -> LogEntry | None:
        """One completion's log row, if this caller may see it."""

    async def end_session(self, session_id: str, expires: float) -> None:
        """Record a console session as signed out (it lapses at ``expires`` anyway); records
        already past their expiry are dropped. Every process on the store sees it."""

    async def session_ended(self, session_id: str) -> bool: ...

    async def update_metadata(
        self, caller: str | None, completion_id: str, metadata: dict[str, str], actor: str
    ) -> StoredCompletion | None: ...
    async def delete(
        self, caller: str | None, completion_id: str, actor: str, *, purge: bool = True
    ) -> bool: ...
    async def list_exchanges(
        self, caller: str | None, page: PageQuery, *, outcome: str | None = None
    ) -> Page[ExchangeRecord]:
        """Exchanges that stored no completion (those that ended with ``outcome``, when
        given), keyset-paged by request id."""

    async def audit_entries(self, after: int, limit: int) -> list[AuditEntry]:
        """The audit log after entry ``after`` (its seq), oldest first."""

    async def create_key(
        self, name: str, role: str, key_id: str, key_hash: bytes, *, actor: str = "cli"
    ) -> None:
        """Add a proxy key; raises ``KeyExists`` when the name is taken."""

    async def revoke_key(self, name: str, *, actor: str = "cli") -> bool:
        """Revoke a live key; ``actor`` (who did it) goes to the audit trail."""

    async def list_keys(self) -> list[KeyRecord]: ...
    async def find_key(self, key_id: str) -> tuple[KeyRecord, bytes] | None: ...
    async def usage(
        self, since: int | None, until: int | None, group_by: Sequence[str]
    ) -> list[UsageRow]:
        """Completions and tokens summed per group (any of caller, model, day)."""

    async def prune(self, before: int) -> PruneReport:
        """Delete everything created before ``before``, so that it is gone for good."""

    async def setting(self, name: str, default: bytes) -> bytes:
        """The stored value of a setting, storing ``default`` first if there is none."""

    async def recordings(self, request_key: str, caller: str | None) -> list[bytes]:
        """Stored completions made for requests with this key, oldest first."""

    def export(self, where: ExportFilter) -> AsyncIterator[list[CompletionRecord]]:
        """Every stored completion matching ``where``, whole, in insertion order, in batches."""

    @property
    def derive(self) -> Callable[[CompletionRecord], Any]:
        """What this store computes from a completion before inserting it (its search
        document, its metadata's signature), as a pure function that pickles (a module-level
        function, or a partial of one), for ``Prepared`` rows made in other processes. It
        reads the record's ``parsed`` forms where the record has them."""

    async def import_records(
        self,
        batches: Iterable[Sequence[Importable]],
        accept: Callable[[], bool],
        chunk_rows: int | None = None,
    ) -> int:
        """Insert every batch; return how many were new (duplicates skipped, as in
        ``write_batch``). When ``accept()`` turns false (the file had a bad line) or a write
        fails, nothing the import wrote stays, even with other writers on the store
        meanwhile. ``batches`` may be consumed off the event loop. A ``CompletionRecord`` is
        prepared by the store itself; a ``Prepared`` row must come from this store's
        ``derive``."""
