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

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from proxy.identity import request_key
from proxy.store.signature import signature
from proxy.store.text import filter_tags, searchable


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    statements: tuple[str, ...]
    # Python work on existing rows, run after the statements in the same transaction.
    backfill: Callable[[sqlite3.Connection], None] | None = None


def _backfill_request_keys(conn: sqlite3.Connection) -> None:
    """Give completions stored before replay existed their request key."""
    last = 0
    while True:
        rows = conn.execute(
            "SELECT seq, request FROM completions WHERE request_key IS NULL AND seq > ?"
            " ORDER BY seq LIMIT 1000",
            (last,),
        ).fetchall()
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
        conn.executemany("UPDATE completions SET request_key = ? WHERE seq = ?", updates)
        last = rows[-1][0]


def _backfill_signatures(conn: sqlite3.Connection) -> None:
    """Give the metadata rows stored before m014 their completion's signature."""
    last = 0
    while True:
        rows = conn.execute(
            "SELECT seq, metadata FROM completions WHERE seq > ? ORDER BY seq LIMIT 5000",
            (last,),
        ).fetchall()
        if not rows:
            return
        conn.executemany(
            "UPDATE completion_metadata SET sig = ? WHERE seq = ?",
            [(signature(orjson.loads(metadata).items()), seq) for seq, metadata in rows],
        )
        last = rows[-1][0]


def _backfill_search(conn: sqlite3.Connection) -> None:
    """Index the text of every completion stored before search existed."""
    last = 0
    while True:
        rows = conn.execute(
            "SELECT seq, request, completion FROM completions WHERE seq > ?"
            " ORDER BY seq LIMIT 1000",
            (last,),
        ).fetchall()
        if not rows:
            return
        conn.executemany(
            "INSERT INTO completions_fts (rowid, body) VALUES (?, ?)",
            [(seq, searchable(request, completion)) for seq, request, completion in rows],
        )
        last = rows[-1][0]


def _backfill_search_tags(conn: sqlite3.Connection) -> None:
    """Index every completion again, with its filter tags."""
    last = 0
    while True:
        rows = conn.execute(
            "SELECT seq, caller, model, metadata, request, completion FROM completions"
            " WHERE seq > ? ORDER BY seq LIMIT 1000",
            (last,),
        ).fetchall()
        if not rows:
            return
        conn.executemany(
            "INSERT INTO completions_fts (rowid, body, tags) VALUES (?, ?, ?)",
            [
                (
                    seq,
                    searchable(request, completion),
                    " ".join(filter_tags(caller, model, orjson.loads(metadata).items())),
                )
                for seq, caller, model, metadata, request, completion in rows
            ],
        )
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
    Migration(
        "m005_team",
        (
            # Proxy keys: only a hash of the secret part is kept; key_id finds the row.
            """
            CREATE TABLE proxy_keys (
                name TEXT PRIMARY KEY,
                key_id TEXT NOT NULL UNIQUE,
                key_hash BLOB NOT NULL,
                role TEXT NOT NULL CHECK (role IN ('member', 'admin')),
                created_at REAL NOT NULL,
                revoked_at REAL
            )
            """,
            # Who changed or deleted what, when: append-only, enforced by triggers.
            """
            CREATE TABLE audit_log (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                at REAL NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                completion_id TEXT,
                owner TEXT,
                detail BLOB NOT NULL
            )
            """,
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log"
            " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log"
            " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
            # Exchanges that did not end in a stored completion (failed, aborted, refused).
            """
            CREATE TABLE exchanges (
                seq INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL,
                caller TEXT NOT NULL,
                created INTEGER NOT NULL,
                model TEXT NOT NULL,
                stream INTEGER NOT NULL,
                outcome TEXT NOT NULL,
                status INTEGER,
                request BLOB NOT NULL,
                response BLOB,
                duration_ms REAL
            )
            """,
            "CREATE INDEX exchanges_order ON exchanges (created, seq)",
            "CREATE INDEX exchanges_caller_order ON exchanges (caller, created, seq)",
            # Usage, promoted for per-caller / model / day sums.
            "ALTER TABLE completions ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE completions ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE completions ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0",
            """
            UPDATE completions SET
                prompt_tokens = coalesce(
                    json_extract(CAST(completion AS TEXT), '$.usage.prompt_tokens'), 0),
                cached_tokens = coalesce(json_extract(CAST(completion AS TEXT),
                    '$.usage.prompt_tokens_details.cached_tokens'), 0),
                completion_tokens = coalesce(
                    json_extract(CAST(completion AS TEXT), '$.usage.completion_tokens'), 0)
            """,
            # Deleted completions, kept hidden when audit.delete_purges is false.
            "CREATE TABLE deleted_completions AS SELECT * FROM completions WHERE 0",
            "ALTER TABLE deleted_completions ADD COLUMN deleted_at REAL",
            "ALTER TABLE deleted_completions ADD COLUMN deleted_by TEXT",
            # Admins list across callers: the same orders without the caller prefix.
            "CREATE INDEX completions_order ON completions (created, seq)",
            "CREATE INDEX completions_model_order ON completions (model, created, seq)",
            "CREATE INDEX completions_id ON completions (id)",
            "CREATE INDEX completion_metadata_all"
            " ON completion_metadata (key, value, created, seq)",
            "CREATE INDEX tombstones_id ON tombstones (id)",
        ),
    ),
    Migration(
        "m007_one_id_index",
        (
            # One index finds a completion by id for its owner and for an admin alike. Ids
            # are random, so every insert into an id index lands on a random page; two such
            # indexes cost each commit a page more to write, and an import that much more.
            "CREATE UNIQUE INDEX completions_id_caller ON completions (id, caller)",
            "DROP INDEX completions_caller_id",
            "DROP INDEX completions_id",
        ),
    ),
    Migration(
        "m008_caller_first_indexes",
        (
            # Every list index leads with the caller; an admin's list, usage and pruning read
            # caller by caller (see store._CALLERS). Each all-caller index cost every commit
            # one to three pages, and an import one more B-tree per row or metadata pair.
            "DROP INDEX completions_order",
            "DROP INDEX completions_model_order",
            "DROP INDEX completion_metadata_all",
            # Replay looks a request up by its key alone and checks the caller on the row (a
            # key has few rows): the index is half the size without the caller in it, and
            # it takes each row at a random place, so its size is what an import pays for.
            "CREATE INDEX completions_request ON completions (request_key)",
            "DROP INDEX completions_request_key",
        ),
    ),
    Migration(
        "m009_seq_never_reused",
        (
            # A seq places a completion in the list order and is what a deleted id's
            # tombstone keeps; without AUTOINCREMENT, deleting the newest completion let the
            # next insert take its seq, and a list after the deleted id skipped the new one.
            # SQLite cannot add AUTOINCREMENT to a table, so the table is rebuilt.
            """
            CREATE TABLE completions_m009 (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
                duration_ms REAL,
                request_key TEXT,
                prompt_tokens INTEGER NOT NULL DEFAULT 0,
                cached_tokens INTEGER NOT NULL DEFAULT 0,
                completion_tokens INTEGER NOT NULL DEFAULT 0
            )
            """,
            "INSERT INTO completions_m009 SELECT seq, id, caller, created, model, metadata,"
            " completion, request, request_id, stream, outcome, stored_at, duration_ms,"
            " request_key, prompt_tokens, cached_tokens, completion_tokens FROM completions",
            "DROP TABLE completions",
            "ALTER TABLE completions_m009 RENAME TO completions",
            "CREATE UNIQUE INDEX completions_id_caller ON completions (id, caller)",
            "CREATE INDEX completions_caller_order ON completions (caller, created, seq)",
            "CREATE INDEX completions_caller_model_order"
            " ON completions (caller, model, created, seq)",
            "CREATE INDEX completions_request ON completions (request_key)",
            # New seqs start past every seq a deleted completion had, too.
            "DELETE FROM sqlite_sequence WHERE name = 'completions'",
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'completions', max("
            " (SELECT coalesce(max(seq), 0) FROM completions),"
            " (SELECT coalesce(max(seq), 0) FROM tombstones),"
            " (SELECT coalesce(max(seq), 0) FROM deleted_completions))",
        ),
    ),
    Migration(
        "m010_search",
        (
            # Full-text search over prompts and answers (proxy.store.text.searchable): one
            # row per completion, rowid = its seq. The index keeps its own copy of the text
            # (an external-content table would need the text in a column of completions, a
            # contentless one the original text again to delete a row, which SQLite older
            # than 3.43 cannot do without it). Rows go in with their completion, in the same
            # transaction (_insert); the trigger takes them out with it, whoever deletes
            # (a delete, a prune, an import taken back).
            "CREATE VIRTUAL TABLE completions_fts USING fts5("
            " body, tokenize = 'unicode61 remove_diacritics 2', columnsize = 0)",
            "CREATE TRIGGER completions_fts_delete AFTER DELETE ON completions BEGIN"
            " DELETE FROM completions_fts WHERE rowid = old.seq; END",
        ),
        backfill=_backfill_search,
    ),
    Migration(
        "m011_usage_by_day",
        (
            # Tokens per (day, caller, model), kept by triggers in every transaction that
            # adds or removes a completion, so usage over whole days reads a few rows per
            # day instead of every completion in the range.
            """
            CREATE TABLE usage_by_day (
                day TEXT NOT NULL,
                caller TEXT NOT NULL,
                model TEXT NOT NULL,
                completions INTEGER NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                cached_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                PRIMARY KEY (day, caller, model)
            ) WITHOUT ROWID
            """,
            """
            CREATE TRIGGER usage_by_day_insert AFTER INSERT ON completions BEGIN
                INSERT INTO usage_by_day VALUES (
                    date(new.created, 'unixepoch'), new.caller, new.model, 1,
                    new.prompt_tokens, new.cached_tokens, new.completion_tokens
                ) ON CONFLICT (day, caller, model) DO UPDATE SET
                    completions = completions + 1,
                    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                    cached_tokens = cached_tokens + excluded.cached_tokens,
                    completion_tokens = completion_tokens + excluded.completion_tokens;
            END
            """,
            """
            CREATE TRIGGER usage_by_day_delete AFTER DELETE ON completions BEGIN
                UPDATE usage_by_day SET
                    completions = completions - 1,
                    prompt_tokens = prompt_tokens - old.prompt_tokens,
                    cached_tokens = cached_tokens - old.cached_tokens,
                    completion_tokens = completion_tokens - old.completion_tokens
                WHERE day = date(old.created, 'unixepoch') AND caller = old.caller
                    AND model = old.model;
            END
            """,
            "INSERT INTO usage_by_day SELECT date(created, 'unixepoch'), caller, model,"
            " count(*), sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens)"
            " FROM completions GROUP BY 1, 2, 3",
        ),
    ),
    Migration(
        "m012_ended_sessions",
        (
            # Console sessions signed out before they expire, so every process sharing
            # the file refuses them; a row is dropped once its session would have expired.
            "CREATE TABLE ended_sessions (sid TEXT PRIMARY KEY, expires REAL NOT NULL)"
            " WITHOUT ROWID",
        ),
    ),
    Migration(
        "m013_search_tags",
        (
            # The index gains a column of tags (text.filter_tags: the caller, the model and
            # each metadata pair as one token each), so a search with filters is an
            # intersection inside the index: a member searching a common word, or a word
            # with a metadata pair that never meets it, no longer tests every match. FTS5
            # tables cannot gain a column, so the table is made again and filled.
            "DROP TABLE completions_fts",
            "CREATE VIRTUAL TABLE completions_fts USING fts5("
            " body, tags, tokenize = 'unicode61 remove_diacritics 2', columnsize = 0)",
        ),
        backfill=_backfill_search_tags,
    ),
    Migration(
        "m014_metadata_signature",
        (
            # The signature of the completion's whole metadata on each of its pairs' rows
            # (see signature.py): a list with several pairs walks one pair's index range
            # and checks the others there, instead of one lookup per row.
            "ALTER TABLE completion_metadata ADD COLUMN sig INTEGER NOT NULL DEFAULT 0",
            "DROP INDEX completion_metadata_lookup",
        ),
        _backfill_signatures,
    ),
    Migration(
        "m015_metadata_lookup_with_signature",
        (
            "CREATE INDEX completion_metadata_lookup"
            " ON completion_metadata (caller, key, value, created, seq, sig)",
        ),
    ),
    Migration(
        "m016_search_contentless",
        (
            # The index holds the words only (content=''), not a second copy of the text,
            # which was most of what indexing wrote per completion. Without the text, FTS5
            # takes a row out only when given it again: the triggers below make it again
            # from the row (proxy.store.sqlite.search). Completions written while search is
            # off wait in search_backlog; every completion starts there, and the store
            # indexes the backlog in chunks when it opens (search.index_backlog), rather
            # than in this one transaction.
            "DROP TRIGGER completions_fts_delete",
            "DROP TABLE completions_fts",
            "CREATE VIRTUAL TABLE completions_fts USING fts5("
            " body, tags, tokenize = 'unicode61 remove_diacritics 2', columnsize = 0,"
            " content = '')",
            # Each commit adds a segment to the index and FTS5 merges them as they pile up;
            # the proxy commits a few completions at a time, so with the default (merge 4
            # segments of a level) every entry was rewritten once per level, about ten times
            # at a million completions. Merging 16 at a time halves the levels; a search
            # reads more segments (fractions of a millisecond). crisismerge must stay above.
            "INSERT INTO completions_fts (completions_fts, rank) VALUES ('automerge', 16)",
            "INSERT INTO completions_fts (completions_fts, rank) VALUES ('crisismerge', 32)",
            "CREATE TABLE search_backlog (seq INTEGER PRIMARY KEY)",
            "INSERT INTO search_backlog (seq) SELECT seq FROM completions",
            """
            CREATE TRIGGER completions_search_delete AFTER DELETE ON completions BEGIN
                INSERT INTO completions_fts (completions_fts, rowid, body, tags)
                    SELECT 'delete', old.seq, search_text(old.request, old.completion),
                        search_tags(old.caller, old.model, old.metadata)
                    WHERE NOT EXISTS (SELECT 1 FROM search_backlog WHERE seq = old.seq);
                DELETE FROM search_backlog WHERE seq = old.seq;
            END
            """,
            # A metadata edit changes the tags (and any other change of what the row is
            # found by would change the text): the old words out, the new ones in.
            """
            CREATE TRIGGER completions_search_update
            AFTER UPDATE OF caller, model, metadata, request, completion ON completions
            WHEN NOT EXISTS (SELECT 1 FROM search_backlog WHERE seq = old.seq) BEGIN
                INSERT INTO completions_fts (completions_fts, rowid, body, tags)
                    VALUES ('delete', old.seq, search_text(old.request, old.completion),
                        search_tags(old.caller, old.model, old.metadata));
                INSERT INTO completions_fts (rowid, body, tags)
                    VALUES (new.seq, search_text(new.request, new.completion),
                        search_tags(new.caller, new.model, new.metadata));
            END
            """,
        ),
    ),
    Migration(
        "m017_usage_by_day_per_batch",
        (
            # The store's insert adds each batch's completions to the rollup, one upsert per
            # (day, caller, model) of the batch, instead of this trigger's one per completion.
            "DROP TRIGGER usage_by_day_insert",
        ),
    ),
    Migration(
        "m018_search_pending_16mib",
        (
            # FTS5 writes the words it holds in memory out as a new segment whenever they
            # pass this size, and merges segments as they pile up. An import or a backlog
            # indexes a hundred thousand completions in one transaction: with the default
            # (1 MiB) that was a segment every few hundred, and a level of merging more. The
            # proxy's own commits hold a few completions and never reach it.
            "INSERT INTO completions_fts (completions_fts, rank) VALUES ('hashsize', 16777216)",
        ),
    ),
    Migration(
        "m019_search_merge_in_steps",
        (
            # FTS5's own merging (automerge) works in units of 64 pages times the number of
            # levels, so every few dozen commits one carried milliseconds of merging, and a
            # request waiting on it set the p99. The store's insert merges in small steps
            # instead, a few dozen pages at every fourth completion ('merge', see
            # MERGE_PAGES in proxy.store.sqlite.search), taking a level once it holds 16
            # segments, as automerge did.
            "INSERT INTO completions_fts (completions_fts, rank) VALUES ('automerge', 0)",
            "INSERT INTO completions_fts (completions_fts, rank) VALUES ('usermerge', 16)",
        ),
    ),
    Migration(
        "m020_metadata_one_tree",
        (
            # The metadata rows were stored twice: in the table by (seq, key) and in the
            # lookup index the lists read. Keyed by the lookup's columns, the table is that
            # index and each pair is written once. A pair of a known completion is then
            # found by its whole key (caller, key, value, created, seq), and a completion's
            # pairs by reading its metadata column (_DELETE_METADATA in proxy.store.sqlite.writes).
            """
            CREATE TABLE completion_metadata_m020 (
                caller TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                created INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                sig INTEGER NOT NULL,
                PRIMARY KEY (caller, key, value, created, seq)
            ) WITHOUT ROWID
            """,
            "INSERT INTO completion_metadata_m020 (caller, key, value, created, seq, sig)"
            " SELECT caller, key, value, created, seq, sig FROM completion_metadata"
            " ORDER BY caller, key, value, created, seq",
            "DROP TABLE completion_metadata",
            "ALTER TABLE completion_metadata_m020 RENAME TO completion_metadata",
        ),
    ),
)


def applied(conn: sqlite3.Connection) -> list[str]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply every step the database lacks, in order; return the names applied now.

    The connection must be in autocommit mode (``isolation_level=None``): each step opens
    its own ``BEGIN IMMEDIATE`` so two processes starting on one file cannot both apply it.
    """
    done = set(applied(conn))
    names = []
    for migration in MIGRATIONS:
        if migration.name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (migration.name,))
            if found.fetchone() is not None:  # another process applied it meanwhile
                conn.execute("COMMIT")
                continue
            for statement in migration.statements:
                conn.execute(statement)
            if migration.backfill is not None:
                migration.backfill(conn)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                (migration.name, time.time()),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        names.append(migration.name)
    return names
