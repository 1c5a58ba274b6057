"""Retention (R20): deleting old completions gives the disk back, and deleted means gone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from proxy.store import CompletionRecord
from proxy.store.sqlite import SQLiteStore
from tests.helpers import cli, sdk

CANARY = b"CANARY-7f3a9c-deleted-content"
DAY = 86400


def record(n: int, created: int, text: bytes = b"") -> CompletionRecord:
    message = {"role": "assistant", "content": "word " * 150}
    answer = {
        "id": f"chatcmpl-r{n}",
        "object": "chat.completion",
        "created": created,
        "choices": [{"index": 0, "message": message}],
    }
    return CompletionRecord(
        id=f"chatcmpl-r{n}",
        caller="caller_retention",
        created=created,
        model="gpt-test",
        metadata={"n": str(n % 10)},
        completion=orjson.dumps(answer),
        request=b'{"model":"gpt-test","messages":[{"role":"user","content":"' + text + b'"}]}',
        request_id=None,
        stream=False,
        outcome="complete",
    )


def size(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.iterdir() if p.name.startswith(db.name))


def contents(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))


async def test_pruning_ninety_percent_shrinks_the_file_and_erases_the_canary(
    tmp_path: Path,
) -> None:
    db = tmp_path / "big.db"
    store = SQLiteStore(db)
    await store.open()
    now = int(time.time())
    old, new = now - 40 * DAY, now - DAY
    total = 100_000
    batch = 5_000
    for start in range(0, total, batch):
        rows = [
            record(n, old if n % 10 else new, CANARY if n == 5 else b"")
            for n in range(start, start + batch)
        ]
        await store.write_batch(rows)
    peak = size(db)
    assert CANARY in contents(db)  # in the file or its WAL before the run
    report = await store.prune(now - 30 * DAY)
    await store.close()
    assert report.completions == total * 9 // 10
    after = size(db)
    assert after < 0.3 * peak, (peak, after)
    assert CANARY not in contents(db)  # neither the file nor its WAL keeps deleted content
    store = SQLiteStore(db)
    await store.open()
    try:
        remaining = await store.usage(None, None, ["caller"])
        assert remaining[0].completions == total // 10
    finally:
        await store.close()


async def test_prune_command_and_the_schedule(proxy_factory, tmp_path: Path) -> None:
    db = tmp_path / "completions.db"
    store = SQLiteStore(db)
    await store.open()
    now = int(time.time())
    await store.write_batch([record(1, now - 10 * DAY, CANARY), record(2, now)])
    await store.close()
    code, _, err = await cli("prune", "--db", str(db), "--days", "30")
    assert code == 0 and "pruned 0 completions" in err
    # A proxy with retention.days prunes when it starts, then every interval.
    proxy = await proxy_factory(retention={"days": 5})
    deadline = time.monotonic() + 10
    while CANARY in contents(db):
        assert time.monotonic() < deadline, "the scheduled retention run did not happen"
        await asyncio.sleep(0.05)
    async with sdk(proxy) as client:
        assert (await client.chat.completions.list()).data == []  # other caller: still isolated
    code, out, _ = await cli("export", "--db", str(db))
    assert [orjson.loads(line)["id"] for line in out.splitlines()] == ["chatcmpl-r2"]
