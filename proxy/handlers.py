"""Thin handlers, named after OpenAI's operationIds, plus the passthrough and health check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import responses
from proxy.assemble import input_messages, list_body
from proxy.callers import Caller
from proxy.capture import Capture
from proxy.errors import (
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
    RequestTimeout,
    StoreUnavailable,
    Unauthorized,
)
from proxy.keys import (
    ACCESS,
    CALLERS,
    CONFIG,
    FORWARDING,
    OPENAPI,
    REDACTOR,
    RELAY,
    REPLAYER,
    STORE,
    WRITER,
)
from proxy.models import (
    caller_param,
    parse_list_query,
    parse_page_query,
    parse_update_body,
    peek_chat_request,
)
from proxy.outcome import Outcome
from proxy.store import SearchOff, StoreError, UnknownCursor
from proxy.upstream import BadPath, canonical_path, names_stored_api

log = logging.getLogger("proxy.handlers")

JSON = "application/json"
_CREATE = "/chat/completions"


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


async def required_caller(request: web.Request) -> Caller:
    """The caller; stored completions are never served without one."""
    caller = await request.app[CALLERS].resolve(request)
    if caller is None:
        raise Unauthorized()
    request[ACCESS].caller = caller.name
    return caller


def _not_found(completion_id: str) -> NotFound:
    return NotFound(f"No chat completion found with id '{completion_id}'.", param="completion_id")


def _completion_id(request: web.Request) -> str:
    """The id in the path; one holding U+0000 names no completion on any backend (see
    ``models.no_nul``), so it is a 404 without asking the store."""
    completion_id = request.match_info["completion_id"]
    if "\x00" in completion_id:
        raise _not_found(completion_id)
    return completion_id


_FAILED = frozenset(
    {
        Outcome.UPSTREAM_ERROR,
        Outcome.UPSTREAM_FAILED,
        Outcome.CLIENT_GONE,
        Outcome.UNSTORABLE,
        Outcome.TOO_LARGE,
    }
)


async def read_body(request: web.Request) -> bytes:
    """The whole request body, within ``server.body_timeout``; a client that sends it slower
    gets a 408 and its connection closed, so it cannot hold the connection open forever.

    A body already received whole (most requests: it came with the head) is read without
    arming the timer."""
    if request.content.is_eof():
        return await request.read()
    try:
        async with asyncio.timeout(request.app[CONFIG].server.body_timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            "The request body did not arrive within the proxy's limit (server.body_timeout).",
            code="request_timeout",
        ) from None


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """Forward to the upstream; capture the answer when the request says ``store: true``
    (or always, with ``capture.policy: all``).

    With replay on, a recorded answer comes first; ``strict`` never calls the upstream, and
    ``fallback`` forwards a miss and records its answer whatever ``store`` says. An exchange
    that was recorded but stored no completion (upstream error, cut stream, client gone) is
    kept as an audit record with its outcome.
    """
    app = request.app
    config = app[CONFIG]
    access = request[ACCESS]
    caller = await app[CALLERS].resolve(request)
    if caller is None and app[CALLERS].keys:
        raise Unauthorized()
    access.caller = caller.name if caller else None
    raw = await read_body(request)
    chat = peek_chat_request(raw)
    access.model = chat.model or None
    access.stream = chat.body.get("stream") is True
    mode = config.replay.mode
    record = chat.store or config.capture.policy == "all"
    if mode != "off":
        replayed = await app[REPLAYER].answer(chat.body, caller.name if caller else None)
        if replayed is not None:
            access.outcome = Outcome.REPLAYED
            return replayed
        if mode == "strict":
            raise await app[REPLAYER].miss(chat.body, caller.name if caller else None)
        record = True
    if not record:
        return await app[RELAY].forward(request, raw, access, path=_CREATE)
    if caller is None:
        raise Unauthorized("store: true needs a bearer token, so the completion has an owner.")
    reason = app[WRITER].broken
    if reason is not None:
        raise StoreUnavailable(
            "The completion store cannot write, so store: true requests are refused"
            f" until it recovers ({reason}).",
            code="store_unavailable",
        )
    capture = Capture(chat, raw, caller.name, app[REDACTOR], request_id=access.request_id)
    status: int | None = None
    try:
        response = await app[RELAY].forward(request, raw, access, capture, path=_CREATE)
        status = response.status
        return response
    except ProxyError as error:
        status = error.status
        raise
    except asyncio.CancelledError:
        if access.outcome is None:
            access.outcome = Outcome.CLIENT_GONE
        raise
    finally:
        if access.outcome in _FAILED:
            keep = config.capture.failed_body_bytes
            try:
                exchange = capture.exchange(access.outcome, status or access.status, keep)
            except Exception:  # a bug; logged, and the client's answer is not affected
                log.exception("audit record not built", extra={"request_id": access.request_id})
            else:
                app[WRITER].enqueue(exchange)


def _owner_filter(request: web.Request, caller: Caller) -> str | None:
    """``caller=NAME``: an admin's extension to list one caller's completions."""
    owner = caller_param(request.query)
    if owner is None:
        return None
    if caller.role != "admin":
        raise Forbidden("Only admins may filter by caller.", param="caller")
    return owner


async def list_chat_completions(request: web.Request) -> web.Response:
    caller = await required_caller(request)
    query = parse_list_query(request.query)
    owner = _owner_filter(request, caller)
    if owner is not None:
        query = replace(query, owner=owner)
    request[ACCESS].model = query.model
    try:
        page = await request.app[STORE].list_completions(caller.scope, query)
    except UnknownCursor:
        raise InvalidRequest(
            f"after: no chat completion with id '{query.page.after}'.", param="after"
        ) from None
    except SearchOff as off:
        raise InvalidRequest(str(off), param="search", code="search_off") from None
    return _json(responses.completion_page(page))


async def get_chat_completion(request: web.Request) -> web.Response:
    caller = await required_caller(request)
    completion_id = _completion_id(request)
    stored = await request.app[STORE].get(caller.scope, completion_id)
    if stored is None:
        raise _not_found(completion_id)
    return _json(responses.stored_completion(stored))


@contextlib.contextmanager
def _store_change(request: web.Request) -> Iterator[None]:
    """A change the store could not make (full disk, read-only, locked) is a 503 in OpenAI's
    shape, never a bare 500; nothing was changed, so the client may try again."""
    try:
        yield
    except StoreError as error:
        log.warning(
            "store change failed",
            extra={"request_id": request[ACCESS].request_id, "reason": str(error)[:300]},
        )
        raise StoreUnavailable(
            "The completion store could not make this change; nothing was changed.",
            code="store_unavailable",
        ) from None


async def update_chat_completion(request: web.Request) -> web.Response:
    caller = await required_caller(request)
    completion_id = _completion_id(request)
    metadata = parse_update_body(await read_body(request))
    store = request.app[STORE]
    with _store_change(request):
        stored = await store.update_metadata(caller.scope, completion_id, metadata, caller.name)
    if stored is None:
        raise _not_found(completion_id)
    return _json(responses.stored_completion(stored))


async def delete_chat_completion(request: web.Request) -> web.Response:
    # The SDK sends Content-Type: application/json with no body: the body is never read.
    caller = await required_caller(request)
    completion_id = _completion_id(request)
    purge = request.app[CONFIG].audit.delete_purges
    with _store_change(request):
        deleted = await request.app[STORE].delete(
            caller.scope, completion_id, caller.name, purge=purge
        )
    if not deleted:
        raise _not_found(completion_id)
    return _json(
        orjson.dumps({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})
    )


async def get_chat_completion_messages(request: web.Request) -> web.Response:
    caller = await required_caller(request)
    completion_id = _completion_id(request)
    page = parse_page_query(request.query)
    raw = await request.app[STORE].request_of(caller.scope, completion_id)
    if raw is None:
        raise _not_found(completion_id)
    messages = input_messages(orjson.loads(raw), completion_id)
    if page.order == "desc":
        messages.reverse()
    if page.after is not None:
        position = next((i for i, m in enumerate(messages) if m["id"] == page.after), None)
        if position is None:
            raise InvalidRequest(
                f"after: no message with id '{page.after}' in this completion.", param="after"
            )
        messages = messages[position + 1 :]
    chosen = messages[: page.limit]
    items = [(m["id"], orjson.dumps(m)) for m in chosen]
    return _json(list_body(items, len(messages) > page.limit))


def method_not_allowed(allowed: list[str]) -> Handler:
    """The handler for every other method on a path the proxy owns: 405 with ``Allow``."""
    allow = ", ".join(allowed)

    async def handler(request: web.Request) -> web.StreamResponse:
        raise MethodNotAllowed(
            f"{request.method} is not supported on {request.path}; use {allow}.",
            code="method_not_allowed",
            headers={"Allow": allow},
        )

    return handler


async def forward(request: web.Request) -> web.StreamResponse:
    """Every other ``/v1/*`` route goes to the upstream, streaming included.

    The path is put in its canonical form first (``upstream.canonical_path``): one that names
    the stored-completions API in a roundabout way (``//``, a trailing slash, ``%63hat``) is
    refused rather than forwarded, since only the proxy's handlers answer that API. In keys
    mode only the routes of ``auth.forward`` (and ``auth.admin_forward``, for admins) go
    upstream with the team key; everything else is a 403.
    """
    try:
        path = canonical_path(request.rel_url.raw_path)
    except BadPath as error:
        raise InvalidRequest(f"The path is refused: {error}.", code="invalid_path") from None
    if names_stored_api(path):
        raise InvalidRequest(
            "This path names the stored chat completions API in a form the proxy does not"
            " answer; use /v1/chat/completions or /v1/chat/completions/{completion_id}.",
            code="invalid_path",
        )
    if not path.startswith("/v1/"):
        raise NotFound("Unknown path.", code="unknown_url")
    tail = path[len("/v1") :]
    if request.app[CALLERS].keys:
        # With proxy keys, nothing reaches the upstream without one, and only allowed routes.
        caller = await required_caller(request)
        if not request.app[FORWARDING].allows(request.method, tail, admin=caller.role == "admin"):
            raise Forbidden(
                f"{request.method} {path} is not forwarded with the team's key; an admin can"
                " allow it in the proxy's configuration (auth.forward).",
                code="route_not_allowed",
            )
    if request.app[CONFIG].replay.mode == "strict":
        raise InvalidRequest(
            "Replay is strict: the upstream is never called, and only chat completions are"
            " answered, from recordings.",
            code="replay_miss",
        )
    body = await read_body(request)
    return await request.app[RELAY].forward(request, body, request[ACCESS], path=tail)


async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI document of the operations the proxy answers itself."""
    return _json(request.app[OPENAPI])


async def healthz(request: web.Request) -> web.Response:
    writer = request.app[WRITER]
    stats = writer.stats
    body = {
        "status": "ok" if writer.broken is None else "degraded",
        "store": {
            "writable": writer.broken is None,
            "reason": writer.broken,
            "queue_depth": writer.depth,
            "committed": stats.committed,
            "failed": stats.failed,
            "failed_ids": stats.failed_ids[-20:],
        },
    }
    return _json(orjson.dumps(body), status=200 if writer.broken is None else 503)
