"""The console's routes and startup: which path is which page, and where the key comes from."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.console import admin, auth, log, usage
from proxy.console.render import environment
from proxy.console.state import CONSOLE, ConsoleState
from proxy.keys import CONFIG, STORE

STATIC = Path(__file__).with_name("static")
TYPES = {".css": "text/css", ".js": "text/javascript"}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The static files, read once: a few kilobytes, served from memory."""
    return {
        path.name: (path.read_bytes(), TYPES[path.suffix])
        for path in STATIC.iterdir()
        if path.suffix in TYPES
    }


def _static(files: dict[str, tuple[bytes, str]]) -> Handler:
    async def static(request: web.Request) -> web.StreamResponse:
        found = files.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    return static


async def _load_key(app: web.Application) -> AsyncIterator[None]:
    # Kept in the store, so sessions outlive a restart; generated once per store.
    app[CONSOLE].key = await app[STORE].setting("console_session_key", secrets.token_bytes(32))
    yield


async def _home(request: web.Request) -> web.StreamResponse:
    return auth.redirect("/ui/log")


async def _unknown(request: web.Request) -> web.StreamResponse:
    """A console page, not the API's JSON, for a path under ``/ui/`` that names no page: the
    reader followed a stale or mistyped link in a browser."""
    return auth.error_page(
        request, 404, "Not found", "The console has no page here.", await auth.visitor_of(request)
    )


def setup(app: web.Application) -> None:
    """Add the console to ``app``; call after the store's cleanup context is registered."""
    app[CONSOLE] = ConsoleState(environment(), app[CONFIG].console.session_hours)
    app.cleanup_ctx.append(_load_key)
    router = app.router
    router.add_get("/ui", _home)
    router.add_get("/ui/", _home)
    router.add_get("/ui/signin", auth.signin_form)
    router.add_post("/ui/signin", auth.signin)
    router.add_post("/ui/signout", auth.signout)
    router.add_get("/ui/log", log.log)
    router.add_get("/ui/c/{completion_id}", log.completion)
    router.add_post("/ui/c/{completion_id}/metadata", log.update_metadata)
    router.add_get("/ui/c/{completion_id}/delete", log.confirm_delete)
    router.add_post("/ui/c/{completion_id}/delete", log.delete)
    router.add_get("/ui/usage", usage.usage)
    router.add_get("/ui/audit", admin.audit)
    router.add_get("/ui/exchanges", admin.exchanges)
    router.add_get("/ui/keys", admin.keys)
    router.add_post("/ui/keys", admin.create_key)
    router.add_post("/ui/keys/{name}/revoke", admin.revoke_key)
    router.add_get("/ui/static/{name}", _static(_static_files()))
    router.add_get("/ui/{tail:.*}", _unknown)  # last: only what no route above names
