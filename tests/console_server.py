"""The proxy and the fake upstream as real servers on a background thread's event loop.

Browser tests drive Playwright's synchronous API from the test thread, which cannot share an
event loop with the servers; so the servers get a thread and loop of their own, and the test
thread calls into it with ``call``. Both listen on loopback ports like any server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from proxy.app import create_app
from proxy.callers import new_key
from proxy.keys import STORE
from tests.conftest import make_config
from tests.fakes import FakeUpstream

T = TypeVar("T")


class Servers:
    """A fake upstream and a proxy in front of it; ``start`` returns once both listen."""

    def __init__(self, tmp: Path, **sections: dict[str, Any]) -> None:
        self.tmp = tmp
        self.sections = sections
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.upstream = FakeUpstream()
        self.runners: list[web.AppRunner] = []
        self.app: web.Application | None = None
        self.url = ""

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(_run(make), self.loop)
        return future.result(timeout)

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def start(self) -> Servers:
        self.thread.start()

        async def both() -> None:
            upstream_url = await self._serve(self.upstream.app) + "/v1"
            config = make_config(self.tmp, upstream_url, **self.sections)
            self.app = create_app(config)
            self.url = await self._serve(self.app)

        self.call(both)
        return self

    def make_key(self, name: str, role: str) -> str:
        """A proxy key made straight in the store (as ``completions-proxy keys create`` does)."""
        key, key_id, key_hash = new_key()
        assert self.app is not None
        store = self.app[STORE]
        self.call(lambda: store.create_key(name, role, key_id, key_hash))
        return key

    def stop(self) -> None:
        async def down() -> None:
            for runner in reversed(self.runners):
                await runner.cleanup()

        self.call(down)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _run(make: Callable[[], Awaitable[T]]) -> T:
    return await make()
