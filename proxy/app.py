"""create_app(config): the route table, the middleware, and the resources each app owns.

Resources (store, writer, upstream session) are opened and closed by cleanup contexts, in
that order; on shutdown aiohttp first waits for in-flight requests, then the session closes,
then the writer commits everything queued, then the store closes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import handlers, openapi
from proxy.callers import CallerIdentity
from proxy.config import Config
from proxy.errors import exchange_middleware
from proxy.keys import CALLERS, CONFIG, OPENAPI, RELAY, REPLAYER, STORE, WRITER
from proxy.relay import Relay
from proxy.replay import Replayer
from proxy.store import SQLiteStore
from proxy.upstream import make_session
from proxy.writer import Writer


async def _store(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = SQLiteStore(
        config.store.path,
        synchronous=config.store.synchronous,
        max_bytes=config.store.max_bytes,
    )
    await store.open()
    try:
        secret = os.environ.get(config.callers.secret_env)
        key = (
            secret.encode()
            if secret
            else await store.setting("caller_secret", secrets.token_bytes(32))
        )
        app[CALLERS] = CallerIdentity(key)
        writer = Writer(
            store, queue_size=config.store.queue_size, batch_size=config.store.batch_size
        )
        writer.start()
        app[STORE] = store
        app[WRITER] = writer
        app[REPLAYER] = Replayer(store, shared=config.replay.shared)
        yield
        await writer.close()
    finally:
        await store.close()


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    session = make_session(config.upstream)
    app[RELAY] = Relay(session, config.upstream.url, app[WRITER])
    yield
    await session.close()


def create_app(config: Config) -> web.Application:
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[exchange_middleware(config.logging.access_log)],
    )
    app[CONFIG] = config
    app[OPENAPI] = orjson.dumps(openapi.document())
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_upstream)
    # The proxy owns these paths: a method it does not answer is a 405, not forwarded.
    owned: dict[str, dict[str, Handler]] = {
        "/v1/chat/completions": {
            "POST": handlers.create_chat_completion,
            "GET": handlers.list_chat_completions,
        },
        "/v1/chat/completions/{completion_id}": {
            "GET": handlers.get_chat_completion,
            "POST": handlers.update_chat_completion,
            "DELETE": handlers.delete_chat_completion,
        },
        "/v1/chat/completions/{completion_id}/messages": {
            "GET": handlers.get_chat_completion_messages,
        },
    }
    for path, methods in owned.items():
        resource = app.router.add_resource(path)
        for method, handler in methods.items():
            resource.add_route(method, handler)
        resource.add_route("*", handlers.method_not_allowed(list(methods)))
    app.router.add_get("/healthz", handlers.healthz, allow_head=False)
    app.router.add_get("/openapi.json", handlers.openapi_document, allow_head=False)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.forward)
    return app
