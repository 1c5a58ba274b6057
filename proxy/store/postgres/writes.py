"""The PostgreSQL store's writes other than the writer's batches and imports: each a function
given a pooled connection, which runs its own transaction (``store.PostgresStore`` acquires
the connection and passes it on), and the pieces the inserts share (``derive``, the column
arrays of a batch).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

from proxy.store.errors import KeyExists
from proxy.store.postgres import queries, search
from proxy.store.postgres.migrations import LOCK_SPACE, RETENTION_LOCK
from proxy.store.records import (
    CompletionRecord,
    ExchangeRecord,
    Importable,
    Prepared,
    PruneReport,
    StoredCompletion,
    encode_metadata,
)
from proxy.store.signature import signature
from proxy.store.text import filter_tags

# Tables whose rows hold content (see prune): rewritten when a quarter of one was deleted.
CONTENT_TABLES = (
    "completions",
    "completion_metadata",
    "exchanges",
    "deleted_completions",
    "tombstones",
)


def _tags(record: CompletionRecord) -> list[str]:
    return filter_tags(record.caller, record.model, record.metadata.items())


def derive(record: CompletionRecord, index: bool = True) -> tuple[bytes | None, int]:
    """What the insert computes from a completion (``Store.derive``): its search document
    (None, not indexed yet, with search off) and its metadata's signature."""
    document = (
        search.document(record.request, record.completion, _tags(record), record.parsed)
        if index
        else None
    )
    return document, signature(record.metadata.items())


def columns(items: Sequence[Importable], now: float, index: bool = True) -> list[list[Any]]:
    """The batch as one list per column, in ``queries.COMPLETION_COLUMNS`` order, then the
    search documents and the signatures (see ``derive``)."""
    prepared = [
        item if isinstance(item, Prepared) else Prepared(item, derive(item, index))
        for item in items
    ]
    records = [p.record for p in prepared]
    return [
        [r.id for r in records],
        [r.caller for r in records],
        [r.created for r in records],
        [r.model for r in records],
        [encode_metadata(r.metadata) for r in records],
        [r.completion for r in records],
        [r.request for r in records],
        [r.request_id for r in records],
        [r.stream for r in records],
        [r.outcome for r in records],
        [r.stored_at if r.stored_at is not None else now for r in records],
        [r.duration_ms for r in records],
        [r.request_key for r in records],
        [r.prompt_tokens for r in records],
        [r.cached_tokens for r in records],
        [r.completion_tokens for r in records],
        [p.derived[0] for p in prepared],
        [p.derived[1] for p in prepared],
    ]


def exchange_columns(records: Sequence[ExchangeRecord]) -> list[list[Any]]:
    return [
        [r.request_id for r in records],
        [r.caller for r in records],
        [r.created for r in records],
        [r.model for r in records],
        [r.stream for r in records],
        [r.outcome for r in records],
        [r.status for r in records],
        [r.request for r in records],
        [r.response for r in records],
        [r.duration_ms for r in records],
    ]


async def _audit(  # noqa: PLR0917 - one row's columns, in the table's order
    conn: asyncpg.Connection,
    actor: str,
    action: str,
    completion_id: str | None,
    owner: str | None,
    detail: dict[str, object],
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (at, actor, action, completion_id, owner, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        time.time(),
        actor,
        action,
        completion_id,
        owner,
        orjson.dumps(detail),
    )


async def _locate(
    conn: asyncpg.Connection, caller: str | None, completion_id: str
) -> asyncpg.Record | None:
    """(seq, caller, created, metadata) of a completion this caller may see, locked."""
    if caller is None:
        return await conn.fetchrow(
            "SELECT seq, caller, created, metadata FROM completions WHERE id = $1"
            " ORDER BY seq LIMIT 1 FOR UPDATE",
            completion_id,
        )
    return await conn.fetchrow(
        "SELECT seq, caller, created, metadata FROM completions WHERE id = $1 AND caller = $2"
        " FOR UPDATE",
        completion_id,
        caller,
    )


async def _count(conn: asyncpg.Connection, sql: str, *args: object) -> int:
    """Rows a DELETE removed, from its command tag (``DELETE n``)."""
    tag: str = await conn.execute(sql, *args)
    return int(tag.rsplit(" ", 1)[-1])


def _lock_key(kind: int) -> str:
    return f"{LOCK_SPACE + kind}, hashtext(current_schema())"


async def probe(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO settings (name, value) VALUES ('probe', $1)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        str(time.time()).encode(),
    )


async def update_metadata(
    conn: asyncpg.Connection,
    caller: str | None,
    completion_id: str,
    metadata: dict[str, str],
    actor: str,
) -> StoredCompletion | None:
    """Replace the metadata map; the change (before and after) goes to the audit log."""
    encoded = encode_metadata(metadata)
    async with conn.transaction():
        found = await _locate(conn, caller, completion_id)
        if found is None:
            return None
        seq, owner, created, before = found
        sig = signature(metadata.items())
        # The pairs' search tags change with them (the caller's and model's stay).
        completion = await conn.fetchval(
            "UPDATE completions SET metadata = $1, sig = $2,"
            " search = ts_delete(search, $4::text[]) || $5::text::tsvector"
            " WHERE seq = $3 RETURNING completion",
            encoded,
            sig,
            seq,
            filter_tags(None, None, orjson.loads(before).items()),
            " ".join(search.tag_words(filter_tags(None, None, metadata.items()))),
        )
        await conn.execute("DELETE FROM completion_metadata WHERE seq = $1", seq)
        if metadata:
            await conn.execute(
                "INSERT INTO completion_metadata (seq, key, value, caller, created, sig)"
                " SELECT $1, key, value, $2, $3, $6 FROM unnest($4::text[], $5::text[])"
                " AS pairs(key, value)",
                seq,
                owner,
                created,
                list(metadata),
                list(metadata.values()),
                sig,
            )
        await _audit(
            conn,
            actor,
            "update_metadata",
            completion_id,
            owner,
            {"before": orjson.loads(before), "after": metadata},
        )
    return StoredCompletion(id=completion_id, completion=completion, metadata=encoded)


async def delete(
    conn: asyncpg.Connection,
    caller: str | None,
    completion_id: str,
    actor: str,
    *,
    purge: bool = True,
) -> bool:
    """Delete a completion; with ``purge=False`` its row is kept in deleted_completions.

    Either way the deletion goes to the audit log, and the id keeps its place in the
    order (a tombstone) so paging with ``after=<deleted id>`` goes on.
    """
    async with conn.transaction():
        found = await _locate(conn, caller, completion_id)
        if found is None:
            return False
        seq, owner, created, metadata = found
        now = time.time()
        if not purge:
            names = ", ".join(("seq", *queries.COMPLETION_COLUMNS))
            await conn.execute(
                f"INSERT INTO deleted_completions ({names}, deleted_at, deleted_by)"
                f" SELECT {names}, $1, $2 FROM completions WHERE seq = $3",
                now,
                actor,
                seq,
            )
        await conn.execute("DELETE FROM completion_metadata WHERE seq = $1", seq)
        await conn.execute("DELETE FROM completions WHERE seq = $1", seq)
        await conn.execute(
            "INSERT INTO tombstones (caller, id, created, seq, deleted_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (caller, id) DO UPDATE SET"
            " created = excluded.created, seq = excluded.seq,"
            " deleted_at = excluded.deleted_at",
            owner,
            completion_id,
            created,
            seq,
            now,
        )
        await _audit(
            conn,
            actor,
            "delete",
            completion_id,
            owner,
            {"metadata": orjson.loads(metadata), "content_purged": purge},
        )
    return True


async def create_key(
    conn: asyncpg.Connection,
    name: str,
    role: str,
    key_id: str,
    key_hash: bytes,
    *,
    actor: str = "cli",
) -> None:
    """Add a proxy key; raises ``KeyExists`` when the name is taken."""
    async with conn.transaction():
        created = await conn.fetchval(
            "INSERT INTO proxy_keys (name, key_id, key_hash, role, created_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING RETURNING name",
            name,
            key_id,
            key_hash,
            role,
            time.time(),
        )
        if created is None:
            raise KeyExists(name)
        await _audit(conn, actor, "key_created", None, name, {"role": role})


async def revoke_key(conn: asyncpg.Connection, name: str, *, actor: str = "cli") -> bool:
    """Revoke a live key; ``actor`` (who did it) goes to the audit trail."""
    async with conn.transaction():
        revoked = await conn.fetchval(
            "UPDATE proxy_keys SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL"
            " RETURNING name",
            time.time(),
            name,
        )
        if revoked is not None:
            await _audit(conn, actor, "key_revoked", None, name, {})
    return revoked is not None


async def _size(conn: asyncpg.Connection) -> int:
    size: int = await conn.fetchval(
        "SELECT sum(pg_total_relation_size(to_regclass(name)))::bigint"
        " FROM unnest($1::text[]) AS tables(name)",
        list(CONTENT_TABLES),
    )
    return size


async def prune(conn: asyncpg.Connection, before: int) -> PruneReport:
    """Delete everything created before ``before``, so that it is gone for good.

    One instance prunes at a time (a transaction-level advisory lock); another instance
    that finds the lock taken skips this run and reports nothing deleted. After the
    delete, each content table is vacuumed; a table that lost a quarter or more of its
    rows is rewritten (``VACUUM FULL``), so the deleted bytes are no longer in its files
    (docs/storage-postgres.md says what "gone" means here).
    """
    bytes_before = await _size(conn)
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        if not await conn.fetchval(
            f"SELECT pg_try_advisory_xact_lock({_lock_key(RETENTION_LOCK)})"
        ):
            return PruneReport(0, 0)
        before_rows = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in CONTENT_TABLES
        }
        old = f"caller IN ({queries.CALLERS} SELECT caller FROM callers) AND created < $1"
        deleted = {
            "completion_metadata": await _count(
                conn,
                "DELETE FROM completion_metadata WHERE seq IN"
                f" (SELECT seq FROM completions WHERE {old})",
                before,
            ),
            "completions": await _count(conn, f"DELETE FROM completions WHERE {old}", before),
            "exchanges": await _count(conn, "DELETE FROM exchanges WHERE created < $1", before),
            "tombstones": await _count(conn, "DELETE FROM tombstones WHERE created < $1", before),
            "deleted_completions": await _count(
                conn, "DELETE FROM deleted_completions WHERE created < $1", before
            ),
        }
        completions, exchanges = deleted["completions"], deleted["exchanges"]
        if completions or exchanges:
            await _audit(
                conn,
                "retention",
                "prune",
                None,
                None,
                {"before": before, "completions": completions, "exchanges": exchanges},
            )
    # Outside the transaction: VACUUM cannot run in one.
    await conn.execute("SET statement_timeout = 0")
    try:
        for table in CONTENT_TABLES:
            if not deleted[table]:
                continue
            full = deleted[table] * 4 >= before_rows[table]
            await conn.execute(f"VACUUM {'FULL ' if full else ''}{table}")
    finally:
        await conn.execute("RESET statement_timeout")
    return PruneReport(completions, exchanges, bytes_before, await _size(conn))


async def setting(conn: asyncpg.Connection, name: str, default: bytes) -> bytes:
    """The stored value of a setting, storing ``default`` first if there is none."""
    await conn.execute(
        "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        name,
        default,
    )
    value: bytes = await conn.fetchval("SELECT value FROM settings WHERE name = $1", name)
    return value


async def end_session(conn: asyncpg.Connection, session_id: str, expires: float) -> None:
    async with conn.transaction():
        await conn.execute("DELETE FROM ended_sessions WHERE expires < $1", time.time())
        await conn.execute(
            "INSERT INTO ended_sessions (sid, expires) VALUES ($1, $2)"
            " ON CONFLICT (sid) DO UPDATE SET expires = excluded.expires",
            session_id,
            expires,
        )
