"""The records the store takes and gives back: plain data, the same for every backend.

No record carries a backend's row layout (no sequence numbers, no positional tuples): a
backend turns records into its own rows and back. The API's JSON is built from these records
in ``proxy.responses``, never by a store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import orjson

Item = TypeVar("Item")


def encode_metadata(metadata: dict[str, str]) -> bytes:
    """A metadata map as every backend stores it and the API serves it: JSON with sorted
    keys, so equal maps are equal bytes whichever backend wrote them."""
    return orjson.dumps(metadata, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One captured completion, as written and as exported: the whole stored row."""

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
    # The request and completion as whoever made the record already holds them parsed
    # (what ``request`` and ``completion`` decode to: the capture, an import's parser), so a
    # store indexing them for search need not parse them again. Never stored, exported,
    # pickled or compared.
    parsed: tuple[Any, Any] | None = field(default=None, compare=False, repr=False)

    def __reduce__(self) -> tuple[type[CompletionRecord], tuple[object, ...]]:
        # Pickled as its fields in order: an import's worker processes send records by the
        # million, and the default for a slotted dataclass took five times as long.
        return CompletionRecord, (
            self.id,
            self.caller,
            self.created,
            self.model,
            self.metadata,
            self.completion,
            self.request,
            self.request_id,
            self.stream,
            self.outcome,
            self.duration_ms,
            self.request_key,
            self.stored_at,
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
        )


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

    @property
    def id(self) -> str:
        """What a page of exchanges is keyed by (``after``, ``first_id``, ``last_id``)."""
        return self.request_id


Writable = CompletionRecord | ExchangeRecord


class Prepared(NamedTuple):
    """A completion to import, with what its store derives from it before the insert, made
    by that store's ``derive``. An import makes these in its parse workers, so the store's
    writer only inserts; what ``derived`` holds is the backend's own business."""

    record: CompletionRecord
    derived: Any

    def __reduce__(self) -> tuple[Any, tuple[type[Prepared], tuple[CompletionRecord, Any]]]:
        # As a plain tuple of its type: the default goes through the class's Python-level
        # __new__, which was half of what unpickling a row cost the importing process.
        return tuple.__new__, (Prepared, (self.record, self.derived))


Importable = CompletionRecord | Prepared


@dataclass(frozen=True, slots=True)
class StoredCompletion:
    """A stored completion as the API serves it: its JSON and its metadata, both encoded."""

    id: str
    completion: bytes  # the chat.completion JSON, without metadata
    metadata: bytes  # the metadata object's JSON


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A stored completion as one row of a log people read: the promoted columns and a
    short preview of the request, never the bodies."""

    id: str
    caller: str
    created: int
    model: str
    outcome: str
    stream: bool
    duration_ms: float | None
    stored_at: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    metadata: dict[str, str]
    preview: str  # the last input message's text, shortened (``text.preview``)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the append-only audit log; ``seq`` orders the log and pages it."""

    seq: int
    at: float
    actor: str
    action: str
    completion_id: str | None
    owner: str | None
    detail: bytes  # a JSON object


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    key_id: str
    role: str
    created_at: float
    revoked_at: float | None


class Row(Protocol):
    """A database row as either backend's driver returns it: read by position."""

    def __getitem__(self, index: int, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class UsageRow:
    group: dict[str, str]
    completions: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @staticmethod
    def sql(columns: Sequence[str], sums: str, source: str) -> str:
        """A usage query in the layout ``rows_of`` reads: the groups' ``columns`` (SQL
        expressions), then ``sums`` (the four sums), from ``source`` (a table and its WHERE),
        grouped and ordered by the columns."""
        if not columns:
            return f"SELECT {sums} FROM {source}"
        listed = ", ".join(columns)
        return f"SELECT {listed}, {sums} FROM {source} GROUP BY {listed} ORDER BY {listed}"

    @classmethod
    def rows_of(cls, rows: Iterable[Row], group_by: Sequence[str]) -> list[UsageRow]:
        """Rows of a usage query, each its groups' values then the four sums, as
        ``UsageRow``s; a group with no completion is left out."""
        width = len(group_by)
        return [
            cls(
                group={name: str(row[i]) for i, name in enumerate(group_by)},
                completions=row[width],
                prompt_tokens=row[width + 1],
                cached_tokens=row[width + 2],
                completion_tokens=row[width + 3],
            )
            for row in rows
            if row[width]
        ]


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What a prune deleted; the store's size before and after only where a backend can
    know it (a SQLite file's bytes), else None."""

    completions: int
    exchanges: int
    bytes_before: int | None = None
    bytes_after: int | None = None


@dataclass(frozen=True, slots=True)
class ExportFilter:
    model: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    since: int | None = None  # created >= since
    until: int | None = None  # created < until


@dataclass(frozen=True, slots=True)
class Page(Generic[Item]):
    items: list[Item]
    has_more: bool
