"""Fixtures: the fake upstream as a real server, the proxy in front of it, SDK clients, and
the proxy's JSON log lines captured in a buffer, and the store each proxy uses (``store_url``:
SQLite by default; PostgreSQL where a test or a module asks for both backends, see
``BOTH_BACKENDS`` and tests/pg.py)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.config import Config, validate
from proxy.logs import JSONFormatter
from tests import pg
from tests.fakes import FakeUpstream
from tests.helpers import sdk

ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app)  # test servers cancel handlers on disconnect
    fake.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    fake.server = server  # type: ignore[attr-defined]
    return fake


BACKENDS = ("sqlite", "postgres")
# Tests that also run on PostgreSQL: whole modules, or ``module::test`` (they speak only
# through the API; the others read the SQLite file too). Chosen to cover R13 and R19 on both
# backends while the suite stays short.
BOTH_BACKENDS = frozenset(
    {
        "test_backends",
        "test_sdk",
        "test_security::test_callers_by_operations_matrix",
        "test_bad_input::test_sdk_exceptions_for_proxy_errors",
        "test_bad_input::test_delete_with_json_content_type_and_no_body",
        "test_bad_input::test_nul_characters_are_refused_and_change_nothing",
        "test_console_search::test_search_through_the_api_finds_prompts_answers_and_tool_arguments",
        "test_console_search::test_search_pages_newest_first_without_repeats",
    }
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    chosen = any(
        mark.name == "parametrize" and "store_url" in mark.args[0]
        for mark in metafunc.definition.iter_markers()
    )
    both = module in BOTH_BACKENDS or f"{module}::{metafunc.function.__name__}" in BOTH_BACKENDS
    if both and "store_url" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("store_url", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[pg.TestDatabase]:
    """This run's PostgreSQL database, dropped at the end; skipped without a server, except
    in CI (``CI`` set), where a missing server fails the test."""
    try:
        database = asyncio.run(pg.create_database())
    except pg.Unavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL: {error}")
        pytest.skip(f"PostgreSQL tests skipped: {error}")
    yield database
    asyncio.run(pg.drop_database(database))


@pytest.fixture
async def pg_url(pg_database: pg.TestDatabase) -> AsyncIterator[str]:
    """A URL to a fresh, empty schema of the run's database."""
    schema = await pg_database.schema()
    yield pg_database.url(schema)
    await pg_database.drop_schema(schema)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the proxy under test keeps its store: a SQLite file unless the test is
    parametrised with ``postgres``."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgres":
        url: str = request.getfixturevalue("pg_url")
        return url
    return str(tmp_path / "completions.db")


def make_config(
    tmp_path: Path, upstream_url: str, store_url: str | None = None, **sections: dict[str, Any]
) -> Config:
    data: dict[str, Any] = {
        "upstream": {"url": upstream_url, "connect_timeout": 2, "read_timeout": 5},
        "store": {"url": store_url or str(tmp_path / "completions.db")},
        "logging": {"format": "json"},
    }
    if "path" in sections.get("store", {}):  # the old name of url, given by the test
        del data["store"]["url"]
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return validate(data, source="test")


@pytest.fixture
def proxy_factory(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    upstream: FakeUpstream,
    tmp_path: Path,
    store_url: str,
) -> ProxyFactory:
    async def start(**sections: dict[str, Any]) -> TestClient[web.Request, web.Application]:
        sections.setdefault("upstream", {})
        url = sections["upstream"].pop("url", upstream.url)  # type: ignore[attr-defined]
        config = make_config(tmp_path, url, store_url, **sections)
        return await aiohttp_client(create_app(config))

    return start


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory) -> TestClient[web.Request, web.Application]:
    return await proxy_factory()


@pytest.fixture
async def alice(proxy: TestClient[web.Request, web.Application]) -> openai.AsyncOpenAI:
    async with sdk(proxy, "sk-test-alice") as client:
        yield client  # type: ignore[misc]


@pytest.fixture
async def bob(proxy: TestClient[web.Request, web.Application]) -> openai.AsyncOpenAI:
    async with sdk(proxy, "sk-test-bob") as client:
        yield client  # type: ignore[misc]


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The proxy's real log pipeline with the JSON formatter, into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(previous)
