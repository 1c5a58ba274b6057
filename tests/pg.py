"""PostgreSQL for tests: a fresh database per test run, a fresh schema per test, and a gate.

The server is ``PROXY_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432``, trust
auth). Each run creates a database named ``<prefix>_<random>`` and drops it at the end; the
prefix is ``PROXY_TEST_PG_PREFIX``, by default the checkout's folder name. Each test gets its
own schema in it, named by the URL's
``search_path``, so tests never see each other's rows. Without a reachable server the
PostgreSQL tests are skipped with the reason, except when ``CI`` is set: then they fail.

``Gate`` is a TCP forwarder in front of the server that a test can shut (connections are
cut and new ones refused) and open again on the same port: the database "goes away" and
"comes back" without touching the server others use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

SERVER = os.environ.get("PROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
# Named after the checkout's folder unless set, so runs from different checkouts on one
# server never touch each other's databases.
PREFIX = os.environ.get("PROXY_TEST_PG_PREFIX") or re.sub(
    r"\W", "_", Path(__file__).resolve().parents[1].name.lower()
)


class Unavailable(Exception):
    """No PostgreSQL server could be reached."""


def _url(database: str, schema: str | None = None, *, port: int | None = None) -> str:
    parts = urlsplit(SERVER)
    netloc = parts.netloc
    if port is not None:
        netloc = f"{netloc.rsplit(':', 1)[0]}:{port}"
    url = f"{parts.scheme}://{netloc}/{database}"
    return url if schema is None else f"{url}?search_path={schema}"


@dataclass
class TestDatabase:
    """The run's database; ``schema()`` gives each test a fresh, empty schema."""

    name: str
    schemas: list[str] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(SERVER)
        return parts.hostname or "127.0.0.1", parts.port or 5432

    def url(self, schema: str | None = None, *, port: int | None = None) -> str:
        return _url(self.name, schema, port=port)

    async def schema(self) -> str:
        name = f"t_{secrets.token_hex(4)}"
        conn = await asyncpg.connect(self.url(), timeout=5)
        try:
            await conn.execute(f"CREATE SCHEMA {name}")
        finally:
            await conn.close()
        self.schemas.append(name)
        return name

    async def drop_schema(self, name: str) -> None:
        conn = await asyncpg.connect(self.url(), timeout=5)
        try:
            # Sessions a test left behind (a killed proxy's) must not hold its tables.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND query LIKE '%' || $1 || '%'",
                name,
            )
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()


async def create_database() -> TestDatabase:
    """A new, empty database for this run; ``Unavailable`` when no server answers."""
    try:
        conn = await asyncpg.connect(_url("postgres"), timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError) as error:
        raise Unavailable(f"no PostgreSQL server at {SERVER}: {error}") from error
    name = f"{PREFIX}_{secrets.token_hex(5)}"
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return TestDatabase(name)


async def drop_database(database: TestDatabase) -> None:
    conn = await asyncpg.connect(_url("postgres"), timeout=5)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {database.name} WITH (FORCE)")
    finally:
        await conn.close()


class Gate:
    """A loopback TCP forwarder to ``target``; ``shut()`` cuts every connection through it
    and refuses new ones, ``open()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._pipes -= {writer, up_writer}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
