"""The SQLite store's reads as SQL: keyset pages (by caller, model, metadata pairs, time),
the walk and the count that pick which metadata pair drives a page, full-text search pages,
and the columns of a log row; pure functions that return SQL and its parameters, run by
``SQLiteStore`` on its read connection. Each page reads one index range in list order
(docs/storage.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from proxy.models import ListQuery, Order
from proxy.store.records import LogEntry
from proxy.store.signature import signature
from proxy.store.text import preview

COLUMNS = "c.id, c.completion, c.metadata"
# A log row (``LogEntry``): the promoted columns and the last input message's content,
# read from the request without loading it into Python.
LOG_COLUMNS = (
    "c.id, c.caller, c.created, c.model, c.outcome, c.stream, c.duration_ms, c.stored_at,"
    " c.prompt_tokens, c.cached_tokens, c.completion_tokens, c.metadata,"
    " CASE WHEN json_valid(CAST(c.request AS TEXT))"
    " THEN json_extract(CAST(c.request AS TEXT), '$.messages[#-1].content') END"
)

# Every caller with a stored completion, oldest name first: one seek in the caller-order
# index per caller (a skip scan), not a read of every row. Admins read across callers with
# it, caller by caller, since every list index leads with the caller (see m008).
CALLERS = (
    "WITH RECURSIVE callers(caller) AS ("
    " SELECT min(caller) FROM completions"
    " UNION ALL SELECT (SELECT min(caller) FROM completions WHERE caller > callers.caller)"
    " FROM callers WHERE callers.caller IS NOT NULL)"
    " SELECT caller FROM callers WHERE caller IS NOT NULL"
)

# One metadata pair of the completion ``row`` (with caller, created and seq): a lookup of
# the whole key.
PAIR_OF = (
    "SELECT 1 FROM completion_metadata x WHERE x.caller = {row}.caller AND x.key = ?"
    " AND x.value = ? AND x.created = {row}.created AND x.seq = {row}.seq"
)

# A list with several metadata pairs walks the rarest pair's rows; each pair's rows are
# counted up to this many to find it (an index range each, about 50 ns a row).
RAREST_CAP = 5_000
# Before counting, a list with several pairs reads this many of the first pair's entries:
# when its matches are dense the page fills there, in one statement and no count.
FIRST_WALK = 1_000

GROUPS = {"caller": "caller", "model": "model", "day": "date(created, 'unixepoch')"}


def page_sql(
    caller: str,
    query: ListQuery,
    cursor: tuple[int, int] | None,
    order: Order,
    limit: int,
    *,
    keys_only: bool = False,
    driver: int = 0,
    columns: str = COLUMNS,
) -> tuple[str, list[object]]:
    """One caller's keyset page as SQL, read in order from an index that leads with the
    caller: when filtering by metadata, the index range of pair ``driver`` (the rarest, see
    ``SQLiteStore._rarest``), each row checked for the other pairs: first by the signature
    on its index entry, then, for the few that pass, exactly by their whole key, before its
    completion is read; else the model's or the plain order. With ``keys_only`` it reads just the
    page's ``(created, seq)``, from the indexes alone when there is no model filter. A time
    range bounds the same index range."""
    direction = "ASC" if order == "asc" else "DESC"
    compare = ">" if order == "asc" else "<"
    params: list[object] = []
    where: list[str] = []
    if query.metadata:
        (key, value) = query.metadata[driver]
        rest = query.metadata[:driver] + query.metadata[driver + 1 :]
        source = "completion_metadata m"
        if not keys_only or query.model is not None:
            source += " CROSS JOIN completions c ON c.seq = m.seq"
        where.append("m.caller = ? AND m.key = ? AND m.value = ?")
        params += [caller, key, value]
        keys = "m.created, m.seq"
        if rest:
            where.append("(m.sig & ?) = ?")
            params += [signature(rest)] * 2
        for key, value in rest:
            where.append(f"EXISTS ({PAIR_OF.format(row='m')})")
            params += [key, value]
    else:
        source = "completions c"
        where.append("c.caller = ?")
        params.append(caller)
        keys = "c.created, c.seq"
    if query.model is not None:
        where.append("c.model = ?")
        params.append(query.model)
    first, second = keys.split(", ")
    if query.since is not None:
        where.append(f"{first} >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append(f"{first} < ?")
        params.append(query.until)
    if cursor is not None:
        where.append(f"({keys}) {compare} (?, ?)")
        params += list(cursor)
    sql = (
        f"SELECT {keys if keys_only else columns} FROM {source}"
        f" WHERE {' AND '.join(where)}"
        f" ORDER BY {first} {direction}, {second} {direction} LIMIT ?"
    )
    params.append(limit + 1)
    return sql, params


def walked_sql(  # noqa: PLR0917 - a page query's parts, as page_sql takes them
    caller: str,
    query: ListQuery,
    cursor: tuple[int, int] | None,
    order: Order,
    limit: int,
    columns: str,
    walk: int,
) -> tuple[str, list[object]]:
    """A page with several metadata pairs driven by the first, reading at most ``walk`` of
    its index entries (in a subquery, in list order). When the page fills within them it is
    the page ``page_sql`` gives; when it does not, nothing is known (see ``_select_page``)."""
    direction = "ASC" if order == "asc" else "DESC"
    compare = ">" if order == "asc" else "<"
    (key, value), rest = query.metadata[0], query.metadata[1:]
    inner = ["caller = ?", "key = ?", "value = ?"]
    params: list[object] = [caller, key, value]
    if query.since is not None:
        inner.append("created >= ?")
        params.append(query.since)
    if query.until is not None:
        inner.append("created < ?")
        params.append(query.until)
    if cursor is not None:
        inner.append(f"(created, seq) {compare} (?, ?)")
        params += list(cursor)
    params.append(walk)
    outer = ["(m.sig & ?) = ?"]
    params += [signature(rest)] * 2
    for key, value in rest:
        outer.append(f"EXISTS ({PAIR_OF.format(row='m')})")
        params += [key, value]
    if query.model is not None:
        outer.append("c.model = ?")
        params.append(query.model)
    params.append(limit + 1)
    # No ORDER BY outside: rows come in the subquery's order, since CROSS JOIN keeps it the
    # outer loop; sorting them again would check all ``walk`` entries before the first row.
    sql = (
        f"SELECT {columns} FROM (SELECT caller, created, seq, sig FROM completion_metadata"
        f" WHERE {' AND '.join(inner)} ORDER BY created {direction}, seq {direction} LIMIT ?) m"
        f" CROSS JOIN completions c ON c.seq = m.seq WHERE {' AND '.join(outer)} LIMIT ?"
    )
    return sql, params


def rarest_sql(caller: str, pairs: Sequence[tuple[str, str]]) -> tuple[str, list[object]]:
    """How many rows each pair has for ``caller``, each counted up to ``RAREST_CAP``: a
    range of the metadata index, read from the index alone."""
    counts = ", ".join(
        "(SELECT count(*) FROM (SELECT 1 FROM completion_metadata"
        " WHERE caller = ? AND key = ? AND value = ? LIMIT ?))"
        for _ in pairs
    )
    params: list[object] = []
    for key, value in pairs:
        params += [caller, key, value, RAREST_CAP]
    return f"SELECT {counts}", params


def search_sql(
    caller: str | None, query: ListQuery, match: str, cursor: int | None, columns: str
) -> tuple[str, list[object]]:
    """A page of completions whose text matches, in storage order (seq), read from the
    full-text index in that order and stopped at the page's end: the newest matches of a
    common word are the first ones read. The caller, model and metadata filters are tags
    inside the index (``match`` requires them), so they narrow the walk itself; they are
    checked again on the rows, with the time range."""
    page = query.page
    direction, compare = ("ASC", ">") if page.order == "asc" else ("DESC", "<")
    where = ["completions_fts MATCH ?"]
    params: list[object] = [match]
    for clause, value in (
        ("c.caller = ?", caller),
        ("c.model = ?", query.model),
        ("c.created >= ?", query.since),
        ("c.created < ?", query.until),
        (f"completions_fts.rowid {compare} ?", cursor),
    ):
        if value is not None:
            where.append(clause)
            params.append(value)
    for key, value in query.metadata:
        where.append(f"EXISTS ({PAIR_OF.format(row='c')})")
        params += [key, value]
    # CROSS JOIN keeps the index outermost, so rows come in its (rowid) order.
    sql = (
        f"SELECT {columns} FROM completions_fts CROSS JOIN completions c"
        f" ON c.seq = completions_fts.rowid WHERE {' AND '.join(where)}"
        f" ORDER BY completions_fts.rowid {direction} LIMIT ?"
    )
    params.append(page.limit + 1)
    return sql, params


def log_entry(row: Sequence[Any]) -> LogEntry:
    return LogEntry(
        id=row[0],
        caller=row[1],
        created=row[2],
        model=row[3],
        outcome=row[4],
        stream=bool(row[5]),
        duration_ms=row[6],
        stored_at=row[7],
        prompt_tokens=row[8],
        cached_tokens=row[9],
        completion_tokens=row[10],
        metadata=orjson.loads(row[11]),
        preview=preview(row[12]),
    )
