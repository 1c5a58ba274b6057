"""Admins' pages: the audit trail, the exchanges that stored no completion, and proxy keys.

Keys are made and revoked through the same functions as ``/admin/keys`` (``admin_keys``), so
each change lands in the audit trail the same way. A new key's secret is on the answer to the
form that made it, once: that page is not cached and its URL does not hold it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy import admin_keys, responses
from proxy.console.auth import Visitor, form_text, redirect, signed_in
from proxy.console.render import page
from proxy.console.state import CONSOLE
from proxy.errors import InvalidRequest
from proxy.keys import STORE
from proxy.models import INT64_MAX, PageQuery
from proxy.outcome import Outcome
from proxy.store import UnknownCursor

AUDIT_PAGE = 50
FAILED = (
    Outcome.UPSTREAM_ERROR,
    Outcome.UPSTREAM_FAILED,
    Outcome.CLIENT_GONE,
    Outcome.UNSTORABLE,
)


def _int(text: str, name: str) -> int:
    """A sequence number from the URL, within the 64 bits the store compares."""
    try:
        value = int(text or 0)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number.", param=name) from None
    if not 0 <= value <= INT64_MAX:
        raise InvalidRequest(f"{name} is out of range.", param=name)
    return value


@signed_in(admin=True)
async def audit(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    after = _int(request.query.get("after", ""), "after")
    action = request.query.get("action", "").strip()
    actor = request.query.get("actor", "").strip()
    entries: list[dict[str, Any]] = []
    last = after
    ended = False
    # Filters apply to what is read: read on until one match past the page, which shows
    # there is a later page, or the trail's end.
    while not ended and len(entries) <= AUDIT_PAGE:
        batch = [
            orjson.loads(responses.audit_entry(e))
            for e in await request.app[STORE].audit_entries(last, 500)
        ]
        ended = len(batch) < 500
        for entry in batch:
            last = entry["seq"]
            if (not action or entry["action"] == action) and (not actor or entry["actor"] == actor):
                entries.append(entry)
                if len(entries) > AUDIT_PAGE:
                    break
    more = len(entries) > AUDIT_PAGE
    entries = entries[:AUDIT_PAGE]
    for entry in entries:
        entry["detail_text"] = orjson.dumps(entry["detail"]).decode()
    query = {k: v for k, v in (("action", action), ("actor", actor)) if v}
    return page(
        request.app[CONSOLE].env,
        "audit.html",
        {
            "visitor": visitor,
            "nav": "audit",
            "entries": entries,
            "action": action,
            "actor": actor,
            "next_url": "/ui/audit?" + urlencode({**query, "after": str(entries[-1]["seq"])})
            if more
            else None,
            "first_url": "/ui/audit?" + urlencode(query) if after else None,
        },
    )


@signed_in(admin=True)
async def exchanges(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    caller = request.query.get("caller", "").strip() or None
    outcome = request.query.get("outcome", "").strip()
    after = request.query.get("after", "").strip() or None
    try:
        result = await request.app[STORE].list_exchanges(
            caller, PageQuery(after=after, limit=100, order="desc"), outcome=outcome or None
        )
    except UnknownCursor:
        raise InvalidRequest(f"No exchange '{after}'.", param="after") from None
    rows = [orjson.loads(responses.exchange(r)) for r in result.items]
    shown = rows
    for row in shown:
        row["request_text"] = orjson.dumps(row["request"], option=orjson.OPT_INDENT_2).decode()
    query = {k: v for k, v in (("caller", caller or ""), ("outcome", outcome)) if v}
    return page(
        request.app[CONSOLE].env,
        "exchanges.html",
        {
            "visitor": visitor,
            "nav": "exchanges",
            "rows": shown,
            "caller": caller or "",
            "outcome": outcome,
            "outcomes": [str(o) for o in FAILED],
            "next_url": "/ui/exchanges?" + urlencode({**query, "after": rows[-1]["request_id"]})
            if result.has_more and rows
            else None,
            "first_url": "/ui/exchanges?" + urlencode(query) if after else None,
        },
    )


async def _keys_page(
    request: web.Request, visitor: Visitor, *, made: dict[str, str] | None = None,
    error: str | None = None, status: int = 200,
) -> web.Response:  # fmt: skip
    keys = await request.app[STORE].list_keys()
    return page(
        request.app[CONSOLE].env,
        "keys.html",
        {"visitor": visitor, "nav": "keys", "keys": keys, "made": made, "error": error},
        status=status,
    )


@signed_in(admin=True)
async def keys(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    return await _keys_page(request, visitor)


@signed_in(admin=True, changes=True)
async def create_key(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    form = await request.post()
    try:
        name, role = admin_keys.check_new_key(
            form_text(form, "name").strip(), form_text(form, "role")
        )
        key, record = await admin_keys.create(request.app[STORE], name, role, visitor.caller.name)
    except InvalidRequest as error:
        return await _keys_page(request, visitor, error=error.message, status=400)
    return await _keys_page(request, visitor, made={"name": record.name, "key": key})


@signed_in(admin=True, changes=True)
async def revoke_key(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    await admin_keys.revoke(request.app[STORE], request.match_info["name"], visitor.caller.name)
    return redirect("/ui/keys")
