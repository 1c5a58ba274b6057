"""What keeps SQLite's full-text index in step with the completions, on and off.

The index (``completions_fts``, see ``m016_search_contentless``) holds the words of each
completion's text and tags, not a copy of the text: FTS5 takes a row out of such an index
only when given the same text again, so the schema's triggers make it again from the row
being deleted or changed, through the SQL functions ``search_text`` and ``search_tags``
(``proxy.store.text``), which every connection of the store registers (``add_functions``). A
tool without them cannot delete completions from the file: the delete fails, rather than
leave the words of a deleted completion in the index.

The store's insert indexes each new completion in its own transaction. One written while
search is off (``store.search: false``) is not indexed; its seq goes to ``search_backlog``
instead, in the same transaction, and ``index_backlog`` indexes those rows when the store
next opens with search on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from proxy.store.text import searchable, stored_tags

# Rows indexed per transaction when the backlog is indexed: each transaction holds the file's
# write lock, so other writers wait for one chunk at most.
BACKLOG_CHUNK = 2_000
# Index pages merged at most per completion indexed, in the transactions that index them
# (m019 turned FTS5's own merging off). Each completion's entries are rewritten once per
# level, about one page each, and a million completions make five levels: twice that keeps
# up. A step runs at every MERGE_EVERY-th completion (by seq), for that many: a merge call
# has a fixed cost (the index's structure is read and written again), and a step of 32
# pages is a fraction of a millisecond, where FTS5's own unit was 64 pages per level.
MERGE_PAGES = 8
MERGE_EVERY = 4
_MERGE = "INSERT INTO completions_fts (completions_fts, rank) VALUES ('merge', ?)"


def add_functions(conn: sqlite3.Connection) -> None:
    """The functions the index's triggers call (deterministic: the same row, the same text)."""
    conn.create_function("search_text", 2, searchable, deterministic=True)
    conn.create_function("search_tags", 3, stored_tags, deterministic=True)


def merge(conn: sqlite3.Connection, pages: int) -> None:
    """Merge up to ``pages`` pages of the index's segments, inside the caller's transaction;
    a level is merged once it holds 16 segments (m019)."""
    if pages:
        conn.execute(_MERGE, (pages,))


def merge_step(conn: sqlite3.Connection, seqs: Iterable[int]) -> None:
    """The merging owed after the completions ``seqs`` were indexed (see ``MERGE_EVERY``)."""
    due = sum(1 for seq in seqs if seq % MERGE_EVERY == 0)
    merge(conn, MERGE_PAGES * MERGE_EVERY * due)


def index_backlog(conn: sqlite3.Connection, limit: int = BACKLOG_CHUNK) -> int:
    """Index the oldest ``limit`` completions of the backlog and take them off it, inside the
    caller's transaction; return how many there were."""
    row = conn.execute(
        "SELECT max(seq), count(*) FROM (SELECT seq FROM search_backlog ORDER BY seq LIMIT ?)",
        (limit,),
    ).fetchone()
    if not row[1]:
        return 0
    conn.execute(
        "INSERT INTO completions_fts (rowid, body, tags)"
        " SELECT c.seq, search_text(c.request, c.completion),"
        " search_tags(c.caller, c.model, c.metadata)"
        " FROM search_backlog b CROSS JOIN completions c ON c.seq = b.seq WHERE b.seq <= ?",
        (row[0],),
    )
    conn.execute("DELETE FROM search_backlog WHERE seq <= ?", (row[0],))
    count: int = row[1]
    merge(conn, MERGE_PAGES * count)
    return count
