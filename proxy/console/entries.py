"""The log's rows: stored completions (or, filtered by a failed outcome, the exchanges that
ended that way) as a person reads them, with their cost."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import orjson

from proxy.config import Price
from proxy.console.filters import PAGE_SIZE, LogView
from proxy.errors import InvalidRequest
from proxy.models import ListQuery, PageQuery
from proxy.outcome import Outcome
from proxy.store import ExchangeRecord, LogEntry, SearchOff, Store, UnknownCursor
from proxy.store.text import preview
from proxy.usage import cost

# Outcomes of exchanges that stored nothing; the log shows them when its filter asks.
FAILED = (
    Outcome.UPSTREAM_ERROR,
    Outcome.UPSTREAM_FAILED,
    Outcome.CLIENT_GONE,
    Outcome.UNSTORABLE,
)


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    caller: str
    created: int
    model: str
    outcome: str
    duration_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: float | None
    metadata: dict[str, str]
    preview: str
    stored: bool  # a completion with its own page (else a failed exchange)
    status: int | None = None


@dataclass(frozen=True, slots=True)
class LogPage:
    rows: list[Row]
    newer: bool  # there are newer rows than the first shown
    older: bool


def completion_row(entry: LogEntry, prices: Mapping[str, Price]) -> Row:
    return Row(
        id=entry.id,
        caller=entry.caller,
        created=entry.created,
        model=entry.model,
        outcome=entry.outcome,
        duration_ms=entry.duration_ms,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        cost=cost(
            prices,
            entry.model,
            entry.prompt_tokens,
            entry.cached_tokens,
            entry.completion_tokens,
        ),
        metadata=entry.metadata,
        preview=entry.preview,
        stored=True,
    )


def exchange_row(record: ExchangeRecord) -> Row:
    try:
        sent = orjson.loads(record.request)
    except orjson.JSONDecodeError:
        sent = None
    messages = sent.get("messages") if isinstance(sent, dict) else None
    last = messages[-1] if isinstance(messages, list) and messages else None
    return Row(
        id=record.request_id,
        caller=record.caller,
        created=record.created,
        model=record.model,
        outcome=record.outcome,
        duration_ms=record.duration_ms,
        prompt_tokens=None,
        completion_tokens=None,
        cost=None,
        metadata={},
        preview=preview(last.get("content")) if isinstance(last, dict) else "",
        stored=False,
        status=record.status,
    )


async def log_page(
    store: Store, scope: str | None, view: LogView, prices: Mapping[str, Price]
) -> LogPage:
    """Newest first; ``after`` pages to older rows, ``before`` to newer ones. An id from
    another view (a deleted row's page, an edited URL) starts again from the newest."""
    newer_side = bool(view.before) and not view.after
    page = PageQuery(
        after=(view.before if newer_side else view.after) or None,
        limit=PAGE_SIZE,
        order="asc" if newer_side else "desc",
    )
    try:
        if view.outcome in FAILED:
            owner = view.caller or None
            if owner is not None and scope not in (None, owner):
                rows: list[Row] = []
                has_more = False
            else:
                exchanges = await store.list_exchanges(
                    owner if scope is None else scope, page, outcome=view.outcome
                )
                rows, has_more = [exchange_row(r) for r in exchanges.items], exchanges.has_more
        else:
            query = ListQuery(
                page=page,
                model=view.model or None,
                metadata=view.meta,
                owner=view.caller or None,
                since=view.since_seconds(),
                until=view.until_seconds(),
                search=view.q or None,
            )
            entries = await store.log_entries(scope, query)
            rows = [completion_row(e, prices) for e in entries.items]
            has_more = entries.has_more
    except UnknownCursor:
        return await log_page(store, scope, replace(view, after="", before=""), prices)
    except SearchOff as off:  # a search from a URL made while search was on
        raise InvalidRequest(str(off), param="q", code="search_off") from None
    if newer_side:
        rows.reverse()
        return LogPage(rows, newer=has_more, older=True)
    return LogPage(rows, newer=bool(view.after), older=has_more)
