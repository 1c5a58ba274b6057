"""ThreadedConnection: functions run whole on the connection's thread, in the order given."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from proxy.store.sqlite.connection import ThreadedConnection


def _memory() -> sqlite3.Connection:
    return sqlite3.connect(":memory:", isolation_level=None)


def _append(conn: sqlite3.Connection, value: int) -> None:
    conn.execute("INSERT INTO seen (value) VALUES (?)", (value,))


def _seen(conn: sqlite3.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT value FROM seen ORDER BY rowid")]


def _fail(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT * FROM no_such_table")


async def test_run_returns_results_and_raises_errors() -> None:
    conn = ThreadedConnection(_memory, "test-conn")
    await conn.open()
    try:
        assert await conn.run(lambda c: c.execute("SELECT 40 + 2").fetchone()[0]) == 42
        with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
            await conn.run(_fail)
        await conn.run(lambda c: c.execute("CREATE TABLE seen (value INTEGER)"))
        # Given together, they run one after another in the order given.
        await asyncio.gather(*(conn.run(_append, n) for n in range(20)))
        assert await conn.run(_seen) == list(range(20))
    finally:
        await conn.close()


async def test_run_needs_an_open_connection() -> None:
    conn = ThreadedConnection(_memory, "test-conn")
    with pytest.raises(RuntimeError, match="not open"):
        await conn.run(_seen)


async def test_submit_serves_a_caller_on_another_thread() -> None:
    """The import's writer hands checkpoints to the checkpointer from its own thread."""
    conn = ThreadedConnection(_memory, "test-conn")
    with pytest.raises(RuntimeError, match="not open"):
        conn.submit(_seen)
    await conn.open()
    try:
        await conn.run(lambda c: c.execute("CREATE TABLE seen (value INTEGER)"))

        def elsewhere() -> list[int]:
            for n in range(5):
                conn.submit(_append, n)
            with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
                conn.submit(_fail).result()
            return conn.submit(_seen).result()

        assert await asyncio.to_thread(elsewhere) == list(range(5))
    finally:
        await conn.close()
