"""ThreadedConnection: functions run whole on the connection's thread, in the order given."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from proxy.connection import ThreadedConnection


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
    finally:
        await conn.close()


async def test_posted_functions_run_in_order_between_runs_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.connection")
    conn = ThreadedConnection(_memory, "test-conn")
    await conn.open()
    try:
        await conn.run(lambda c: c.execute("CREATE TABLE seen (value INTEGER)"))
        conn.post(_append, 1)
        conn.post(_fail)  # logged; the thread carries on with what follows
        conn.post(_append, 2)
        await conn.run(_append, 3)
        conn.post(_append, 4)
        assert await conn.run(_seen) == [1, 2, 3, 4]
    finally:
        await conn.close()
    assert any("_fail failed" in r.getMessage() for r in caplog.records), caplog.text


async def test_post_needs_an_open_connection() -> None:
    conn = ThreadedConnection(_memory, "test-conn")
    with pytest.raises(RuntimeError, match="not open"):
        conn.post(_append, 1)
