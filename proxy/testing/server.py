"""The proxy for one test: a real ``create_app`` on a free loopback port, in its own thread.

The thread runs its own event loop, so sync tests (which block their thread on a sync
client) and async tests (whose loop is the test's) reach it alike. The store is a fresh
SQLite file in a temporary directory, loaded with the test's recordings before the port
opens; when the test ends, what the store holds is read back for the recording file, and
the directory is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.app import create_app
from proxy.config import Config, validate
from proxy.errors import InvalidRequest, ProxyError
from proxy.keys import STORE
from proxy.store import ExportFilter
from proxy.testing.files import Exchange, from_record, to_record

Mode = Literal["record", "replay", "fallback"]
# Describes a request that has no recording: (method, path, parsed JSON body or None).
Explain = Callable[[str, str, Any], str]

T = TypeVar("T")
HOST = "127.0.0.1"
_TIMEOUT = 30.0


def proxy_config(mode: Mode, upstream: str, db: Path) -> Config:
    """What the proxy runs with: record captures every completion, the others replay any
    caller's recordings (the key a test runs with does not matter)."""
    replay = {"record": "off", "replay": "strict", "fallback": "fallback"}[mode]
    return validate(
        {
            "upstream": {"url": upstream},
            "store": {"url": str(db)},
            "capture": {"policy": "all"},
            "replay": {"mode": replay, "shared": True},
            "logging": {"access_log": False},
            "metrics": {"enabled": False},
        },
        source="the pytest plugin",
    )


def _miss_watcher(explain: Explain, misses: list[str]) -> Middleware:
    @web.middleware
    async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as error:
            if error.code != "replay_miss":
                raise
            raw = await request.read()
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = None
            message = explain(request.method, request.path, body)
            misses.append(message)
            raise InvalidRequest(message, code="replay_miss") from None

    return watch


class ProxyThread:
    """Start with ``start()`` (returns the base URL), end with ``stop()`` (returns what the
    store holds, as exchanges, in the order they were stored)."""

    def __init__(
        self, mode: Mode, upstream: str, recordings: Sequence[Exchange], explain: Explain
    ) -> None:
        self.mode = mode
        self.misses: list[str] = []  # appended by the proxy's thread, read after the test
        self._upstream = upstream
        self._recordings = list(recordings)
        self._explain = explain
        self._directory = Path(tempfile.mkdtemp(prefix="completions-proxy-"))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="completions-proxy", daemon=True
        )
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def start(self) -> str:
        self._thread.start()
        try:
            self.base_url = self._call(self._start())
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the start matters
                self._call(self._stop())
            self._end_loop()
            raise
        return self.base_url

    def stop(self) -> list[Exchange]:
        """Stop serving; the exchanges the store holds (loaded and recorded alike)."""
        try:
            return self._call(self._stop())
        finally:
            self._end_loop()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(_TIMEOUT)

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_TIMEOUT)
        self._loop.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    async def _start(self) -> str:
        config = proxy_config(self.mode, self._upstream, self._directory / "completions.db")
        app = create_app(config)
        app.middlewares.append(_miss_watcher(self._explain, self.misses))
        # A request still open when the test ends (an abandoned stream) is cut after 5 s.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0
        )
        await runner.setup()
        self._runner = runner
        if self._recordings:
            records = [to_record(e, n) for n, e in enumerate(self._recordings, 1)]
            await app[STORE].write_batch(records)
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://{HOST}:{port}/v1"

    async def _stop(self) -> list[Exchange]:
        runner = self._runner
        if runner is None:
            return []
        exchanges: list[Exchange] = []
        try:
            # The test has its answers, so they are committed (the final bytes wait for it).
            async for batch in runner.app[STORE].export(ExportFilter()):
                exchanges += map(from_record, batch)
        finally:
            await runner.cleanup()
            # Closed transports let go of their sockets on the loop's next turns.
            for _ in range(3):
                await asyncio.sleep(0)
        return exchanges
