"""The PostgreSQL store's SQL: fixed statements and pure builders for list pages.

Builders return ``(sql, params)`` with numbered placeholders; nothing here touches a
connection, so every shape of query can be read (and explained) on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.models import ListQuery, Order

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

# One statement writes a whole batch: the completions (duplicates skipped) with their search
# documents, the metadata rows of the new ones (taken from their encoded metadata), and the
# exchanges; it returns how many rows were new. One statement is one transaction and one
# round trip.
WRITE_BATCH = f"""
WITH new AS (
    INSERT INTO completions ({_NAMES}, search)
    SELECT {_SOURCE}, u.body::tsvector
    FROM unnest({", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, 1))}, $17::text[])
        AS u({_NAMES}, body)
    ON CONFLICT (id, caller) DO NOTHING
    RETURNING seq, caller, created, metadata
), pairs AS (
    INSERT INTO completion_metadata (seq, key, value, caller, created)
    SELECT new.seq, kv.key, kv.value, new.caller, new.created
    FROM new CROSS JOIN LATERAL jsonb_each_text(convert_from(new.metadata, 'UTF8')::jsonb) kv
    WHERE new.metadata <> '\\x7b7d'::bytea
), exchanged AS (
    INSERT INTO exchanges (
        request_id, caller, created, model, stream, outcome, status, request, response,
        duration_ms
    )
    SELECT * FROM unnest(
        $18::text[], $19::text[], $20::bigint[], $21::text[], $22::boolean[], $23::text[],
        $24::integer[], $25::bytea[], $26::bytea[], $27::double precision[]
    )
    RETURNING 1
)
SELECT (SELECT count(*) FROM new) + (SELECT count(*) FROM exchanged)
"""

# An import's chunk: rows copied into a temporary table first (COPY), then moved in one
# statement, as in WRITE_BATCH.
IMPORT_STAGE = (
    "CREATE TEMPORARY TABLE import_stage ("
    + ", ".join(f"{name} {kind}" for name, kind in zip(COMPLETION_COLUMNS, _TYPES, strict=True))
    + ", body text, stage_order bigint) ON COMMIT DROP"
)
IMPORT_MOVE = f"""
WITH new AS (
    INSERT INTO completions ({_NAMES}, search)
    SELECT {_SOURCE}, u.body::tsvector FROM import_stage u ORDER BY u.stage_order
    ON CONFLICT (id, caller) DO NOTHING
    RETURNING seq, caller, created, metadata
), pairs AS (
    INSERT INTO completion_metadata (seq, key, value, caller, created)
    SELECT new.seq, kv.key, kv.value, new.caller, new.created
    FROM new CROSS JOIN LATERAL jsonb_each_text(convert_from(new.metadata, 'UTF8')::jsonb) kv
    WHERE new.metadata <> '\\x7b7d'::bytea
)
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

# Filters matching fewer rows than this (per caller) are read whole and intersected; a
# commoner filter is walked in list order (see page).
RARE = 2000


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


def page_keys(  # noqa: PLR0917 - one page's coordinates
    caller: str,
    query: ListQuery,
    cursor: tuple[int, int] | None,
    p: Params,
    limit: int,
    rare: tuple[tuple[str, str], ...] = (),
) -> str:
    """SQL for one caller's next ``limit`` keys ``(created, seq)`` in list order.

    ``caller`` is SQL (a placeholder, or a column of an enclosing query). Without metadata
    filters it reads the caller's order index (or the model's); with them it walks the
    first common filter's index range in order and checks the other pairs by primary key,
    stopping at ``limit``. The ``rare`` pairs (each matching few rows) are instead read whole
    and intersected first, so two filters that each match thousands of rows but seldom the
    same one cost two short index reads rather than a walk of thousands of rows.
    """
    direction, compare = _direction(query.page.order)
    common = [pair for pair in query.metadata if pair not in rare]
    where: list[str] = []
    if rare:
        sets = [
            f"SELECT seq FROM completion_metadata WHERE caller = {caller}"
            f" AND key = {p(key)} AND value = {p(value)}"
            for key, value in rare
        ]
        # ANY(ARRAY(...)): the set (the caller's rows already) is read once, first, and its
        # rows fetched by primary key, whatever the planner's statistics say.
        source = f"completions k WHERE k.seq = ANY(ARRAY({' INTERSECT '.join(sets)}))"
        keys = "k.created, k.seq"
    elif common:
        key, value = common.pop(0)
        source = (
            f"completion_metadata k WHERE k.caller = {caller} AND k.key = {p(key)}"
            f" AND k.value = {p(value)}"
        )
        keys = "k.created, k.seq"
    else:
        source = f"completions k WHERE k.caller = {caller}"
        keys = "k.created, k.seq"
    for key, value in common:
        where.append(pair_check(p, key, value))
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
    rare: tuple[tuple[str, str], ...] = (),
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
        keys = page_keys(p(caller), query, cursor, p, limit, rare)
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
    """How many rows each pair matches for ``caller``, counted up to ``RARE``: one short
    index-only read per pair."""
    p = Params()
    who = p(caller)
    counts = [
        "(SELECT count(*) FROM (SELECT 1 FROM completion_metadata WHERE caller = "
        f"{who} AND key = {p(key)} AND value = {p(value)} LIMIT {RARE}) s)"
        for key, value in pairs
    ]
    return f"SELECT {', '.join(counts)}", p.values
