"""The store bench on each backend, in one run: SQLite (the baseline) and PostgreSQL.

    python -m tests.bench.backends                       # both backends, 1,000,000 stored
    python -m tests.bench.backends --rows 100000 --backend postgres
    python -m tests.bench.backends --pg postgresql://postgres@127.0.0.1:5432

For each backend, in this process through ``open_store`` (the proxy's own way in):

- write: ``write_batch`` (256 per batch, one writer) and ``Writer.commit`` (512 concurrent
  callers), ~3 KB completions (the records of ``tests.bench.run``);
- build: the store grown to ``--rows`` completions of one caller through ``write_batch``;
- reads at that size: retrieve and list pages (plain, newest first, after an id, model, one
  metadata pair, two common pairs, two pairs that each match thousands of rows but never the
  same one, a rare pair with a common one), p50 / p99 over ``--calls`` calls;
- import: ``import_records`` of ``--import-rows`` completions into an empty store (records
  built in memory, on the store's side);
- file: what ``completions-proxy import`` does, on the same number of rows: a JSONL export
  file (written before the clock starts) read by ``proxy.recordings.import_from``, whose
  worker processes parse it while the store inserts;
- ``--phase`` runs only some of these (``write``, ``writer``, ``reads``, ``import``, ``file``), and
  ``--build import`` fills the reads' store through ``import_records`` (the quick way to
  1,000,000 rows);
- with ``--http ROUNDS``: the proxy as a process (``serve``) on each backend in front of the
  bench's mock upstream, ``wrk`` at 32 connections, plain and streamed, ``"store": true``,
  10 s per run, the backends interleaved round by round (medians reported).

PostgreSQL runs in a database made for the run (``bench_<random>``) and dropped after.
Results go to ``--out`` as JSON and are printed as one table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from proxy.config import StoreConfig
from proxy.models import ListQuery, PageQuery
from proxy.recordings import export_line, import_from
from proxy.store import CompletionRecord, Store, open_store
from proxy.writer import Writer
from tests.bench.processes import (
    PYTHON,
    BenchError,
    Server,
    mock_upstream,
    on_uvloop,
    snapshot_proxy,
)
from tests.bench.records import CALLER, completion_id, make_record, record_bytes, timed
from tests.bench.wrk import CONNECTIONS, run_wrk

PHASES = ("write", "writer", "reads", "import", "file")
PAIRS = 400  # "a" and "b" metadata values: each matches rows / PAIRS rows, never the same one


def record(i: int, salt: bytes = b"db") -> CompletionRecord:
    """The bench's record, plus two keys whose pairs ``a<k>`` and ``b<k+1>`` never meet."""
    base = make_record(i, salt)
    metadata = {**base.metadata, "a": f"a{i % PAIRS}", "b": f"b{i % PAIRS}"}
    return replace(base, metadata=metadata, model="gpt-4o-mini" if i % 10 else "gpt-4o")


def batches(start: int, stop: int, size: int, salt: bytes = b"db") -> Iterator[list[Any]]:
    for first in range(start, stop, size):
        yield [record(i, salt) for i in range(first, min(first + size, stop))]


@contextlib.asynccontextmanager
async def store_at(backend: str, workdir: Path, pg: str, name: str) -> AsyncIterator[Store]:
    """A fresh, open store of ``backend``; removed afterwards."""
    if backend == "sqlite":
        url = str(workdir / f"{name}.db")
        store = await open_store(url, StoreConfig(url=url))
        try:
            yield store
        finally:
            await store.close()
        return
    database = f"bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(f"{pg}/postgres")
    await admin.execute(f"CREATE DATABASE {database}")
    url = f"{pg}/{database}"
    try:
        store = await open_store(url, StoreConfig(url=url))
        try:
            yield store
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
        await admin.close()


async def bench_write_batch(store: Store, count: int) -> float:
    prepared = list(batches(0, count, 256, b"wb"))
    started = time.perf_counter()
    written = 0
    for batch in prepared:
        written += await store.write_batch(batch)
    seconds = time.perf_counter() - started
    if written != count:
        raise BenchError(f"write_batch stored {written} of {count}")
    return written / seconds


async def bench_writer(store: Store, count: int, concurrency: int = 512) -> float:
    writer = Writer(store, batch_size=256)
    writer.start()
    try:
        queue = iter([record(i, b"wr") for i in range(count)])

        async def client() -> None:
            for item in queue:
                await writer.commit(item)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    finally:
        await writer.close()
    if writer.stats.committed != count:
        raise BenchError(f"Writer committed {writer.stats.committed} of {count}")
    return count / seconds


async def bench_reads(store: Store, size: int, calls: int) -> dict[str, dict[str, float]]:
    rng = random.Random(size)
    picks = [rng.randrange(size) for _ in range(calls + 100)]

    async def retrieve(n: int) -> None:
        if await store.get(CALLER, completion_id(picks[n])) is None:
            raise BenchError("retrieve found nothing")

    def listing(
        make: Callable[[int], ListQuery], *, empty: bool = False
    ) -> Callable[[int], Awaitable[None]]:
        async def call(n: int) -> None:
            page = await store.list_completions(CALLER, make(picks[n]))
            if bool(page.items) == empty:
                raise BenchError(f"list found {len(page.items)} items")

        return call

    def pair(key: str, i: int) -> tuple[str, str]:
        return (key, f"{key}{i % PAIRS}")

    cases: dict[str, Callable[[int], Awaitable[None]]] = {
        "retrieve": retrieve,
        "list": listing(lambda i: ListQuery()),
        "list_newest": listing(lambda i: ListQuery(page=PageQuery(order="desc"))),
        "list_after": listing(
            lambda i: ListQuery(page=PageQuery(after=completion_id(min(i, size - 100))))
        ),
        "list_model": listing(lambda i: ListQuery(model="gpt-4o")),
        "list_metadata_one": listing(lambda i: ListQuery(metadata=(("user", f"user-{i % 1000}"),))),
        "list_metadata_two_common": listing(
            lambda i: ListQuery(metadata=(("env", "prod"), ("user", f"user-{3 * (i % 333)}")))
        ),
        "list_metadata_two_disjoint": listing(
            lambda i: ListQuery(metadata=(pair("a", i), pair("b", i + 1))), empty=True
        ),
        "list_metadata_rare_and_common": listing(
            lambda i: ListQuery(metadata=(("env", "prod"), ("session", f"s-{3 * (i // 150)}")))
        ),
        "list_metadata_two_desc": listing(
            lambda i: ListQuery(
                page=PageQuery(order="desc"), metadata=(pair("a", i), ("env", "prod"))
            )
        ),
    }
    return {name: await timed(calls, call) for name, call in cases.items()}


async def bench_import(store: Store, count: int) -> float:
    def produce() -> Iterator[list[CompletionRecord]]:
        yield from batches(0, count, 5_000, b"im")

    started = time.perf_counter()
    inserted = await store.import_records(produce(), accept=lambda: True)
    seconds = time.perf_counter() - started
    if inserted != count:
        raise BenchError(f"import inserted {inserted} of {count}")
    return count / seconds


def write_export(path: Path, count: int) -> None:
    """``count`` of the bench's records as an export file, as ``completions-proxy export``
    writes it; on disk before this returns, so the kernel's write-back of a file of several
    GB does not run during the timed import that follows."""
    with path.open("wb") as out:
        for batch in batches(0, count, 5_000, b"fi"):
            out.write(b"\n".join(map(export_line, batch)) + b"\n")
        out.flush()
        os.fsync(out.fileno())


async def bench_import_file(store: Store, path: Path, count: int) -> float:
    started = time.perf_counter()
    with path.open("rb") as source:
        report = await import_from(store, source, None)
    seconds = time.perf_counter() - started
    if report.inserted != count:
        raise BenchError(f"import of the file inserted {report.inserted} of {count}")
    return count / seconds


async def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    def log(text: str) -> None:
        print(f"[{backend}] {text}", flush=True)

    result: dict[str, Any] = {}
    phases = set(args.phase or PHASES)
    if "write" in phases:
        async with store_at(backend, workdir, args.pg, "write") as store:
            result["write_batch_per_s"] = await bench_write_batch(store, args.write_records)
            log(f"write_batch {result['write_batch_per_s']:,.0f} completions/s")
    if "writer" in phases:
        async with store_at(backend, workdir, args.pg, "writer") as store:
            result["writer_per_s"] = await bench_writer(store, args.write_records)
            log(f"Writer {result['writer_per_s']:,.0f} completions/s")
    if "reads" in phases:
        async with store_at(backend, workdir, args.pg, "reads") as store:
            started = time.perf_counter()
            if args.build == "import":
                await store.import_records(batches(0, args.rows, 5_000), accept=lambda: True)
            else:
                for batch in batches(0, args.rows, 10_000):
                    await store.write_batch(batch)
            result["build_per_s"] = args.rows / (time.perf_counter() - started)
            log(f"built {args.rows:,} at {result['build_per_s']:,.0f} completions/s")
            result["reads_ms"] = await bench_reads(store, args.rows, args.calls)
            for name, figures in result["reads_ms"].items():
                log(f"  {name:<30} p50 {figures['p50']:7.3f} ms  p99 {figures['p99']:7.3f} ms")
    if args.import_rows and "import" in phases:
        async with store_at(backend, workdir, args.pg, "import") as store:
            result["import_per_s"] = await bench_import(store, args.import_rows)
            log(f"import {args.import_rows:,} at {result['import_per_s']:,.0f} rows/s")
    if args.import_rows and "file" in phases:
        path = workdir / "export.jsonl"
        if not path.exists():
            await asyncio.to_thread(write_export, path, args.import_rows)
        # What the phases before wrote (the other backend's files of several GB) goes to
        # disk now, not while this import is timed.
        await asyncio.to_thread(os.sync)
        async with store_at(backend, workdir, args.pg, "file") as store:
            result["import_file_per_s"] = await bench_import_file(store, path, args.import_rows)
            rate = result["import_file_per_s"]
            log(f"import of a file of {args.import_rows:,} at {rate:,.0f} rows/s")
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    rows = [("figure", *names)]
    first = results[names[0]]
    for key in (
        "write_batch_per_s",
        "writer_per_s",
        "build_per_s",
        "import_per_s",
        "import_file_per_s",
    ):
        if key in first:
            rows.append((key, *(f"{results[n].get(key, 0):,.0f}" for n in names)))
    for name in first.get("reads_ms", {}):
        rows.append(
            (
                f"{name} p50/p99 ms",
                *(
                    f"{results[n]['reads_ms'][name]['p50']:.3f} / "
                    f"{results[n]['reads_ms'][name]['p99']:.3f}"
                    for n in names
                ),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


async def http_phase(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    """Proxy throughput (req/s) per backend and kind; medians over interleaved rounds."""
    snapshot_proxy(workdir)
    backends = args.backend or ["sqlite", "postgres"]
    runs: dict[str, dict[str, list[float]]] = {b: {"plain": [], "stream": []} for b in backends}
    async with contextlib.AsyncExitStack() as stack:
        upstream = mock_upstream(workdir, None)
        stack.callback(upstream.stop)
        upstream.start()
        servers = {}
        for backend in backends:
            if backend == "sqlite":
                url = str(workdir / "http.db")
            else:
                store = await stack.enter_async_context(
                    store_at("postgres", workdir, args.pg, "http")
                )
                url = store.url  # type: ignore[attr-defined]
            argv = [PYTHON, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "{port}"]
            argv += ["--upstream", upstream.url + "/v1", "--db", url]
            server = Server(f"proxy-{backend}", argv, workdir / f"http-{backend}.log", None)
            server.cwd = workdir / "src"
            stack.callback(server.stop)
            servers[backend] = server.start()
        for server in servers.values():  # warm up
            for kind in ("plain", "stream"):
                await asyncio.to_thread(
                    run_wrk, server.url, kind, connections=CONNECTIONS, duration=2
                )
        for round_ in range(args.http):
            for kind in ("plain", "stream"):
                for backend, server in servers.items():
                    run = await asyncio.to_thread(
                        run_wrk, server.url, kind, connections=CONNECTIONS, duration=10
                    )
                    runs[backend][kind].append(run.rps)
                    print(f"[http] round {round_ + 1} {backend:<8} {kind:<6} {run.rps:8.0f} req/s")
    return {
        backend: {kind: sorted(values)[len(values) // 2] for kind, values in kinds.items()}
        for backend, kinds in runs.items()
    }


async def main_async(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, Any]] = {}
    http: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as scratch:
        if args.http:
            http = await http_phase(args, Path(scratch))
        if args.rows:
            for backend in args.backend or ["sqlite", "postgres"]:
                results[backend] = await run_backend(backend, args, Path(scratch))
    if results:
        print(table(results))
    for backend, kinds in http.items():
        print(f"proxy {backend}: plain {kinds['plain']:,.0f} req/s, stream {kinds['stream']:,.0f}")
    meta = {
        "rows": args.rows,
        "calls": args.calls,
        "record_bytes": record_bytes(),
        "machine": platform.platform(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_bytes(
        orjson.dumps(
            {"meta": meta, "results": results, "http_rps": http}, option=orjson.OPT_INDENT_2
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=("sqlite", "postgres"))
    parser.add_argument("--rows", type=int, default=1_000_000, help="0: no store phase")
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--write-records", type=int, default=50_000)
    parser.add_argument("--import-rows", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument(
        "--phase", action="append", choices=PHASES, help="only these store phases (default: all)"
    )
    parser.add_argument(
        "--build",
        choices=("write", "import"),
        default="write",
        help="how the reads' store is filled: write_batch (10,000 a batch) or import_records",
    )
    parser.add_argument("--http", type=int, default=0, metavar="ROUNDS", help="proxy req/s")
    parser.add_argument("--out", default="tests/bench/backends.json")
    args = parser.parse_args()
    on_uvloop(main_async(args))


if __name__ == "__main__":
    main()
