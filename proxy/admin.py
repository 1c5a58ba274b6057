"""The proxy's own endpoints for admins and operators, outside OpenAI's API.

- ``GET /admin/usage?since=&until=&group_by=caller,model,day``: tokens and cost (admins).
- ``GET /admin/exchanges?caller=&after=&limit=&order=``: exchanges that stored no completion
  (upstream errors, cut streams, clients gone), with their outcome (admins).
- ``GET /admin/audit?after=&limit=``: the append-only audit log (admins).
- ``GET /metrics``: Prometheus metrics: counts, timings, and callers' names or fingerprints,
  never content. ``metrics.access`` decides who may read it: with ``auto`` (the default) an
  admin key in keys mode, where callers are people's key names, and anyone who can reach the
  port in passthrough mode, where callers are only token fingerprints.

Admin endpoints need a proxy key with the admin role, so they exist only with
``auth.mode: keys``; in passthrough mode they answer 403.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy import responses
from proxy.admin_keys import admin_caller
from proxy.config import Config
from proxy.errors import InvalidRequest
from proxy.keys import CONFIG, METRICS, STORE
from proxy.models import (
    INT64_MAX,
    caller_param,
    is_digits,
    parse_moment,
    parse_page_query,
    single,
)
from proxy.store import UnknownCursor
from proxy.usage import parse_groups, report


def _moment(request: web.Request, name: str) -> int | None:
    """Unix seconds or an ISO 8601 date (UTC unless it says otherwise)."""
    text = single(request.query, name)
    if not text:
        return None
    try:
        return parse_moment(text)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"{name} must be unix seconds (64 bits at most) or an ISO 8601 date.", param=name
        ) from None


async def get_usage(request: web.Request) -> web.Response:
    await admin_caller(request)
    try:
        groups = parse_groups(single(request.query, "group_by", "caller,model"))
    except ValueError as error:
        raise InvalidRequest(str(error), param="group_by") from None
    since, until = _moment(request, "since"), _moment(request, "until")
    data = await report(request.app[STORE], since, until, groups, request.app[CONFIG].prices)
    body = {"object": "usage", "group_by": groups, "data": data}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def list_exchanges(request: web.Request) -> web.Response:
    await admin_caller(request)
    page = parse_page_query(request.query)
    try:
        result = await request.app[STORE].list_exchanges(caller_param(request.query), page)
    except UnknownCursor:
        raise InvalidRequest(f"after: no exchange '{page.after}'.", param="after") from None
    return web.Response(body=responses.exchange_page(result), content_type="application/json")


async def list_audit(request: web.Request) -> web.Response:
    await admin_caller(request)
    after_text = single(request.query, "after", "0")
    limit_text = single(request.query, "limit", "100")
    if not is_digits(after_text) or int(after_text) > INT64_MAX:
        raise InvalidRequest("after must be an audit entry number (0 and up).", param="after")
    if not is_digits(limit_text) or not 1 <= int(limit_text) <= 1000:
        raise InvalidRequest("limit must be an integer from 1 to 1000.", param="limit")
    after, limit = int(after_text), int(limit_text)
    entries = await request.app[STORE].audit_entries(after, limit)
    return web.Response(body=responses.audit_page(entries), content_type="application/json")


def metrics_need_admin(config: Config) -> bool:
    """Whether ``/metrics`` asks for an admin proxy key under this configuration."""
    access = config.metrics.access
    return access == "admin" or (access == "auto" and config.auth.mode == "keys")


async def metrics(request: web.Request) -> web.Response:
    if metrics_need_admin(request.app[CONFIG]):
        await admin_caller(request)
    body, content_type = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
