"""The log's rows: what a page of completions looks like to a person, read from the store."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from proxy.config import Price
from proxy.console.filters import PAGE_SIZE, LogView
from proxy.models import ListQuery, PageQuery
from proxy.store import Store
from proxy.usage import cost

PREVIEW_CHARS = 160


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    created: int
    model: str
    caller: str | None
    outcome: str | None
    duration_ms: float | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    metadata: dict[str, str]
    preview: str
    cost: float | None = None


@dataclass(frozen=True, slots=True)
class LogPage:
    entries: list[Entry]
    newer: bool  # there are newer rows than the first shown
    older: bool


def preview(request: Any) -> str:
    """The last user message's text, shortened: what the exchange was about."""
    messages = request.get("messages") if isinstance(request, dict) else None
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            text = " ".join(str(content or "").split())
            return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"
    return ""


def priced(entry: Entry, prices: Mapping[str, Price]) -> Entry:
    dollars = cost(
        prices, entry.model, entry.prompt_tokens, entry.cached_tokens, entry.completion_tokens
    )
    return replace(entry, cost=dollars)


def _from_api(body: bytes, request: bytes | None) -> Entry:
    data = orjson.loads(body)
    usage = data.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return Entry(
        id=data["id"],
        created=int(data.get("created") or 0),
        model=str(data.get("model") or ""),
        caller=None,
        outcome=None,
        duration_ms=None,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        metadata=data.get("metadata") or {},
        preview=preview(orjson.loads(request)) if request else "",
    )


async def log_page(
    store: Store, scope: str | None, view: LogView, prices: Mapping[str, Price]
) -> LogPage:
    """Newest first; ``after`` pages to older rows, ``before`` to newer ones."""
    newer_side = bool(view.before) and not view.after
    query = ListQuery(
        page=PageQuery(
            after=(view.before if newer_side else view.after) or None,
            limit=PAGE_SIZE,
            order="asc" if newer_side else "desc",
        ),
        model=view.model or None,
        metadata=view.meta,
        owner=view.caller or None,
    )
    page = await store.list_completions(scope, query)
    entries = [
        priced(_from_api(body, await store.request_of(scope, cid)), prices)
        for cid, body in page.items
    ]
    if newer_side:
        entries.reverse()
        return LogPage(entries, newer=page.has_more, older=True)
    return LogPage(entries, newer=bool(view.after), older=page.has_more)
