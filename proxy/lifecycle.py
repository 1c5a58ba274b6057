"""The lines a serving process logs about its own life: "listening" and one "shutdown"."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from aiohttp import web

from proxy.config import Config, without_password
from proxy.keys import METRICS, WRITER

log = logging.getLogger("proxy")


class Lifecycle:
    """ "listening" once the store is open and the sockets are bound, and one "shutdown" line
    with what the drain finished: requests answered and completions committed after SIGTERM.

    A worker of ``serve --workers N`` (``worker`` set) logs only its shutdown line, naming
    itself; the supervisor says "listening" once for all of them.
    """

    def __init__(self, config: Config, ports: Sequence[int], worker: int | None = None) -> None:
        self._config = config
        self._ports = ports
        self._worker = worker
        self._stopping_at = 0.0
        self._finished = 0
        self._committed = 0

    def attach(self, app: web.Application) -> None:
        if self._worker is None:
            app.on_startup.append(self._listening)  # after the cleanup contexts: store open
        app.on_shutdown.append(self._stopping)  # new connections refused, requests in flight
        app.on_cleanup.append(self._stopped)  # after the writer committed its queue

    async def _listening(self, app: web.Application) -> None:
        config = self._config
        log.info(
            "listening",
            extra={
                "host": config.server.host,
                "port": self._ports[0] if self._ports else config.server.port,
                "upstream": config.upstream.url,
                "db": without_password(config.store.url),
            },
        )

    async def _stopping(self, app: web.Application) -> None:
        self._stopping_at = time.monotonic()
        self._finished = app[METRICS].finished
        self._committed = app[WRITER].stats.committed

    async def _stopped(self, app: web.Application) -> None:
        if not self._stopping_at:
            return  # start-up failed; its error says why
        drained = {
            "requests_drained": app[METRICS].finished - self._finished,
            "completions_committed": app[WRITER].stats.committed - self._committed,
            "seconds": round(time.monotonic() - self._stopping_at, 3),
            "shutdown_timeout": self._config.server.shutdown_timeout,
        }
        if self._worker is not None:
            drained["worker"] = self._worker
        log.info("shutdown", extra=drained)
