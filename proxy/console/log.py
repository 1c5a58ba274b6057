"""The log page and one completion's page: read, edit metadata, delete.

Every read and change goes through the store methods the API uses, with the caller's scope
(``Caller.scope``), so a member sees and reaches only their own records (another caller's id
is a 404, as in the API) and an edit or delete lands in the audit trail the same way.
"""

from __future__ import annotations

from urllib.parse import quote

import orjson
from aiohttp import web
from yarl import URL

from proxy import responses
from proxy.console import conversation
from proxy.console.auth import Visitor, error_page, form_text, redirect, signed_in
from proxy.console.entries import FAILED, log_page
from proxy.console.filters import parse_view
from proxy.console.render import page
from proxy.console.state import CONSOLE
from proxy.errors import InvalidRequest, ProxyError
from proxy.keys import CONFIG, STORE
from proxy.models import SEARCH_MAX, check_metadata
from proxy.store import LogEntry
from proxy.usage import cost


@signed_in()
async def log(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    view = parse_view(request.query, admin=visitor.admin)
    config = request.app[CONFIG]
    result = await log_page(request.app[STORE], visitor.caller.scope, view, config.prices)
    entries = result.rows
    return page(
        request.app[CONSOLE].env,
        "log.html",
        {
            "visitor": visitor,
            "view": view,
            "entries": entries,
            "newer_url": view.page_url(before=entries[0].id) if result.newer and entries else None,
            "older_url": view.page_url(after=entries[-1].id) if result.older and entries else None,
            "newest_url": view.page_url() if view.after or view.before else None,
            "outcomes": [str(o) for o in FAILED],
            "deleted": request.query.get("deleted", ""),
            "search": config.store.search,
            "search_max": SEARCH_MAX,
            "nav": "log",
        },
    )


async def _completion(request: web.Request, visitor: Visitor) -> tuple[str, bytes, bytes, LogEntry]:
    """(id, the stored JSON as the API serves it, the request as sent, its log row)."""
    completion_id = request.match_info["completion_id"]
    store = request.app[STORE]
    scope = visitor.caller.scope
    found = await store.get(scope, completion_id)
    raw = await store.request_of(scope, completion_id)
    entry = await store.log_entry(scope, completion_id)
    if found is None or raw is None or entry is None:
        raise _NotFound(completion_id)
    return completion_id, responses.stored_completion(found), raw, entry


class _NotFound(ProxyError):
    status = 404

    def __init__(self, completion_id: str) -> None:
        super().__init__(f"No chat completion with id '{completion_id}' that you can see.")


LOG = "/ui/log"


def _log_view(target: str) -> str:
    """``target``'s path and query when its path is the log, else the plain log: a link or
    redirect made from a header or a form never leaves the log. A 'Deleted …' notice is
    dropped, so it is not shown again on the way back."""
    try:
        url = URL(target)
    except ValueError:  # not a URL at all
        return LOG
    return url.without_query_params("deleted").raw_path_qs if url.path == LOG else LOG


def _log_link(request: web.Request) -> str:
    """The log as the reader left it (filters, page): the view a form or link carried on
    (``log=``), else the Referer when they came from the log."""
    return _log_view(request.query.get("log") or request.headers.get("Referer") or "")


def _path(completion_id: str) -> str:
    return "/ui/c/" + quote(completion_id, safe="")


def _with_log(path: str, log_url: str) -> str:
    """``path`` carrying the log view on, so the page after it still leads back there."""
    if log_url == LOG:
        return path
    return str(URL(path).update_query(log=log_url))


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/v1"


@signed_in()
async def completion(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    completion_id, body, raw, entry = await _completion(request, visitor)
    stored = orjson.loads(body)
    sent = orjson.loads(raw)
    if not isinstance(sent, dict):
        sent = {}
    usage = stored.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int(details.get("cached_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    model = str(stored.get("model") or "")
    base = _base_url(request)
    log_url = _log_link(request)
    return page(
        request.app[CONSOLE].env,
        "completion.html",
        {
            "visitor": visitor,
            "nav": "log",
            "id": completion_id,
            "entry": entry,
            "stored": stored,
            "model": model,
            "messages": conversation.input_messages(sent),
            "answers": conversation.answers(stored),
            "parameters": conversation.parameters(sent),
            "tools": sent.get("tools"),
            "usage": usage,
            "tokens": (prompt, cached, completion_tokens),
            "cost": cost(request.app[CONFIG].prices, model, prompt, cached, completion_tokens),
            "metadata": stored.get("metadata") or {},
            "raw": orjson.dumps(stored, option=orjson.OPT_INDENT_2).decode(),
            "raw_request": orjson.dumps(sent, option=orjson.OPT_INDENT_2).decode(),
            "curl": conversation.curl_snippet(sent, base),
            "python": conversation.python_snippet(sent, base),
            "saved": request.query.get("saved") == "1",
            "log_url": log_url,
            "delete_url": _with_log(f"{_path(completion_id)}/delete", log_url),
        },
    )


@signed_in(changes=True)
async def update_metadata(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    completion_id = request.match_info["completion_id"]
    form = await request.post()
    keys = [k if isinstance(k, str) else "" for k in form.getall("key", [])]
    values = [v if isinstance(v, str) else "" for v in form.getall("value", [])]
    pairs: dict[str, str] = {}
    for given, value in zip(keys, values, strict=False):
        key = given.strip()
        if not key:
            continue
        if key in pairs:
            raise InvalidRequest(f"The key {key!r} is given twice.", param="metadata")
        pairs[key] = value
    metadata = check_metadata(pairs)
    caller = visitor.caller
    updated = await request.app[STORE].update_metadata(
        caller.scope, completion_id, metadata, caller.name
    )
    if updated is None:
        raise _NotFound(completion_id)
    log_url = _log_view(form_text(form, "log"))
    return redirect(_with_log(f"{_path(completion_id)}?saved=1", log_url))


@signed_in()
async def confirm_delete(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    completion_id, body, _, _ = await _completion(request, visitor)
    stored = orjson.loads(body)
    log_url = _log_link(request)
    return page(
        request.app[CONSOLE].env,
        "delete.html",
        {
            "visitor": visitor,
            "nav": "log",
            "id": completion_id,
            "model": stored.get("model") or "",
            "created": stored.get("created"),
            "log_url": log_url,
            "cancel_url": _with_log(_path(completion_id), log_url),
        },
    )


@signed_in(changes=True)
async def delete(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    completion_id = request.match_info["completion_id"]
    form = await request.post()
    if form_text(form, "confirm") != "yes":
        return error_page(request, 400, "Not deleted", "The deletion was not confirmed.", visitor)
    caller = visitor.caller
    purge = request.app[CONFIG].audit.delete_purges
    if not await request.app[STORE].delete(caller.scope, completion_id, caller.name, purge=purge):
        raise _NotFound(completion_id)
    log_url = _log_view(form_text(form, "log"))
    return redirect(str(URL(log_url).update_query(deleted=completion_id)))
