"""Fixtures: the fake upstream as a real server, the proxy in front of it, SDK clients, and
the proxy's JSON log lines captured in a buffer."""

from __future__ import annotations

import io
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.config import Config, validate
from proxy.logs import JSONFormatter
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


def make_config(tmp_path: Path, upstream_url: str, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "upstream": {"url": upstream_url, "connect_timeout": 2, "read_timeout": 5},
        "store": {"path": str(tmp_path / "completions.db")},
        "logging": {"format": "json"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return validate(data, source="test")


@pytest.fixture
def proxy_factory(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    upstream: FakeUpstream,
    tmp_path: Path,
) -> ProxyFactory:
    async def start(**sections: dict[str, Any]) -> TestClient[web.Request, web.Application]:
        sections.setdefault("upstream", {})
        url = sections["upstream"].pop("url", upstream.url)  # type: ignore[attr-defined]
        config = make_config(tmp_path, url, **sections)
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
