"""One SQLite connection owned by one thread, where whole functions run in one trip.

A write transaction (``BEGIN IMMEDIATE``, the inserts, ``COMMIT``) is one function given to
``run``: one hand-off to the thread and one back, instead of one per statement as with a
statement-at-a-time async driver. On a busy proxy those hand-offs, not SQLite, were most of
what a commit cost. The thread also serialises everything given to it, so two transactions
on this connection can never interleave.

SQLite releases the GIL while it steps a statement, so on a machine with a spare core the
commit runs beside the event loop rather than on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Waiter = asyncio.Future[Any] | concurrent.futures.Future[Any]
_Job = tuple[_Waiter, Callable[..., Any], tuple[Any, ...], dict[str, Any]]


def _settle(future: _Waiter, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return  # the waiter went away; the function has run all the same
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ThreadedConnection:
    """``await conn.run(fn, *args)`` calls ``fn(connection, *args)`` on the connection's thread.

    The connection is opened by ``connect`` on that thread and closed there by ``close``.
    A function keeps running to its end even if its waiter is cancelled: a transaction is
    never abandoned half way.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], name: str) -> None:
        self._connect = connect
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()
        try:
            await self.run(self._open)
        except BaseException:
            await self._stop()
            raise

    def _open(self, _: sqlite3.Connection | None) -> None:
        self._conn = self._connect()

    async def run(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self._thread is None:
            raise RuntimeError(f"{self._name} is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future, fn, args, kwargs))
        return await future

    def submit(
        self,
        fn: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> concurrent.futures.Future[T]:
        """``run`` for a caller that is not on the event loop (another connection's thread):
        the outcome comes back as a ``concurrent.futures.Future``."""
        if self._thread is None:
            raise RuntimeError(f"{self._name} is not open")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (fn(self._conn, *args, **kwargs), None)
            except BaseException as error:  # noqa: BLE001 - handed to the waiter
                outcome = (None, error)
            if isinstance(future, concurrent.futures.Future):
                _settle(future, *outcome)
                continue
            # A loop closed meanwhile has nobody left to tell; the thread carries on.
            with contextlib.suppress(RuntimeError):
                future.get_loop().call_soon_threadsafe(_settle, future, *outcome)

    async def close(self) -> None:
        if self._thread is None:
            return
        if self._conn is not None:
            await self.run(_close)
            self._conn = None
        await self._stop()

    async def _stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)


def _close(conn: sqlite3.Connection) -> None:
    conn.close()
