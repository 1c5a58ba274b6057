"""Usage and cost: token sums priced from the config's table; pure.

Prices are US dollars per million tokens, per model: ``input``, ``cached_input`` (defaults
to ``input``) and ``output``. A model is priced by its exact name, else by the longest
configured name it starts with (``gpt-4o-mini`` prices ``gpt-4o-mini-2024-07-18``). A model
with no price has cost ``null``, never a guess. Cached prompt tokens are part of
``prompt_tokens`` (as OpenAI counts them) and are charged at the cached rate.

Each row has ``cost_usd`` (``null`` unless every model in it has a price), ``priced_cost_usd``
(the cost of the models that have one) and ``unpriced_models`` (those left out), so a total
keeps its priced part and says what it leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.config import Price
from proxy.store import Store, UsageRow

GROUPS = ("caller", "model", "day")
PER_TOKENS = 1_000_000


def price_of(prices: Mapping[str, Price], model: str) -> Price | None:
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


def cost(
    prices: Mapping[str, Price], model: str, prompt: int, cached: int, completion: int
) -> float | None:
    price = price_of(prices, model)
    if price is None:
        return None
    cached = min(cached, prompt)
    cached_rate = price.cached_input if price.cached_input is not None else price.input
    dollars = (prompt - cached) * price.input + cached * cached_rate + completion * price.output
    return dollars / PER_TOKENS


def parse_groups(text: str) -> list[str]:
    """``caller,model,day`` → its names, checked; raises ValueError naming a bad one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in GROUPS:
            raise ValueError(f"cannot group by {name!r}; choose from {', '.join(GROUPS)}")
    return list(dict.fromkeys(names))


def priced(
    rows: Sequence[UsageRow],
    prices: Mapping[str, Price],
    by_model: Mapping[tuple[str, ...], Sequence[UsageRow]] | None = None,
) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts with their cost.

    When rows are not grouped by model, their cost is the sum of per-model costs, given as
    ``by_model``: the same groups with ``model`` added, keyed by the group's values.
    """
    out = []
    for row in rows:
        if "model" in row.group:
            parts: Sequence[UsageRow] = (row,)
        else:
            parts = (by_model or {}).get(tuple(row.group.values()), ())
        known = 0.0
        unpriced: list[str] = []
        for part in parts:
            dollars = cost(
                prices, part.group["model"], part.prompt_tokens, part.cached_tokens,
                part.completion_tokens,
            )  # fmt: skip
            if dollars is None:
                unpriced.append(part.group["model"])
            else:
                known += dollars
        whole = None if unpriced or not parts else known
        out.append(
            {
                **row.group,
                "completions": row.completions,
                "prompt_tokens": row.prompt_tokens,
                "cached_tokens": row.cached_tokens,
                "completion_tokens": row.completion_tokens,
                # Ten decimals: a single small completion costs well under a millionth.
                "cost_usd": None if whole is None else round(whole, 10),
                "priced_cost_usd": round(known, 10),
                "unpriced_models": sorted(set(unpriced)),
            }
        )
    return out


async def report(
    store: Store,
    since: int | None,
    until: int | None,
    groups: Sequence[str],
    prices: Mapping[str, Price],
) -> list[dict[str, Any]]:
    """Usage rows with their cost, as ``/admin/usage`` and ``completions-proxy usage`` show."""
    rows = await store.usage(since, until, groups)
    by_model: dict[tuple[str, ...], list[UsageRow]] | None = None
    if "model" not in groups:  # cost is per model: price each model's share, then add up
        by_model = {}
        for row in await store.usage(since, until, [*groups, "model"]):
            key = tuple(v for k, v in row.group.items() if k != "model")
            by_model.setdefault(key, []).append(row)
    return priced(rows, prices, by_model)


def dollars(value: float) -> str:
    """Four decimals, or two significant digits where four would print a real cost as 0.0000."""
    if value == 0 or abs(value) >= 0.00005:
        return f"{value:.4f}"
    return f"{value:.{min(12, 1 - math.floor(math.log10(abs(value))))}f}"


def table(rows: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> str:
    """A plain-text table for people, totals last.

    A cost that leaves out unpriced models ends in ``*``, and a note under the table names
    them; a row with no priced model at all shows ``-``.
    """
    headers = [*groups, "completions", "prompt", "cached", "completion", "cost_usd"]
    keys = [*groups, "completions", "prompt_tokens", "cached_tokens", "completion_tokens"]
    unpriced = sorted({model for row in rows for model in row["unpriced_models"]})

    def unknown(row: Mapping[str, Any]) -> bool:
        return row["cost_usd"] is None and not row["priced_cost_usd"]

    body = []
    for row in rows:
        cells = [str(row[k]) for k in keys]
        mark = "*" if row["unpriced_models"] else ""
        cells.append("-" if unknown(row) else dollars(row["priced_cost_usd"]) + mark)
        body.append(cells)
    if rows and groups:  # with no groups the one row is the total
        totals = ["total", *[""] * (len(groups) - 1)]
        totals += [str(sum(int(r[k]) for r in rows)) for k in keys[len(groups) :]]
        known = sum(r["priced_cost_usd"] for r in rows)
        mark = "*" if unpriced else ""
        totals.append("-" if all(unknown(r) for r in rows) else dollars(known) + mark)
        body.append(totals)
    widths = [
        max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(headers)
    ]

    # Names flush left, numbers flush right, headers over them the same way.
    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < len(groups) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    text = "\n".join([line(headers), *(line(cells) for cells in body)]) + "\n"
    if unpriced:
        text += f"* without {', '.join(unpriced)}: no price in the config's prices table\n"
    return text
