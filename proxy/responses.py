"""The API's JSON built from store records: one place, whatever the backend.

A store returns data (records); these functions shape it as the wire contract wants:
a stored chat.completion with its metadata, a page of them, a page of exchanges, the audit
log. Stored JSON is spliced in as bytes, never decoded and encoded again.
"""

from __future__ import annotations

import orjson

from proxy.assemble import list_body, with_metadata
from proxy.store import AuditEntry, ExchangeRecord, Page, StoredCompletion


def stored_completion(stored: StoredCompletion) -> bytes:
    """A ``chat.completion`` object as retrieve, update and list return it."""
    return with_metadata(stored.completion, stored.metadata)


def completion_page(page: Page[StoredCompletion]) -> bytes:
    """A list page of stored completions."""
    return list_body([(s.id, stored_completion(s)) for s in page.items], page.has_more)


def exchange(record: ExchangeRecord) -> bytes:
    """An ``exchange`` object: an exchange that stored no completion, for audit."""
    response = record.response
    return orjson.dumps(
        {
            "object": "exchange",
            "request_id": record.request_id,
            "caller": record.caller,
            "created": record.created,
            "model": record.model,
            "stream": record.stream,
            "outcome": record.outcome,
            "status": record.status,
            "request": orjson.Fragment(record.request),
            "response": None if response is None else response.decode("utf-8", "replace"),
            "duration_ms": record.duration_ms,
        }
    )


def exchange_page(page: Page[ExchangeRecord]) -> bytes:
    """A list page of exchanges, keyed by request id."""
    return list_body([(r.request_id, exchange(r)) for r in page.items], page.has_more)


def audit_entry(entry: AuditEntry) -> bytes:
    """One audit log entry."""
    return orjson.dumps(
        {
            "seq": entry.seq,
            "at": entry.at,
            "actor": entry.actor,
            "action": entry.action,
            "completion_id": entry.completion_id,
            "owner": entry.owner,
            "detail": orjson.Fragment(entry.detail),
        }
    )


def audit_page(entries: list[AuditEntry]) -> bytes:
    """The audit log list: entries oldest first (paged by ``seq``, so no ``has_more``)."""
    return b'{"object":"list","data":[' + b",".join(map(audit_entry, entries)) + b"]}"
