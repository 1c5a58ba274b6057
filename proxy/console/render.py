"""Pages out: the Jinja2 environment (autoescape on), its filters, and the security headers.

Everything a completion holds reaches a page through ``{{ }}``, which escapes it, so stored
text is shown as text, never as markup. The one ``Markup`` in the package is the SVG built by
``charts`` from numbers and escaped labels.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import jinja2
import orjson
from aiohttp import web

# No inline script or style anywhere: the CSP forbids both, so an injected tag does nothing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


NONE = "\u2013"  # an en dash: no value


def when(seconds: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS`` UTC (the page's script shows local time)."""
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def money(dollars: float | None) -> str:
    if dollars is None:
        return NONE
    if dollars == 0:
        return "$0"
    if dollars < 0.01:
        return f"${dollars:.6f}".rstrip("0")
    return f"${dollars:,.4f}"


def count(value: float | None) -> str:
    return NONE if value is None else f"{value:,.0f}"


def millis(value: float | None) -> str:
    if value is None:
        return NONE
    if value < 1:
        return "<1 ms"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def pretty(value: Any) -> str:
    """JSON for people: indented, keys in their stored order."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("proxy.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        auto_reload=False,  # templates ship with the package: no stat() per page
        lstrip_blocks=True,
    )
    env.filters.update(when=when, iso=iso, money=money, count=count, millis=millis, pretty=pretty)
    return env


def page(
    env: jinja2.Environment, name: str, context: Mapping[str, Any], status: int = 200
) -> web.Response:
    text = env.get_template(name).render(context)
    return web.Response(
        text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )
