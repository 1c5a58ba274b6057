"""The console at scale: page times over a large store, full-text search, and what indexing
for search costs the store's writes.

    python -m tests.bench.console_bench pages --rows 1000000    # build once, then time pages
    python -m tests.bench.console_bench pages --rows 1000000 --db postgresql://.../bench
    python -m tests.bench.console_bench writes --rows 100000    # write_batch records/s

``pages`` builds a store of ``--rows`` completions (20 callers, 60 days, metadata, a varied
vocabulary) in ``--workdir``, or in the PostgreSQL database ``--db`` names (kept, and reused
when it already holds that many completions), serves it with the
real app on a loopback port in keys mode, signs in through the sign-in form as an admin and
as a member, and times each page's GET from the client (so server time plus loopback):
``--calls`` sequential requests per page, p50 and p99. ``writes`` times ``write_batch``,
256 records a batch, as the main bench's store part does. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.app import create_app
from proxy.callers import new_key
from proxy.config import StoreConfig, validate
from proxy.store import CompletionRecord, ExportFilter, Store, backend_of, open_store
from proxy.store.sqlite import SQLiteStore

CALLERS = [f"member-{n:02d}" for n in range(20)]
START = 1_760_000_000  # 2025-10-09
SPAN = 60 * 86400  # the rows spread over 60 days
WORDS = [
    "invoice",
    "refund",
    "shipping",
    "latency",
    "database",
    "migration",
    "onboarding",
    "release",
    "outage",
    "translate",
    "summary",
    "contract",
    "pricing",
    "checkout",
    "search",
    "ranking",
    "embedding",
    "cache",
]
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor"
    " incididunt ut labore et dolore magna aliqua. "
)


def record(i: int, rows: int) -> CompletionRecord:
    cid = "chatcmpl-" + hashlib.blake2b(i.to_bytes(8, "little"), digest_size=12).hexdigest()
    topic = f"topic{i % 1000}"
    words = " ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3, 7))
    request = {
        "model": "gpt-4o-mini" if i % 4 else "gpt-4o",
        "store": True,
        "metadata": {"user": f"user-{i % 100}", "env": ("prod", "dev", "test")[i % 3]},
        "messages": [
            {"role": "system", "content": LOREM * 2},
            {"role": "user", "content": f"{LOREM} Question about {words} ({topic})."},
        ],
    }
    completion = {
        "id": cid,
        "object": "chat.completion",
        "created": START + i * SPAN // rows,
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": LOREM * 6 + words},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 220, "completion_tokens": 380, "total_tokens": 600},
    }
    return CompletionRecord(
        id=cid,
        caller=CALLERS[i % len(CALLERS)],
        created=START + i * SPAN // rows,
        model=str(request["model"]),
        metadata=request["metadata"],  # type: ignore[arg-type]
        completion=orjson.dumps(completion),
        request=orjson.dumps(request),
        request_id="req_" + cid[9:],
        stream=bool(i % 2),
        outcome="complete",
        duration_ms=400.0 + i % 300,
        prompt_tokens=220,
        completion_tokens=380,
    )


def batches(start: int, stop: int, size: int, rows: int) -> Iterator[list[CompletionRecord]]:
    for first in range(start, stop, size):
        yield [record(i, rows) for i in range(first, min(first + size, stop))]


async def stored_rows(store: Store) -> int:
    """How many completions the store holds (the export's count, on either backend)."""
    count = 0
    async for chunk in store.export(ExportFilter()):
        count += len(chunk)
    return count


async def build(url: str, rows: int) -> None:
    """Fill the store at ``url`` with ``rows`` completions unless it holds them already."""
    store = await open_store(url, StoreConfig())
    try:
        if backend_of(url) == "postgres" and await stored_rows(store) >= rows:
            return
        started = time.perf_counter()
        for n, batch in enumerate(batches(0, rows, 2000, rows)):
            await store.write_batch(batch)
            if n % 50 == 0:
                done = (n + 1) * 2000
                rate = done / (time.perf_counter() - started)
                print(f"  built {done:,} ({rate:,.0f}/s)", file=sys.stderr)
    finally:
        await store.close()


async def forget_keys(url: str) -> None:
    """Remove the proxy keys an earlier run made, so this run can make its own. On
    PostgreSQL also refresh the planner's statistics, as autovacuum does within a minute of
    a bulk load: a page timed right after the load would measure plans made without them."""
    if backend_of(url) == "postgres":
        import asyncpg  # noqa: PLC0415 - only for a PostgreSQL run

        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DELETE FROM proxy_keys")
            await conn.execute("ANALYZE")
        finally:
            await conn.close()
        return
    with contextlib.closing(sqlite3.connect(url)) as db, db:
        db.execute("DELETE FROM proxy_keys")


async def writes(path: Path, rows: int) -> dict[str, float]:
    prepared = list(batches(0, rows, 256, rows))
    store = SQLiteStore(path)
    await store.open()
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for batch in prepared:
            await store.write_batch(batch)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await store.close()
    # CPU seconds (every thread of the process) tell the cost apart from a busy machine's
    # waits; per_cpu_second is the rate with a core to itself, I/O waits aside.
    return {
        "records": rows,
        "seconds": seconds,
        "per_second": rows / seconds,
        "cpu_seconds": cpu,
        "per_cpu_second": rows / cpu,
    }


async def sign_in(session: aiohttp.ClientSession, base: str, key: str) -> None:
    async with session.get(base + "/ui/signin") as answer:
        html = await answer.text()
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    async with session.post(
        base + "/ui/signin",
        data={"csrf": found.group(1), "token": key, "next": "/ui/log"},
        allow_redirects=False,
    ) as answer:
        assert answer.status == 303, await answer.text()


async def timed(session: aiohttp.ClientSession, url: str, calls: int) -> dict[str, float]:
    samples = []
    for _ in range(calls + 2):
        started = time.perf_counter()
        async with session.get(url, allow_redirects=False) as answer:
            await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{url}: {answer.status}")
        samples.append((time.perf_counter() - started) * 1000)
    samples = sorted(samples[2:])  # the first two warm caches
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
    }


async def pages(url: str, rows: int, calls: int) -> dict[str, Any]:
    if backend_of(url) == "postgres" or not Path(url).exists():
        await build(url, rows)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-upstream")
    store = await open_store(url, StoreConfig())
    await store.close()
    await forget_keys(url)
    store = await open_store(url, StoreConfig())
    keys = {}
    try:
        for name, role in (("bench-admin", "admin"), (CALLERS[3], "member")):
            key, key_id, key_hash = new_key()
            await store.create_key(name, role, key_id, key_hash)
            keys[role] = key
    finally:
        await store.close()
    config = validate(
        {
            "store": {"url": url},
            "auth": {"mode": "keys"},
            "logging": {"access_log": False},
        },
        source="bench",
    )
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    results: dict[str, Any] = {"rows": rows, "backend": backend_of(url)}
    try:
        # unsafe=True: the jar keeps cookies from an IP address (127.0.0.1).
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as admin,
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as member,
        ):
            await sign_in(admin, base, keys["admin"])
            await sign_in(member, base, keys["member"])
            middle = record(rows // 2 + 3, rows).id  # a member-03 row half way down
            one = record(rows - 17, rows).id
            day = time.strftime("%Y-%m-%d", time.gmtime(START + SPAN // 2))
            last = time.strftime("%Y-%m-%d", time.gmtime(START + SPAN - 1))
            first = time.strftime("%Y-%m-%d", time.gmtime(START + SPAN - 30 * 86400))
            plan = [
                ("log, admin", admin, "/ui/log"),
                ("log, member", member, "/ui/log"),
                ("log, member, page half way down", member, f"/ui/log?after={middle}"),
                ("log, admin, model filter", admin, "/ui/log?model=gpt-4o"),
                ("log, admin, metadata filter", admin, "/ui/log?meta=user%3Duser-7"),
                ("log, member, one day", member, f"/ui/log?since={day}&until={day}"),
                ("search, admin, common word", admin, "/ui/log?q=lorem"),
                ("search, member, common word", member, "/ui/log?q=lorem"),
                ("search, admin, rare word", admin, "/ui/log?q=topic537"),
                ("search, admin, word + metadata", admin, "/ui/log?q=refund&meta=env%3Ddev"),
                (  # every match of the word tested against a pair it never meets
                    "search, admin, word + metadata, none match",
                    admin,
                    "/ui/log?q=refund&meta=env%3Dprod",
                ),
                ("search, member, word + model", member, "/ui/log?q=refund&model=gpt-4o"),
                ("completion", admin, f"/ui/c/{one}"),
                ("usage, admin, 30 days", admin, f"/ui/usage?since={first}&until={last}"),
                ("usage, member, 30 days", member, f"/ui/usage?since={first}&until={last}"),
                ("audit", admin, "/ui/audit"),
                ("failed exchanges", admin, "/ui/exchanges"),
                ("keys", admin, "/ui/keys"),
            ]
            for name, session, path in plan:
                results[name] = await timed(session, base + path, calls)
                print(f"  {name:40} {results[name]}", file=sys.stderr)
    finally:
        await runner.cleanup()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.console_bench")
    parser.add_argument("part", choices=("pages", "writes"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--db", default=None, help="pages: a postgresql:// URL (default: a SQLite file in workdir)"
    )
    args = parser.parse_args(argv)
    if args.part == "writes":
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(writes(Path(tmp) / "writes.db", args.rows))
    else:
        workdir = args.workdir or Path(tempfile.gettempdir()) / "console-bench"
        workdir.mkdir(parents=True, exist_ok=True)
        url = args.db or str(workdir / f"console-{args.rows}.db")
        result = asyncio.run(pages(url, args.rows, args.calls))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
