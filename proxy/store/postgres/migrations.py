"""The PostgreSQL schema as ordered, named steps, each applied with its record in one transaction.

A step is never edited once released; a change of schema is a new step at the end. The
``_migrations`` table records what a database (or schema) has. ``migrate`` holds a
session-level advisory lock for the whole run, so when several proxy instances start at once
on one database exactly one applies each step and the others wait, then find it recorded.

Layout, as on SQLite: the completion's JSON and the client's request bytes (``bytea``) beside
a few promoted, indexed columns; metadata pairs are also rows of ``completion_metadata``,
indexed by (caller, key, value, created, seq), so a metadata filter is an index range read in
list order. ``seq`` comes from an identity sequence: never reused, even after the newest row
is deleted, so a deleted id keeps its place in the order.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import orjson

from proxy.store.postgres.search import TSVECTOR_CODEC, document, tag_words
from proxy.store.signature import signature
from proxy.store.text import filter_tags

# The first key of the two-key advisory locks this store takes; the second names the schema.
LOCK_SPACE = 0x63707278  # "cprx"
MIGRATE_LOCK = 1
RETENTION_LOCK = 2


# A completion's UTC day, from its ``created`` (Unix seconds).
USAGE_DAY = "(to_timestamp(created) AT TIME ZONE 'UTC')::date"

_USAGE_UPSERT = f"""
                INSERT INTO usage_by_day AS u
                SELECT {USAGE_DAY} AS day, caller, model, {{sign}}count(*),
                    {{sign}}sum(prompt_tokens), {{sign}}sum(cached_tokens),
                    {{sign}}sum(completion_tokens)
                FROM {{rows}} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                ON CONFLICT (day, caller, model) DO UPDATE SET
                    completions = u.completions + excluded.completions,
                    prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
                    cached_tokens = u.cached_tokens + excluded.cached_tokens,
                    completion_tokens = u.completion_tokens + excluded.completion_tokens;"""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    statements: tuple[str, ...]
    # Python work on existing rows, run after the statements in the same transaction.
    backfill: Callable[[asyncpg.Connection], Awaitable[None]] | None = None


async def _backfill_search(conn: asyncpg.Connection) -> None:
    """Give completions stored before full-text search their search document."""
    await conn.set_type_codec("tsvector", **TSVECTOR_CODEC)
    last = 0
    while rows := await conn.fetch(
        "SELECT seq, request, completion FROM completions WHERE seq > $1 ORDER BY seq LIMIT 1000",
        last,
    ):
        await conn.execute(
            "UPDATE completions c SET search = d.body"
            " FROM unnest($1::bigint[], $2::tsvector[]) AS d(seq, body) WHERE c.seq = d.seq",
            [row[0] for row in rows],
            [document(row[1], row[2]) for row in rows],
        )
        last = rows[-1][0]


async def _backfill_search_tags(conn: asyncpg.Connection) -> None:
    """Add each stored completion's filter tags (caller, model, metadata pairs) to its
    search document, so a search with filters intersects them inside the index."""
    last = 0
    while rows := await conn.fetch(
        "SELECT seq, caller, model, metadata FROM completions WHERE seq > $1"
        " ORDER BY seq LIMIT 5000",
        last,
    ):
        await conn.execute(
            "UPDATE completions c SET search = c.search || d.tags::tsvector"
            " FROM unnest($1::bigint[], $2::text[]) AS d(seq, tags) WHERE c.seq = d.seq",
            [row[0] for row in rows],
            [
                " ".join(tag_words(filter_tags(row[1], row[2], orjson.loads(row[3]).items())))
                for row in rows
            ],
        )
        last = rows[-1][0]


async def _backfill_signatures(conn: asyncpg.Connection) -> None:
    """Give completions stored before p009, and their metadata rows, their signature."""
    last = 0
    while rows := await conn.fetch(
        "SELECT seq, metadata FROM completions WHERE seq > $1 ORDER BY seq LIMIT 5000", last
    ):
        seqs = [row[0] for row in rows]
        sigs = [signature(orjson.loads(row[1]).items()) for row in rows]
        for table in ("completions", "completion_metadata"):
            await conn.execute(
                f"UPDATE {table} t SET sig = d.sig"
                " FROM unnest($1::bigint[], $2::bigint[]) AS d(seq, sig)"
                " WHERE t.seq = d.seq AND d.sig <> 0",
                seqs,
                sigs,
            )
        last = seqs[-1]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "p001_completions",
        (
            """
            CREATE TABLE completions (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                id text NOT NULL,
                caller text NOT NULL,
                created bigint NOT NULL,
                model text NOT NULL,
                metadata bytea NOT NULL,
                completion bytea NOT NULL,
                request bytea NOT NULL,
                request_id text,
                stream boolean NOT NULL,
                outcome text NOT NULL,
                stored_at double precision NOT NULL,
                duration_ms double precision,
                request_key text,
                prompt_tokens bigint NOT NULL DEFAULT 0,
                cached_tokens bigint NOT NULL DEFAULT 0,
                completion_tokens bigint NOT NULL DEFAULT 0
            )
            """,
            # One index finds a completion by id for its owner and for an admin alike.
            "CREATE UNIQUE INDEX completions_id_caller ON completions (id, caller)",
            # Every list index leads with the caller (an admin's list reads caller by caller).
            "CREATE INDEX completions_caller_order ON completions (caller, created, seq)",
            "CREATE INDEX completions_caller_model_order"
            " ON completions (caller, model, created, seq)",
            "CREATE INDEX completions_request ON completions (request_key)",
            """
            CREATE TABLE completion_metadata (
                seq bigint NOT NULL,
                key text NOT NULL,
                value text NOT NULL,
                caller text NOT NULL,
                created bigint NOT NULL,
                PRIMARY KEY (seq, key)
            )
            """,
            "CREATE INDEX completion_metadata_lookup"
            " ON completion_metadata (caller, key, value, created, seq)",
            # Deleted ids keep their place in the order, so `after=<deleted id>` pages on.
            """
            CREATE TABLE tombstones (
                caller text NOT NULL,
                id text NOT NULL,
                created bigint NOT NULL,
                seq bigint NOT NULL,
                deleted_at double precision NOT NULL,
                PRIMARY KEY (caller, id)
            )
            """,
            "CREATE INDEX tombstones_id ON tombstones (id)",
            "CREATE TABLE settings (name text PRIMARY KEY, value bytea NOT NULL)",
            # Proxy keys: only a hash of the secret part is kept; key_id finds the row.
            """
            CREATE TABLE proxy_keys (
                name text PRIMARY KEY,
                key_id text NOT NULL UNIQUE,
                key_hash bytea NOT NULL,
                role text NOT NULL CHECK (role IN ('member', 'admin')),
                created_at double precision NOT NULL,
                revoked_at double precision
            )
            """,
            # Who changed or deleted what, when: append-only, enforced by a trigger.
            """
            CREATE TABLE audit_log (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                at double precision NOT NULL,
                actor text NOT NULL,
                action text NOT NULL,
                completion_id text,
                owner text,
                detail bytea NOT NULL
            )
            """,
            """
            CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'audit_log is append-only';
            END
            $$
            """,
            "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log"
            " FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log"
            " FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
            # Exchanges that did not end in a stored completion (failed, aborted, refused).
            """
            CREATE TABLE exchanges (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                request_id text NOT NULL,
                caller text NOT NULL,
                created bigint NOT NULL,
                model text NOT NULL,
                stream boolean NOT NULL,
                outcome text NOT NULL,
                status integer,
                request bytea NOT NULL,
                response bytea,
                duration_ms double precision
            )
            """,
            "CREATE INDEX exchanges_order ON exchanges (created, seq)",
            "CREATE INDEX exchanges_caller_order ON exchanges (caller, created, seq)",
            "CREATE INDEX exchanges_request_id ON exchanges (request_id)",
            # Deleted completions, kept hidden when audit.delete_purges is false.
            """
            CREATE TABLE deleted_completions (
                seq bigint NOT NULL,
                id text NOT NULL,
                caller text NOT NULL,
                created bigint NOT NULL,
                model text NOT NULL,
                metadata bytea NOT NULL,
                completion bytea NOT NULL,
                request bytea NOT NULL,
                request_id text,
                stream boolean NOT NULL,
                outcome text NOT NULL,
                stored_at double precision NOT NULL,
                duration_ms double precision,
                request_key text,
                prompt_tokens bigint NOT NULL,
                cached_tokens bigint NOT NULL,
                completion_tokens bigint NOT NULL,
                deleted_at double precision NOT NULL,
                deleted_by text NOT NULL
            )
            """,
            "CREATE INDEX deleted_completions_created ON deleted_completions (created)",
        ),
    ),
    Migration(
        "p002_search",
        (
            # Full-text search: each completion's words and positions (see search.document), a
            # tsvector beside it, written in the completion's own statement, gone with its row.
            "ALTER TABLE completions ADD COLUMN search tsvector",
            "CREATE INDEX completions_search ON completions USING gin (search)",
            "CREATE INDEX exchanges_outcome_order ON exchanges (outcome, created, seq)",
        ),
        _backfill_search,
    ),
    Migration(
        "p003_ended_sessions",
        (
            # Console sessions signed out before they expire, refused by every instance.
            "CREATE TABLE ended_sessions (sid text PRIMARY KEY, expires double precision NOT NULL)",
        ),
    ),
    Migration(
        "p005_usage_by_day",
        (
            # Tokens per (UTC day, caller, model), kept by statement triggers in every
            # transaction that adds or removes completions, so usage over whole days reads a
            # few rows per day instead of every completion in the range. One grouped upsert
            # per statement (a batch, an import chunk, a prune), in key order, so concurrent
            # writers lock the rows they share in the same order and never deadlock.
            """
            CREATE TABLE usage_by_day (
                day date NOT NULL,
                caller text NOT NULL,
                model text NOT NULL,
                completions bigint NOT NULL,
                prompt_tokens bigint NOT NULL,
                cached_tokens bigint NOT NULL,
                completion_tokens bigint NOT NULL,
                PRIMARY KEY (day, caller, model)
            )
            """,
            f"""
            CREATE FUNCTION usage_by_day_add() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                {_USAGE_UPSERT.format(rows="added", sign="+")}
                RETURN NULL;
            END $$
            """,
            f"""
            CREATE FUNCTION usage_by_day_remove() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                {_USAGE_UPSERT.format(rows="removed", sign="-")}
                RETURN NULL;
            END $$
            """,
            "CREATE TRIGGER usage_by_day_insert AFTER INSERT ON completions"
            " REFERENCING NEW TABLE AS added FOR EACH STATEMENT"
            " EXECUTE FUNCTION usage_by_day_add()",
            "CREATE TRIGGER usage_by_day_delete AFTER DELETE ON completions"
            " REFERENCING OLD TABLE AS removed FOR EACH STATEMENT"
            " EXECUTE FUNCTION usage_by_day_remove()",
            f"""
            INSERT INTO usage_by_day
            SELECT {USAGE_DAY} AS day, caller, model, count(*), sum(prompt_tokens),
                sum(cached_tokens), sum(completion_tokens)
            FROM completions GROUP BY 1, 2, 3
            """,
        ),
    ),
    Migration(
        "p006_search_tags",
        (),  # the search documents gain their completions' filter tags
        _backfill_search_tags,
    ),
    Migration(
        "p007_unindexed",
        (
            # Completions written with search off (store.search: false) have no search
            # vector yet: this index finds them when search is turned back on, and holds
            # nothing while it is on.
            "CREATE INDEX completions_unindexed ON completions (seq) WHERE search IS NULL",
        ),
    ),
    Migration(
        "p008_lz4_bodies",
        (
            # A ~3 KB completion row is compressed on every insert; lz4 costs a fraction of
            # the default pglz. New rows only (old rows keep pglz, both read the same). A
            # server built without lz4 keeps pglz.
            """
            DO $$
            BEGIN
                ALTER TABLE completions
                    ALTER COLUMN completion SET COMPRESSION lz4,
                    ALTER COLUMN request SET COMPRESSION lz4,
                    ALTER COLUMN search SET COMPRESSION lz4;
            EXCEPTION WHEN feature_not_supported THEN
                NULL;
            END
            $$
            """,
        ),
    ),
    Migration(
        "p009_metadata_signature",
        (
            # The completion's metadata signature (proxy.store.signature) on the completion
            # and on each of its metadata rows: a list with several pairs walks the rarest
            # pair's index entries and rules most rows out by the signature alone.
            "ALTER TABLE completions ADD COLUMN sig bigint NOT NULL DEFAULT 0",
            "ALTER TABLE completion_metadata ADD COLUMN sig bigint NOT NULL DEFAULT 0",
        ),
        _backfill_signatures,
    ),
    Migration(
        "p010_metadata_index_with_signature",
        (
            # The pairs' index carries the signature, so the walk reads nothing else.
            "CREATE INDEX completion_metadata_pairs"
            " ON completion_metadata (caller, key, value, created, seq) INCLUDE (sig)",
            "DROP INDEX completion_metadata_lookup",
        ),
    ),
)

UNINDEXED_CHUNK = 1000  # completions given their search vector per statement


async def index_unindexed(conn: asyncpg.Connection) -> int:
    """Give every completion written while search was off its search vector; return how
    many. Under the migration lock, so instances starting together do it once; each chunk
    commits on its own, so writers wait for one chunk at most."""
    await conn.set_type_codec("tsvector", **TSVECTOR_CODEC)
    await conn.execute(
        "SELECT pg_advisory_lock($1, hashtext(current_schema()))", LOCK_SPACE + MIGRATE_LOCK
    )
    done = 0
    try:
        while rows := await conn.fetch(
            "SELECT seq, request, completion, caller, model, metadata FROM completions"
            " WHERE search IS NULL ORDER BY seq LIMIT $1",
            UNINDEXED_CHUNK,
        ):
            await conn.execute(
                "UPDATE completions c SET search = d.body"
                " FROM unnest($1::bigint[], $2::tsvector[]) AS d(seq, body) WHERE c.seq = d.seq",
                [row[0] for row in rows],
                [
                    document(
                        row[1], row[2], filter_tags(row[3], row[4], orjson.loads(row[5]).items())
                    )
                    for row in rows
                ],
            )
            done += len(rows)
        return done
    finally:
        await conn.execute(
            "SELECT pg_advisory_unlock($1, hashtext(current_schema()))", LOCK_SPACE + MIGRATE_LOCK
        )


async def applied(conn: asyncpg.Connection) -> list[str]:
    """Names of the steps this database has, in the order they were applied."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations"
        " (name text PRIMARY KEY, applied_at double precision NOT NULL)"
    )
    rows = await conn.fetch("SELECT name FROM _migrations ORDER BY applied_at, name")
    return [row[0] for row in rows]


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every step the database lacks, in order; return the names applied now.

    The whole run holds the migration advisory lock of the current schema: a second
    instance starting at the same moment waits here, then finds every step recorded.
    """
    await conn.execute(
        "SELECT pg_advisory_lock($1, hashtext(current_schema()))", LOCK_SPACE + MIGRATE_LOCK
    )
    try:
        async with conn.transaction():  # the bookkeeping table, made once under the lock
            done = set(await applied(conn))
        names = []
        for migration in MIGRATIONS:
            if migration.name in done:
                continue
            async with conn.transaction():
                for statement in migration.statements:
                    await conn.execute(statement)
                if migration.backfill is not None:
                    await migration.backfill(conn)
                await conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES ($1, $2)",
                    migration.name,
                    time.time(),
                )
            names.append(migration.name)
        return names
    finally:
        await conn.execute(
            "SELECT pg_advisory_unlock($1, hashtext(current_schema()))", LOCK_SPACE + MIGRATE_LOCK
        )
