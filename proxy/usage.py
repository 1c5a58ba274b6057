"""Usage and cost: token sums priced from the config's table; pure.

Prices are US dollars per million tokens, per model: ``input``, ``cached_input`` (defaults
to ``input``) and ``output``. A model is priced by its exact name, else by the longest
configured name it starts with (``gpt-4o-mini`` prices ``gpt-4o-mini-2024-07-18``). A model
with no price has cost ``null``, never a guess. Cached prompt tokens are part of
``prompt_tokens`` (as OpenAI counts them) and are charged at the cached rate.
"""

from __future__ import annotations

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
            dollars = cost(
                prices, row.group["model"], row.prompt_tokens, row.cached_tokens,
                row.completion_tokens,
            )  # fmt: skip
        else:
            parts = (by_model or {}).get(tuple(row.group.values()), ())
            costs = [
                cost(prices, p.group["model"], p.prompt_tokens, p.cached_tokens,
                     p.completion_tokens)
                for p in parts
            ]  # fmt: skip
            dollars = None if not costs or None in costs else sum(c or 0.0 for c in costs)
        out.append(
            {
                **row.group,
                "completions": row.completions,
                "prompt_tokens": row.prompt_tokens,
                "cached_tokens": row.cached_tokens,
                "completion_tokens": row.completion_tokens,
                "cost_usd": None if dollars is None else round(dollars, 6),
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


def table(rows: Sequence[Mapping[str, Any]], groups: Sequence[str]) -> str:
    """A plain-text table for people, totals last."""
    headers = [*groups, "completions", "prompt", "cached", "completion", "cost_usd"]
    keys = [*groups, "completions", "prompt_tokens", "cached_tokens", "completion_tokens"]
    body = []
    for row in rows:
        cells = [str(row[k]) for k in keys]
        cells.append("-" if row["cost_usd"] is None else f"{row['cost_usd']:.4f}")
        body.append(cells)
    if rows and groups:  # with no groups the one row is the total
        totals = ["total", *[""] * (len(groups) - 1)]
        totals += [str(sum(int(r[k]) for r in rows)) for k in keys[len(groups) :]]
        costs = [r["cost_usd"] for r in rows]
        totals.append("-" if None in costs else f"{sum(costs):.4f}")
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

    return "\n".join([line(headers), *(line(cells) for cells in body)]) + "\n"
