"""The console's per-application state, under one typed key."""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2
from aiohttp import web


@dataclass(slots=True)
class ConsoleState:
    env: jinja2.Environment
    session_hours: float
    key: bytes = b""  # signs sessions and CSRF tokens; loaded from the store at startup
    # Sessions signed out before they expire: sid → expiry. One process serves a store, so
    # this set is whole; it is trimmed as entries expire.
    ended: dict[str, int] = field(default_factory=dict)


CONSOLE = web.AppKey("console", ConsoleState)
