"""Sign-in, sign-out, and the wrapper that gives every page its signed-in caller.

The token typed into the sign-in form is resolved exactly as the API resolves a bearer token
(``Callers.resolve_token``) and then forgotten: the browser gets a signed session cookie
(HttpOnly, SameSite=Strict, path ``/ui/``) naming the caller. In keys mode the cookie also
names the key's public id, and every request re-checks that key through the same cache the
API uses, so a revoked key's session ends within ``auth.key_cache_seconds``; a key's role is
read afresh the same way. Every form that changes something carries a CSRF token bound to the
session; without it the request is refused with a 403 and nothing changes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiMapping

from proxy.callers import Caller, split_key
from proxy.console import session as sessions
from proxy.console.render import page
from proxy.console.state import CONSOLE, ConsoleState
from proxy.errors import ProxyError, Unauthorized
from proxy.keys import ACCESS, CALLERS, STORE

SIGNIN = "/ui/signin"
HOME = "/ui/"


@dataclass(frozen=True, slots=True)
class Visitor:
    """A signed-in caller, as each page sees it."""

    session: sessions.Session
    caller: Caller
    csrf: str
    keys_mode: bool

    @property
    def admin(self) -> bool:
        return self.caller.role == "admin"


PageHandler = Callable[[web.Request, Visitor], Awaitable[web.StreamResponse]]


def _cookie(request: web.Request, response: web.StreamResponse, value: str, max_age: int) -> None:
    response.set_cookie(
        sessions.COOKIE,
        value,
        max_age=max_age,
        path="/ui/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


async def visitor_of(request: web.Request) -> Visitor | None:
    state = request.app[CONSOLE]
    value = request.cookies.get(sessions.COOKIE)
    if not value:
        return None
    now = time.time()
    session = sessions.unsign(state.key, value, now)
    if session is None or await request.app[STORE].session_ended(session.sid):
        return None
    callers = request.app[CALLERS]
    if callers.keys:
        if session.key_id is None:
            return None
        caller = await callers.by_key_id(session.key_id)
        if caller is None or caller.name != session.caller:
            return None
    elif session.key_id is not None:
        return None  # made in keys mode; the proxy has since switched to passthrough
    else:
        caller = Caller(session.caller)
    return Visitor(session, caller, sessions.csrf_token(state.key, session.sid), callers.keys)


def error_page(
    request: web.Request, status: int, title: str, message: str, visitor: Visitor | None
) -> web.Response:
    return page(
        request.app[CONSOLE].env,
        "error.html",
        {"visitor": visitor, "title": title, "message": message, "status": status, "nav": ""},
        status=status,
    )


def redirect(location: str) -> web.Response:
    """A 303 to ``location``: after a form, the browser follows it with a GET."""
    return web.Response(status=303, headers={"Location": location})


def _safe_next(target: str | None) -> str:
    """Only a console path: an open redirect would make the sign-in page a phishing aid."""
    if target and target.startswith("/ui/") and not target.startswith("//"):
        return target
    return HOME


def signed_in(*, admin: bool = False, changes: bool = False) -> Callable[[PageHandler], Handler]:
    """Wrap a page: no session → the sign-in page; ``admin`` pages refuse members (403);
    ``changes`` (a POST) checks the form's CSRF token first."""

    def wrap(handler: PageHandler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            visitor = await visitor_of(request)
            if visitor is None:
                if request.method != "GET":
                    return error_page(
                        request, 401, "Signed out", "Sign in again; nothing was changed.", None
                    )
                return redirect(f"{SIGNIN}?next={_quote(request.path_qs)}")
            request[ACCESS].caller = visitor.caller.name
            if admin and not visitor.admin:
                return error_page(request, 403, "Admins only", "This page is for admins.", visitor)
            if changes:
                form = await request.post()
                token = form.get("csrf")
                key = request.app[CONSOLE].key
                if not sessions.csrf_ok(key, visitor.session.sid, _text(token)):
                    return error_page(
                        request,
                        403,
                        "Form expired",
                        "The form's security token is missing or wrong, so nothing was"
                        " changed. Reload the page and try again.",
                        visitor,
                    )
            try:
                return await handler(request, visitor)
            except ProxyError as error:
                return error_page(request, error.status, "Not done", error.message, visitor)

        run.__name__ = handler.__name__
        return run

    return wrap


def _quote(path: str) -> str:
    return quote(path, safe="/")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def form_text(form: MultiMapping[object], name: str) -> str:
    return _text(form.get(name)) or ""


def _signin_page(
    request: web.Request,
    state: ConsoleState,
    error: str | None,
    status: int = 200,
    target: str | None = None,
) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    response = page(
        state.env,
        "signin.html",
        {
            "visitor": None,
            "nav": "",
            "keys_mode": request.app[CALLERS].keys,
            "csrf": sessions.csrf_token(state.key, "signin:" + nonce),
            "next": _safe_next(target or request.query.get("next")),
            "error": error,
        },
        status=status,
    )
    response.set_cookie(
        sessions.PRE_COOKIE,
        nonce,
        max_age=3600,
        path="/ui/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def signin_form(request: web.Request) -> web.StreamResponse:
    if await visitor_of(request) is not None:
        return redirect(_safe_next(request.query.get("next")))
    return _signin_page(request, request.app[CONSOLE], None)


async def signin(request: web.Request) -> web.StreamResponse:
    state = request.app[CONSOLE]
    form = await request.post()
    target = form_text(form, "next")
    nonce = request.cookies.get(sessions.PRE_COOKIE, "")
    if not nonce or not sessions.csrf_ok(state.key, "signin:" + nonce, _text(form.get("csrf"))):
        return _signin_page(request, state, "The form expired; enter the key again.", status=403)
    token = form_text(form, "token").strip()
    callers = request.app[CALLERS]
    if not token:
        return _signin_page(request, state, "Enter a key.", 400, target)
    try:
        caller = await callers.resolve_token(token)
    except Unauthorized as error:
        return _signin_page(request, state, error.message, 401, target)
    parts = split_key(token) if callers.keys else None
    made = sessions.new_session(
        caller.name,
        caller.role,
        parts[0] if parts else None,
        time.time(),
        state.session_hours,
    )
    request[ACCESS].caller = caller.name
    response = redirect(_safe_next(target))
    _cookie(request, response, sessions.sign(state.key, made), int(state.session_hours * 3600))
    response.del_cookie(sessions.PRE_COOKIE, path="/ui/")
    return response


@signed_in(changes=True)
async def signout(request: web.Request, visitor: Visitor) -> web.StreamResponse:
    await request.app[STORE].end_session(visitor.session.sid, visitor.session.expires)
    response = redirect(SIGNIN)
    response.del_cookie(sessions.COOKIE, path="/ui/")
    return response
