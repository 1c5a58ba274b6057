"""The SQLite schema as ordered, named steps, each applied with its record in one transaction.

A step is never edited once released; a change of schema is a new step at the end. The
``_migrations`` table records what a database file has, so an old file is brought forward
step by step and a current one is left alone.

Layout: the completion's JSON (``completion``) and the client's request bytes (``request``)
sit beside a few promoted, indexed columns (caller, id, created, model). Metadata pairs are
also kept in ``completion_metadata``, indexed by (caller, key, value, created, seq), so a
metadata filter is an index range read in list order rather than a scan.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosqlite
import orjson

from proxy.replay import request_key


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    statements: tuple[str, ...]
    # Python work on existing rows, run after the statements in the same transaction.
    backfill: Callable[[aiosqlite.Connection], Awaitable[None]] | None = None


async def _backfill_request_keys(conn: aiosqlite.Connection) -> None:
    """Give completions stored before replay existed their request key."""
    last = 0
    while True:
        async with conn.execute(
            "SELECT seq, request FROM completions WHERE request_key IS NULL AND seq > ?"
            " ORDER BY seq LIMIT 1000",
            (last,),
        ) as cursor:
            rows = list(await cursor.fetchall())
        if not rows:
            return
        updates = []
        for seq, request in rows:
            try:
                body = orjson.loads(request)
            except orjson.JSONDecodeError:
                continue
            if isinstance(body, dict):
                updates.append((request_key(body), seq))
        await conn.executemany("UPDATE completions SET request_key = ? WHERE seq = ?", updates)
        last = rows[-1][0]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "m001_completions",
        (
            """
            CREATE TABLE completions (
                seq INTEGER PRIMARY KEY,
                id TEXT NOT NULL,
                caller TEXT NOT NULL,
                created INTEGER NOT NULL,
                model TEXT NOT NULL,
                metadata BLOB NOT NULL,
                completion BLOB NOT NULL,
                request BLOB NOT NULL,
                request_id TEXT,
                stream INTEGER NOT NULL,
                outcome TEXT NOT NULL,
                stored_at REAL NOT NULL,
                duration_ms REAL
            )
            """,
            "CREATE UNIQUE INDEX completions_caller_id ON completions (caller, id)",
            "CREATE INDEX completions_caller_order ON completions (caller, created, seq)",
            "CREATE INDEX completions_caller_model_order"
            " ON completions (caller, model, created, seq)",
            """
            CREATE TABLE completion_metadata (
                seq INTEGER NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                caller TEXT NOT NULL,
                created INTEGER NOT NULL,
                PRIMARY KEY (seq, key)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX completion_metadata_lookup"
            " ON completion_metadata (caller, key, value, created, seq)",
        ),
    ),
    Migration(
        "m002_tombstones",
        (
            # Deleted ids keep their place in the order, so `after=<deleted id>` still pages on:
            # a loop that deletes what it lists does not break on its next page.
            """
            CREATE TABLE tombstones (
                caller TEXT NOT NULL,
                id TEXT NOT NULL,
                created INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                deleted_at REAL NOT NULL,
                PRIMARY KEY (caller, id)
            ) WITHOUT ROWID
            """,
        ),
    ),
    Migration(
        "m003_settings",
        ("CREATE TABLE settings (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",),
    ),
    Migration(
        "m004_request_key",
        (
            "ALTER TABLE completions ADD COLUMN request_key TEXT",
            "CREATE INDEX completions_request_key ON completions (request_key, caller, seq)",
        ),
        _backfill_request_keys,
    ),
)


async def applied(conn: aiosqlite.Connection) -> list[str]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    async with conn.execute("SELECT name FROM _migrations ORDER BY rowid") as cursor:
        return [row[0] async for row in cursor]


async def migrate(conn: aiosqlite.Connection) -> list[str]:
    """Apply every step the database lacks, in order; return the names applied now.

    The connection must be in autocommit mode (``isolation_level=None``): each step opens
    its own ``BEGIN IMMEDIATE`` so two processes starting on one file cannot both apply it.
    """
    done = set(await applied(conn))
    names = []
    for migration in MIGRATIONS:
        if migration.name in done:
            continue
        await conn.execute("BEGIN IMMEDIATE")
        try:
            async with conn.execute(
                "SELECT 1 FROM _migrations WHERE name = ?", (migration.name,)
            ) as cursor:
                if await cursor.fetchone() is not None:  # another process applied it meanwhile
                    await conn.execute("COMMIT")
                    continue
            for statement in migration.statements:
                await conn.execute(statement)
            if migration.backfill is not None:
                await migration.backfill(conn)
            await conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                (migration.name, time.time()),
            )
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")
        names.append(migration.name)
    return names
