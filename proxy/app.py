"""create_app(config): the route table, the middleware, and the resources each app owns.

Resources (store, writer, upstream client) are opened and closed by cleanup contexts, in
that order; on shutdown aiohttp first waits for in-flight requests, then the upstream client closes,
then the writer commits everything queued, then the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import admin, admin_keys, handlers, openapi
from proxy.callers import Callers
from proxy.config import Config, ConfigError
from proxy.console import routes as console_routes
from proxy.keys import (
    CALLERS,
    CONFIG,
    FORWARDING,
    METRICS,
    OPENAPI,
    REDACTOR,
    RELAY,
    REPLAYER,
    REQUEST_IDS,
    STORE,
    WRITER,
)
from proxy.logs import AccessLog
from proxy.metrics import Metrics
from proxy.middleware import exchange_middleware, request_ids
from proxy.redaction import DEFAULT_BUILTIN, Redactor
from proxy.relay import Relay
from proxy.replay import Replayer
from proxy.store import CompletionRecord, open_store
from proxy.upstream import RETARGETING, ForwardRules
from proxy.upstream_client import UpstreamClient
from proxy.usage import cost
from proxy.writer import Writer

log = logging.getLogger("proxy.app")

QUEUE_SAMPLE_SECONDS = 1.0


def redactor_of(config: Config) -> Redactor:
    """The configured redaction rules; a bad rule is a configuration error."""
    builtin = DEFAULT_BUILTIN if config.redaction.builtin is None else config.redaction.builtin
    try:
        return Redactor.build(builtin, config.redaction.patterns)
    except ValueError as error:
        raise ConfigError(f"invalid configuration: redaction: {error}") from None


async def _store(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = await open_store(config.store.url, config.store)
    try:
        secret = os.environ.get(config.callers.secret_env)
        # A new database stores no secret (b""): portable fingerprints, see proxy.callers.
        key = secret.encode() if secret else await store.setting("caller_secret", b"")
        app[CALLERS] = Callers(
            key or None,
            store=store,
            keys=config.auth.mode == "keys",
            cache_seconds=config.auth.key_cache_seconds,
        )
        writer = Writer(
            store,
            queue_size=config.store.queue_size,
            batch_size=config.store.batch_size,
            on_committed=_count_stored(app),
            on_failed=_count_failed(app),
        )
        app[METRICS] = Metrics(
            queue_depth=lambda: writer.depth, caller_label=config.metrics.caller_label
        )
        writer.start()
        app[STORE] = store
        app[WRITER] = writer
        app[REPLAYER] = Replayer(store, shared=config.replay.shared)
        sampler = None
        if app[METRICS].multiprocess:
            sampler = asyncio.create_task(_sample_queue_forever(app[METRICS]))
        yield
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await writer.close()
        app[METRICS].flush()  # with several workers, what a scrape of another one reads
    finally:
        await store.close()


async def _sample_queue_forever(metrics: Metrics) -> None:
    """Several workers: a scrape reads every worker's gauge files, so each refreshes its own."""
    while True:
        metrics.sample_queue()
        await asyncio.sleep(QUEUE_SAMPLE_SECONDS)


def _count_stored(app: web.Application) -> Callable[[CompletionRecord], None]:
    prices = app[CONFIG].prices

    def count(record: CompletionRecord) -> None:
        app[METRICS].stored(
            caller=record.caller,
            model=record.model,
            prompt_tokens=record.prompt_tokens,
            cached_tokens=record.cached_tokens,
            completion_tokens=record.completion_tokens,
            cost=cost(
                prices,
                record.model,
                record.prompt_tokens,
                record.cached_tokens,
                record.completion_tokens,
            ),
        )

    return count


def _count_failed(app: web.Application) -> Callable[[], None]:
    def count() -> None:
        app[METRICS].write_failed()

    return count


async def _retention(app: web.Application) -> AsyncIterator[None]:
    """Prune on a schedule when ``retention.days`` is set; the task is owned and cancelled."""
    retention = app[CONFIG].retention
    task = None
    if retention.days is not None:
        task = asyncio.create_task(_prune_forever(app, retention.days, retention.interval_hours))
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def prune_cutoff(days: float, now: float) -> int:
    """What a retention of ``days`` deletes: completions created before this Unix second.
    Days reaching back before 1970 keep everything rather than overflow the store's range."""
    return int(max(0.0, now - days * 86400))


async def _prune_forever(app: web.Application, days: float, interval_hours: float) -> None:
    while True:
        before = prune_cutoff(days, time.time())
        try:
            report = await app[STORE].prune(before)
        except Exception:
            log.exception("retention run failed")
        else:
            if report.completions or report.exchanges:
                sizes = {"bytes_before": report.bytes_before, "bytes_after": report.bytes_after}
                log.info(
                    "retention",
                    extra={
                        "completions": report.completions,
                        "exchanges": report.exchanges,
                        **{name: size for name, size in sizes.items() if size is not None},
                    },
                )
        await asyncio.sleep(interval_hours * 3600)


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    upstream_key = None
    if config.auth.mode == "keys":
        upstream_key = os.environ.get(config.auth.upstream_key_env)
        if not upstream_key:
            raise RuntimeError(f"auth.mode is keys but {config.auth.upstream_key_env} is not set")
    client = UpstreamClient(
        config.upstream.url,
        max_connections=config.upstream.max_connections,
        connect_timeout=config.upstream.connect_timeout,
        read_timeout=config.upstream.read_timeout,
    )
    drop = (
        frozenset() if upstream_key is None else RETARGETING - _lower(config.auth.forward_headers)
    )
    app[RELAY] = Relay(
        client,
        app[WRITER],
        upstream_key,
        drop_headers=drop,
        max_answer_bytes=config.capture.max_answer_bytes,
    )
    yield
    await client.close()


def _lower(names: list[str]) -> frozenset[str]:
    return frozenset(name.lower() for name in names)


def create_app(config: Config) -> web.Application:
    access_log = AccessLog(logging.getLogger("proxy.access")) if config.logging.access_log else None
    ids = request_ids()
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[exchange_middleware(access_log, ids)],
    )
    app[REQUEST_IDS] = ids
    if access_log is not None:
        lines = access_log

        async def flush_access_log(_: web.Application) -> None:
            lines.flush()  # the last pass's lines, if the loop stops before it writes them

        app.on_cleanup.append(flush_access_log)
    app[CONFIG] = config
    app[OPENAPI] = orjson.dumps(openapi.document())
    app[REDACTOR] = redactor_of(config)
    app[FORWARDING] = ForwardRules(config.auth.forward, config.auth.admin_forward)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_retention)
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
    app.router.add_get("/admin/usage", admin.get_usage, allow_head=False)
    app.router.add_get("/admin/exchanges", admin.list_exchanges, allow_head=False)
    app.router.add_get("/admin/audit", admin.list_audit, allow_head=False)
    app.router.add_get("/admin/keys", admin_keys.list_keys, allow_head=False)
    app.router.add_post("/admin/keys", admin_keys.create_key)
    app.router.add_post("/admin/keys/{name}/revoke", admin_keys.revoke_key)
    if config.console.enabled:
        console_routes.setup(app)
    if config.metrics.enabled:
        app.router.add_get("/metrics", admin.metrics, allow_head=False)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.forward)
    return app
