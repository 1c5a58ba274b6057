"""The console's per-application state, under one typed key."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from aiohttp import web


@dataclass(slots=True)
class ConsoleState:
    env: jinja2.Environment
    session_hours: float
    key: bytes = b""  # signs sessions and CSRF tokens; loaded from the store at startup


CONSOLE = web.AppKey("console", ConsoleState)
