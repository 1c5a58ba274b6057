"""The PostgreSQL store's SQL: fixed statements and pure builders for list pages.

Builders return ``(sql, params)`` with numbered placeholders; nothing here touches a
connection, so every shape of query can be read (and explained) on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.models import ListQuery, Order
from proxy.store.signature import signature

# The columns of a completion row, in CompletionRecord's order (seq apart).
COMPLETION_COLUMNS = (
    "id",
    "caller",
    "created",
    "model",
    "metadata",
    "completion",
    "request",
    "request_id",
    "stream",
    "outcome",
    "stored_at",
    "duration_ms",
    "request_key",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
)
_TYPES = (
    "text",
    "text",
    "bigint",
    "text",
    "bytea",
    "bytea",
    "bytea",
    "text",
    "boolean",
    "text",
    "double precision",
    "double precision",
    "text",
    "bigint",
    "bigint",
    "bigint",
)
_NAMES = ", ".join(COMPLETION_COLUMNS)

_SOURCE = ", ".join(f"u.{name}" for name in COMPLETION_COLUMNS)

# The completions of a batch (duplicates skipped) with their search documents, and the
# metadata rows of the new ones (taken from their encoded metadata): the first part of one
# statement that writes a whole batch, as arrays (one per column).
_INSERT_COMPLETIONS = f"""
WITH new AS (
    INSERT INTO completions ({_NAMES}, search, sig)
    SELECT {_SOURCE}, u.body, u.sig
    FROM unnest(
        {", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, 1))},
        $17::tsvector[], $18::bigint[]
    ) AS u({_NAMES}, body, sig)
    ON CONFLICT (id, caller) DO NOTHING
    RETURNING seq, caller, created, metadata, sig
), pairs AS (
    INSERT INTO completion_metadata (seq, key, value, caller, created, sig)
    SELECT new.seq, kv.key, kv.value, new.caller, new.created, new.sig
    FROM new CROSS JOIN LATERAL jsonb_each_text(convert_from(new.metadata, 'UTF8')::jsonb) kv
    WHERE new.metadata <> '\\x7b7d'::bytea
)"""

# The writer's batch: completions and exchanges; returns how many rows were new. One
# statement is one transaction and one round trip.
WRITE_BATCH = f"""{_INSERT_COMPLETIONS}, exchanged AS (
    INSERT INTO exchanges (
        request_id, caller, created, model, stream, outcome, status, request, response,
        duration_ms
    )
    SELECT * FROM unnest(
        $19::text[], $20::text[], $21::bigint[], $22::text[], $23::boolean[], $24::text[],
        $25::integer[], $26::bytea[], $27::bytea[], $28::double precision[]
    )
    RETURNING 1
)
SELECT (SELECT count(*) FROM new) + (SELECT count(*) FROM exchanged)
"""

# An import's chunk (in the import's transaction): completions only; how many were new.
IMPORT_BATCH = f"""{_INSERT_COMPLETIONS}
SELECT count(*) FROM new
"""

# Every caller with a stored completion: one seek in the caller-order index per caller (a
# skip scan), not a read of every row.
CALLERS = """
WITH RECURSIVE callers(caller) AS (
    SELECT min(caller) FROM completions
    UNION ALL
    SELECT (SELECT min(caller) FROM completions WHERE caller > callers.caller)
    FROM callers WHERE callers.caller IS NOT NULL
)
"""

# Each metadata pair's rows are counted up to this many to find the rarest (see rarity).
RAREST_CAP = 5_000


@dataclass(slots=True)
class Params:
    """Numbered placeholders, in the order their values are added."""

    values: list[object] = field(default_factory=list)

    def __call__(self, value: object) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def pair_check(p: Params, key: str, value: str, row: str = "k") -> str:
    """SQL true when row ``row`` has metadata ``key`` = ``value``: one probe of the primary
    key (seq, key) per row. A scalar subquery, not EXISTS: the planner cannot turn it into a
    join that reads the pair's whole index range for every row when its statistics are off
    (a table not yet analysed made a two-pair list take seconds at 100,000 rows)."""
    return (
        f"(SELECT x.value FROM completion_metadata x WHERE x.seq = {row}.seq"
        f" AND x.key = {p(key)}) = {p(value)}"
    )


def _direction(order: Order) -> tuple[str, str]:
    return ("ASC", ">") if order == "asc" else ("DESC", "<")


def sig_check(p: Params, pairs: Sequence[tuple[str, str]], row: str = "k") -> str:
    """SQL true unless row ``row``'s signature rules out one of ``pairs`` (see
    ``proxy.store.signature``): read from the index entry, before any exact check."""
    mask = p(signature(pairs))
    return f"({row}.sig & {mask}::bigint) = {mask}::bigint"


def page_keys(  # noqa: PLR0917 - one page's coordinates
    caller: str,
    query: ListQuery,
    cursor: tuple[int, int] | None,
    p: Params,
    limit: int,
    driver: int = 0,
) -> str:
    """SQL for one caller's next ``limit`` keys ``(created, seq)`` in list order.

    ``caller`` is SQL (a placeholder, or a column of an enclosing query). Without metadata
    filters it reads the caller's order index (or the model's). With them it walks pair
    ``driver``'s index range in order (the rarest pair, see ``rarity``), stopping at
    ``limit``; each entry is checked for the other pairs first by the signature on the
    entry itself (no other read), then, for the few that pass, exactly by primary key. So
    two pairs that never meet cost a walk of the rarer one's index entries, nothing else.
    """
    direction, compare = _direction(query.page.order)
    where: list[str] = []
    if query.metadata:
        key, value = query.metadata[driver]
        rest = query.metadata[:driver] + query.metadata[driver + 1 :]
        source = (
            f"completion_metadata k WHERE k.caller = {caller} AND k.key = {p(key)}"
            f" AND k.value = {p(value)}"
        )
        if rest:
            where.append(sig_check(p, rest))
        where += [pair_check(p, key, value) for key, value in rest]
    else:
        source = f"completions k WHERE k.caller = {caller}"
    keys = "k.created, k.seq"
    if query.model is not None:
        if source.startswith("completions"):
            where.append(f"k.model = {p(query.model)}")
        else:
            where.append(
                f"(SELECT y.model FROM completions y WHERE y.seq = k.seq) = {p(query.model)}"
            )
    if query.since is not None:
        where.append(f"k.created >= {p(query.since)}::bigint")
    if query.until is not None:
        where.append(f"k.created < {p(query.until)}::bigint")
    if cursor is not None:
        where.append(f"({keys}) {compare} ({p(cursor[0])}::bigint, {p(cursor[1])}::bigint)")
    extra = "".join(f" AND {clause}" for clause in where)
    return (
        f"SELECT {keys} FROM {source}{extra}"
        f" ORDER BY k.created {direction}, k.seq {direction} LIMIT {limit + 1}"
    )


PAGE_COLUMNS = "c.id, c.completion, c.metadata"
LOG_COLUMNS = (
    "c.id, c.caller, c.created, c.model, c.outcome, c.stream, c.duration_ms, c.stored_at,"
    " c.prompt_tokens, c.cached_tokens, c.completion_tokens, c.metadata, c.request"
)


def page(
    caller: str | None,
    query: ListQuery,
    cursor: tuple[int, int] | None,
    driver: int = 0,
    columns: str = PAGE_COLUMNS,
) -> tuple[str, list[object]]:
    """A whole page of completions (``columns``), one more than the limit.

    One caller's page reads that caller's indexes. An admin's page (``caller`` None) reads
    each caller's first keys (one short index read per caller, found by a skip scan) and
    merges them, so no index without the caller in front is needed.
    """
    p = Params()
    limit = query.page.limit
    direction, _ = _direction(query.page.order)
    if caller is not None:
        keys = page_keys(p(caller), query, cursor, p, limit, driver)
        sql = f"WITH keys AS ({keys})"
    else:
        inner = page_keys("callers.caller", query, cursor, p, limit)
        sql = (
            f"{CALLERS}, keys AS (SELECT page.created, page.seq FROM callers"
            f" CROSS JOIN LATERAL ({inner}) page WHERE callers.caller IS NOT NULL"
            f" ORDER BY page.created {direction}, page.seq {direction} LIMIT {limit + 1})"
        )
    sql += (
        f" SELECT {columns} FROM keys JOIN completions c ON c.seq = keys.seq"
        f" ORDER BY keys.created {direction}, keys.seq {direction}"
    )
    return sql, p.values


# Completions a search tests one by one, newest first, before it asks the index alone.
SEARCH_WINDOW = 1000


def search_page(  # noqa: PLR0917 - one page's coordinates
    caller: str | None,
    query: ListQuery,
    match: str,
    cursor: int | None,
    columns: str = PAGE_COLUMNS,
    window: int | None = None,
) -> tuple[str, list[object]]:
    """A page of completions matching ``match`` (a tsquery, see ``search.query``), in
    storage order (seq), with every other filter applied to each match; ``cursor`` is the
    seq of the ``after`` id. With ``window``, only the first ``window`` completions in scope
    (in the page's order, past the cursor) are tested."""
    p = Params()
    direction, compare = _direction(query.page.order)
    scope = []
    if caller is not None:
        scope.append(f"caller = {p(caller)}")
    if cursor is not None:
        scope.append(f"seq {compare} {p(cursor)}::bigint")
    where = [f"c.search @@ {p(match)}::tsquery"]
    where += [f"c.{clause}" for clause in scope]
    for clause, value in (
        ("c.model = {}", query.model),
        ("c.created >= {}::bigint", query.since),
        ("c.created < {}::bigint", query.until),
    ):
        if value is not None:
            where.append(clause.format(p(value)))
    if query.metadata:
        where.append(sig_check(p, query.metadata, "c"))
    for key, value in query.metadata:
        where.append(pair_check(p, key, value, "c"))
    if window is not None:
        where.append(
            f"c.seq IN (SELECT seq FROM completions WHERE {' AND '.join(scope) or 'true'}"
            f" ORDER BY seq {direction} LIMIT {window})"
        )
    sql = (
        f"SELECT {columns} FROM completions c WHERE {' AND '.join(where)}"
        f" ORDER BY c.seq {direction} LIMIT {query.page.limit + 1}"
    )
    return sql, p.values


def rarity(caller: str, pairs: tuple[tuple[str, str], ...]) -> tuple[str, list[object]]:
    """How many rows each pair matches for ``caller``, counted up to ``RAREST_CAP``: one
    short index-only read per pair."""
    p = Params()
    who = p(caller)
    counts = [
        "(SELECT count(*) FROM (SELECT 1 FROM completion_metadata WHERE caller = "
        f"{who} AND key = {p(key)} AND value = {p(value)} LIMIT {RAREST_CAP}) s)"
        for key, value in pairs
    ]
    return f"SELECT {', '.join(counts)}", p.values
