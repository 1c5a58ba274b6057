"""The usage page: requests, tokens and cost per day, by model and (admins) by caller.

The store sums tokens per (day, model, caller) once; everything else is arithmetic here. A
member's page keeps only their own rows, so they see what the API would show them.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from aiohttp import web

from proxy.console import charts
from proxy.console.auth import Visitor, signed_in
from proxy.console.filters import day_range
from proxy.console.render import page
from proxy.console.state import CONSOLE
from proxy.keys import CONFIG, STORE
from proxy.usage import cost


@dataclass(frozen=True, slots=True)
class UsageLine:
    day: str
    model: str
    caller: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None


def _totals(lines: list[UsageLine], by: str) -> list[UsageLine]:
    """Lines added up per ``by`` (day and model, or caller); the cost of the priced parts,
    None when no part has a price."""
    merged: dict[tuple[str, ...], UsageLine] = {}
    for line in lines:
        key = (line.day, line.model) if by == "day" else (line.caller,)
        seen = merged.get(key)
        if seen is None:
            merged[key] = line
            continue
        merged[key] = UsageLine(
            day=seen.day,
            model=seen.model,
            caller=seen.caller,
            requests=seen.requests + line.requests,
            prompt_tokens=seen.prompt_tokens + line.prompt_tokens,
            completion_tokens=seen.completion_tokens + line.completion_tokens,
            cost=None
            if seen.cost is None and line.cost is None
            else (seen.cost or 0.0) + (line.cost or 0.0),
        )
    return list(merged.values())


def _series(lines: list[UsageLine], by: str, value: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for line in lines:
        amount = (
            line.prompt_tokens + line.completion_tokens
            if value == "tokens"
            else getattr(line, value) or 0.0
        )
        out[getattr(line, by)][line.day] += amount
    return {name: dict(days) for name, days in sorted(out.items())}


@signed_in()
async def usage(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    today = dt.datetime.now(dt.UTC).date()
    first, last = day_range(request.query.get("since", ""), request.query.get("until", ""), today)
    since = int(dt.datetime.combine(first, dt.time(), dt.UTC).timestamp())
    until = int(dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp())
    prices = request.app[CONFIG].prices
    rows = await request.app[STORE].usage(since, until, ["day", "model", "caller"])
    scope = visitor.caller.scope
    lines = [
        UsageLine(
            day=row.group["day"],
            model=row.group["model"],
            caller=row.group["caller"],
            requests=row.completions,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost=cost(
                prices,
                row.group["model"],
                row.prompt_tokens,
                row.cached_tokens,
                row.completion_tokens,
            ),
        )
        for row in rows
        if scope is None or row.group["caller"] == scope
    ]
    days = [(first + dt.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)]
    figures = [
        ("Requests by model", charts.stacked(days, _series(lines, "model", "requests"), _short)),
        ("Tokens by model", charts.stacked(days, _series(lines, "model", "tokens"), _short)),
        ("Cost by model", charts.stacked(days, _series(lines, "model", "cost"), _dollars)),
    ]
    if visitor.admin:
        by_caller = _series(lines, "caller", "requests")
        figures += [
            ("Requests by caller", charts.stacked(days, by_caller, _short)),
            ("Cost by caller", charts.stacked(days, _series(lines, "caller", "cost"), _dollars)),
        ]
    costs = [line.cost for line in lines]
    totals = {
        "requests": sum(line.requests for line in lines),
        "prompt_tokens": sum(line.prompt_tokens for line in lines),
        "completion_tokens": sum(line.completion_tokens for line in lines),
        "cost": sum(c for c in costs if c is not None) if costs else None,
        "unpriced": sorted({line.model for line in lines if line.cost is None}),
    }
    return page(
        request.app[CONSOLE].env,
        "usage.html",
        {
            "visitor": visitor,
            "nav": "usage",
            "since": first.isoformat(),
            "until": last.isoformat(),
            "figures": figures if lines else [],
            "lines": sorted(_totals(lines, "day"), key=lambda x: (x.day, x.model), reverse=True),
            "callers": sorted(_totals(lines, "caller"), key=lambda x: -x.requests)
            if visitor.admin
            else [],
            "totals": totals,
        },
    )


def _dollars(value: float) -> str:
    """Dollars on an axis: two decimals, more only for fractions of a cent."""
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.2g}"


def _short(value: float) -> str:
    """Token counts on an axis: 1.2k, 3.4M."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:g}"
