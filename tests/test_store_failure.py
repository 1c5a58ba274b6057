"""R3: when the store cannot write, nothing is lost silently.

The database gets a small size cap (``store.max_bytes``), which fails writes with SQLITE_FULL
exactly as a full disk does. Every completion that could not be written is logged with its id
and counted; from then on ``store: true`` is refused with 503 before any upstream call; the
health check says why; freeing space brings the store back.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from tests.fakes import FakeUpstream

AUTH = {"Authorization": "Bearer sk-full"}


def chat(n: int, store: bool = True) -> dict:
    return {
        "model": "gpt-test",
        "store": store,
        "messages": [{"role": "user", "content": f"{n} " + "x" * 6000}],
    }


async def wait_for_health(proxy, status: int, deadline: float = 10.0) -> dict:
    started = time.monotonic()
    while True:
        response = await proxy.get("/healthz")
        if response.status == status:
            return await response.json()
        assert time.monotonic() - started < deadline, await response.text()
        await asyncio.sleep(0.05)


async def test_full_database_refuses_store_true_and_loses_nothing_silently(
    proxy_factory, upstream: FakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await proxy_factory(store={"max_bytes": 256 * 1024})
    answered: list[str] = []
    refused = None
    for n in range(200):
        response = await proxy.post("/v1/chat/completions", json=chat(n), headers=AUTH)
        if response.status == 503:
            refused = await response.json()
            break
        assert response.status == 200  # the client always gets the answer it paid for
        answered.append((await response.json())["id"])
    assert refused is not None, "the size cap was never reached"
    assert refused["error"]["code"] == "store_unavailable"

    with sqlite3.connect(tmp_path / "completions.db") as db:
        stored = {row[0] for row in db.execute("SELECT id FROM completions")}
    lost = set(answered) - stored
    assert lost, "some completion should have failed to be written"
    logged = {
        r.completion_id  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "completion not stored"
    }
    assert lost == logged  # every completion not written is logged with its id
    health = await wait_for_health(proxy, 503)
    assert health["store"]["writable"] is False
    assert "full" in health["store"]["reason"]
    assert health["store"]["failed"] == len(lost)

    # Refused before any upstream call; store: false still goes through.
    calls = len(upstream.received)
    response = await proxy.post("/v1/chat/completions", json=chat(1000), headers=AUTH)
    assert response.status == 503
    assert len(upstream.received) == calls
    response = await proxy.post("/v1/chat/completions", json=chat(1001, store=False), headers=AUTH)
    assert response.status == 200

    # Freeing space (deleting stored completions) brings the store back.
    for completion_id in sorted(stored)[:10]:
        response = await proxy.delete(f"/v1/chat/completions/{completion_id}", headers=AUTH)
        assert response.status == 200
    await wait_for_health(proxy, 200)
    response = await proxy.post("/v1/chat/completions", json=chat(2000), headers=AUTH)
    assert response.status == 200
    completion_id = (await response.json())["id"]
    response = await proxy.get(f"/v1/chat/completions/{completion_id}", headers=AUTH)
    assert response.status == 200
