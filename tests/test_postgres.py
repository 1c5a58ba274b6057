"""What is specific to the PostgreSQL store: migrations under an advisory lock, timeouts,
the database going away and coming back, several proxy instances on one database, and what
retention leaves in the database's files. Behaviour shared with SQLite is in test_backends."""

from __future__ import annotations

import asyncio

import asyncpg

from proxy.store.postgres.migrations import MIGRATIONS, applied, migrate


async def test_two_instances_starting_at_once_migrate_exactly_once(pg_url: str) -> None:
    conns = [await asyncpg.connect(pg_url) for _ in range(2)]
    try:
        done = await asyncio.gather(*(migrate(conn) for conn in conns))
        names = [m.name for m in MIGRATIONS]
        assert sorted(done, key=len) == [[], names]  # one applied every step, the other none
        assert await applied(conns[0]) == names
        assert await migrate(conns[1]) == []  # and a later start applies nothing
        count = await conns[0].fetchval("SELECT count(*) FROM _migrations")
        assert count == len(names)
    finally:
        for conn in conns:
            await conn.close()
