"""create_app(config): the route table, the middleware, and the resources each app owns.

Resources (store, writer, upstream session) are opened and closed by cleanup contexts, in
that order; on shutdown aiohttp first waits for in-flight requests, then the session closes,
then the writer commits everything queued, then the store closes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from proxy import handlers
from proxy.callers import CallerIdentity
from proxy.config import Config
from proxy.errors import exchange_middleware
from proxy.keys import CALLERS, CONFIG, RELAY, STORE, WRITER
from proxy.relay import Relay
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
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_upstream)
    completion = "/v1/chat/completions/{completion_id}"
    app.router.add_post("/v1/chat/completions", handlers.create_chat_completion)
    app.router.add_get("/v1/chat/completions", handlers.list_chat_completions, allow_head=False)
    app.router.add_get(completion, handlers.get_chat_completion, allow_head=False)
    app.router.add_post(completion, handlers.update_chat_completion)
    app.router.add_delete(completion, handlers.delete_chat_completion)
    app.router.add_get(
        completion + "/messages", handlers.get_chat_completion_messages, allow_head=False
    )
    app.router.add_get("/healthz", handlers.healthz, allow_head=False)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.forward)
    return app
