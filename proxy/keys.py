"""Typed keys for application and request state, so handlers and app never import each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:  # names for the string-typed keys below; importing them would cycle
    from proxy.callers import Callers  # noqa: F401
    from proxy.config import Config  # noqa: F401
    from proxy.logs import AccessRecord  # noqa: F401
    from proxy.metrics import Metrics  # noqa: F401
    from proxy.redaction import Redactor  # noqa: F401
    from proxy.relay import Relay  # noqa: F401
    from proxy.replay import Replayer  # noqa: F401
    from proxy.store import Store  # noqa: F401
    from proxy.writer import Writer  # noqa: F401

CONFIG = web.AppKey["Config"]("config")
STORE = web.AppKey["Store"]("store")
WRITER = web.AppKey["Writer"]("writer")
RELAY = web.AppKey["Relay"]("relay")
CALLERS = web.AppKey["Callers"]("callers")
OPENAPI = web.AppKey[bytes]("openapi")
REPLAYER = web.AppKey["Replayer"]("replayer")
REDACTOR = web.AppKey["Redactor"]("redactor")
METRICS = web.AppKey["Metrics"]("metrics")

ACCESS = web.RequestKey["AccessRecord"]("access")
