"""Typed keys for application and request state, so handlers and app never import each other.

Every key names its real type: nothing below imports this module back (the middleware and the
handlers sit above it), so there is no import cycle to work around.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web

from proxy.callers import Callers
from proxy.config import Config
from proxy.logs import AccessRecord
from proxy.metrics import Metrics
from proxy.redaction import Redactor
from proxy.relay import Relay
from proxy.replay import Replayer
from proxy.store import Store
from proxy.upstream import ForwardRules
from proxy.writer import Writer

CONFIG = web.AppKey[Config]("config")
STORE = web.AppKey[Store]("store")
WRITER = web.AppKey[Writer]("writer")
RELAY = web.AppKey[Relay]("relay")
CALLERS = web.AppKey[Callers]("callers")
OPENAPI = web.AppKey[bytes]("openapi")
REPLAYER = web.AppKey[Replayer]("replayer")
REDACTOR = web.AppKey[Redactor]("redactor")
METRICS = web.AppKey[Metrics]("metrics")
FORWARDING = web.AppKey[ForwardRules]("forwarding")
# The ids of the app's requests, drawn by the middleware and by the server for a request
# too malformed to reach it (``proxy.server``).
REQUEST_IDS = web.AppKey[Iterator[str]]("request_ids")

ACCESS = web.RequestKey[AccessRecord]("access")
