"""The store part, in this process through ``SQLiteStore``: write throughput, search on and
off, and retrieve / list latency at two sizes (optionally beside a git revision's store)."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from proxy.models import ListQuery, PageQuery
from proxy.store import CompletionRecord
from proxy.store.sqlite import SQLiteStore
from proxy.writer import Writer
from tests.bench.processes import ROOT, BenchError, on_uvloop
from tests.bench.records import (
    CALLER,
    ENVS,
    USERS,
    batches,
    completion_id,
    env_of,
    make_record,
    record_bytes,
    timed,
)
from tests.bench.settings import Settings


async def bench_write_batch(path: Path, count: int) -> dict[str, Any]:
    """Committed records per second through write_batch, 256 per batch, one writer."""
    store = SQLiteStore(path)
    await store.open()
    try:
        prepared = list(batches(0, count, 256, b"wb"))  # built before the clock starts
        started = time.perf_counter()
        written = 0
        for batch in prepared:
            written += await store.write_batch(batch)
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    if written != count:
        raise BenchError(f"write_batch stored {written} of {count}")
    return {"records": written, "seconds": seconds, "per_second": written / seconds}


async def commit_all(
    store: SQLiteStore, records: list[CompletionRecord], concurrency: int = 512
) -> dict[str, Any]:
    """Commit ``records`` through a Writer, ``concurrency`` commit() calls at once: records
    per second, and this process's CPU time per record (the writer's thread, the
    checkpointer's and the event loop's)."""
    writer = Writer(store, batch_size=256)
    writer.start()
    try:
        queue = iter(records)

        async def client() -> None:
            for record in queue:  # one shared iterator: each record is committed once
                await writer.commit(record)

        cpu = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        stats = writer.stats
        committed, batches_ = stats.committed, stats.batches
    finally:
        await writer.close()
    if committed != len(records):
        raise BenchError(f"Writer committed {committed} of {len(records)}")
    return {
        "records": committed,
        "seconds": seconds,
        "per_second": committed / seconds,
        "cpu_us_per_record": cpu / committed * 1e6,
        "batches": batches_,
        "mean_batch": committed / batches_,
        "concurrency": concurrency,
    }


async def bench_writer(path: Path, count: int, concurrency: int = 512) -> dict[str, Any]:
    """Committed records per second through Writer, ``concurrency`` commit() calls at once."""
    store = SQLiteStore(path)
    await store.open()
    try:
        return await commit_all(store, [make_record(i, b"wr") for i in range(count)], concurrency)
    finally:
        await store.close()


async def bench_search_writes(
    path: Path, count: int, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """``Writer.commit`` into the store at its built size with search on and off
    (``store.search``), in turns on the same file, ``count`` records a turn. What a turn
    with search off wrote is indexed when the next turn opens the file with search on: that
    open is timed too (``backlog``), and a last open indexes the last turn's."""
    result: dict[str, Any] = {"on": [], "off": [], "backlog": [], "records": count}
    salt = 0
    for round_ in range(1, rounds + 1):
        for search in (True, False):
            store = SQLiteStore(path, search=search)
            opened, cpu = time.perf_counter(), time.process_time()
            await store.open()
            if search and round_ > 1:
                result["backlog"].append(_backlog(opened, cpu, count))
            salt += 1
            records = [make_record(i, b"sw%d" % salt) for i in range(count)]
            try:
                run = await commit_all(store, records)
            finally:
                await store.close()
            result["on" if search else "off"].append(run)
            log(
                f"    round {round_} search {'on ' if search else 'off'}:"
                f" {run['per_second']:,.0f} completions/s, {run['cpu_us_per_record']:.0f} us CPU"
                f" each (mean batch {run['mean_batch']:.0f})"
            )
    store = SQLiteStore(path)
    opened, cpu = time.perf_counter(), time.process_time()
    await store.open()
    await store.close()
    result["backlog"].append(_backlog(opened, cpu, count))
    for turn in result["backlog"]:
        log(f"    backlog of {count:,} indexed at open: {turn['per_second']:,.0f} rows/s")
    return result


def _backlog(opened: float, cpu: float, rows: int) -> dict[str, float]:
    seconds = time.perf_counter() - opened
    return {
        "seconds": seconds,
        "per_second": rows / seconds,
        "cpu_us_per_record": (time.process_time() - cpu) / rows * 1e6,
    }


async def bench_reads(
    store: Any, size: int, calls: int, *, baseline: Any = None
) -> dict[str, dict[str, float]]:
    """Retrieve and list latencies; with ``baseline`` (the store module of another
    revision, open on the same file), the multi-pair lists are timed on it too, right
    after the same case on ``store``."""
    rng = random.Random(size)
    picks = [rng.randrange(size) for _ in range(calls + 100)]

    async def retrieve(n: int) -> None:
        if await store.get(CALLER, completion_id(picks[n])) is None:
            raise BenchError("retrieve found nothing")

    def listing(
        make: Callable[[int], ListQuery], *, empty: bool = False, on: Any = store
    ) -> Callable[[int], Awaitable[None]]:
        async def call(n: int) -> None:
            page = await on.list_completions(CALLER, make(picks[n]))
            if bool(page.items) == empty:
                raise BenchError("list found nothing" if not empty else "list found something")

        return call

    def user(i: int) -> tuple[str, str]:
        return ("user", f"user-{i % USERS}")

    def metadata(i: int) -> ListQuery:
        return ListQuery(metadata=(user(i),))

    def metadata_two(i: int) -> ListQuery:
        return ListQuery(metadata=(user(i), ("env", env_of(i % USERS))))

    def other_env(i: int) -> tuple[str, str]:
        return ("env", ENVS[(i % USERS + 1 + (i // USERS) % 2) % 3])

    def disjoint(i: int) -> ListQuery:  # the user's ~size/1000 rows, a third of all: none shared
        return ListQuery(metadata=(user(i), other_env(i)))

    def disjoint_common_first(i: int) -> ListQuery:
        return ListQuery(metadata=(other_env(i), user(i)))

    def after(i: int) -> ListQuery:
        return ListQuery(page=PageQuery(after=completion_id(min(i, size - 100))))

    def metadata_after(i: int) -> ListQuery:
        # halfway through that user's completions, so the page is never empty
        j = i % USERS + USERS * ((i // USERS) // 2)
        return ListQuery(page=PageQuery(after=completion_id(j)), metadata=(user(j),))

    def newest(_: int) -> ListQuery:
        return ListQuery(page=PageQuery(order="desc"))

    result = {
        "retrieve": await timed(calls, retrieve),
        "list_metadata": await timed(calls, listing(metadata)),
        "list_after": await timed(calls, listing(after)),
        "list_metadata_two_pairs": await timed(calls, listing(metadata_two)),
        "list_metadata_after": await timed(calls, listing(metadata_after)),
        "list_newest": await timed(calls, listing(newest)),
    }
    several = {
        "list_metadata_two_pairs": (metadata_two, False),
        "list_metadata_disjoint": (disjoint, True),
        "list_metadata_disjoint_common_first": (disjoint_common_first, True),
    }
    for name, (make, empty) in several.items():
        if name not in result:
            result[name] = await timed(calls, listing(make, empty=empty))
        if baseline is not None:
            result[f"{name} (baseline)"] = await timed(
                calls, listing(make, empty=empty, on=baseline), budget=BASELINE_SECONDS
            )
    return result


BASELINE_SECONDS = 20.0  # time given to each case on the baseline store (it may be slow)


def baseline_store(revision: str, path: Path) -> Any:
    """``SQLiteStore`` as it is at ``revision``, for the same database file: its
    ``proxy/store/sqlite/store.py`` loaded beside this one, with the revision's own
    ``queries.py`` and ``writes.py`` where it has them (the rest of the package is this
    one's). The file is migrated by this code, so the revision must read today's schema."""
    package = sys.modules["proxy.store.sqlite"]
    saved = {name: getattr(package, name, None) for name in BASELINE_MODULES}
    try:
        module = None
        for name in BASELINE_MODULES:
            shown = subprocess.run(
                ["git", "show", f"{revision}:proxy/store/sqlite/{name}.py"],
                cwd=ROOT,
                check=False,
                capture_output=True,
            )
            if shown.returncode != 0:
                if name == "store":
                    raise BenchError(f"no proxy/store/sqlite/store.py at {revision}")
                continue  # before the store was split into these modules
            module_path = path.parent / f"baseline_{name}_{revision}.py"
            module_path.write_bytes(shown.stdout)
            loaded_as = f"baseline_{name}_{revision}"
            spec = importlib.util.spec_from_file_location(loaded_as, module_path)
            if spec is None or spec.loader is None:
                raise BenchError(f"cannot load {name}.py at {revision}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            # The next module's ``from proxy.store.sqlite import ...`` gets this one.
            setattr(package, name, module)
            sys.modules[f"proxy.store.sqlite.{name}"] = module
    finally:
        for name, current in saved.items():
            if current is not None:
                setattr(package, name, current)
                sys.modules[f"proxy.store.sqlite.{name}"] = current
    assert module is not None
    return module.SQLiteStore(path)


BASELINE_MODULES = ("queries", "writes", "store")  # in the order they import each other


async def build(store: SQLiteStore, start: int, stop: int) -> float:
    started = time.perf_counter()
    for batch in batches(start, stop, 10_000):
        await store.write_batch(batch)
    return time.perf_counter() - started


async def store_phase(
    settings: Settings, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    result: dict[str, Any] = {"record_bytes": record_bytes()}
    result["write_batch"] = await bench_write_batch(workdir / "write.db", settings.write_records)
    log(f"  write_batch: {result['write_batch']['per_second']:,.0f} completions/s")
    result["writer"] = await bench_writer(workdir / "writer.db", settings.write_records)
    log(
        f"  Writer: {result['writer']['per_second']:,.0f} completions/s"
        f" (mean batch {result['writer']['mean_batch']:.0f})"
    )
    path = workdir / "reads.db"
    # Built without fsync (only the build is faster; reads are the same): the write path
    # is measured above with the proxy's default, synchronous=NORMAL.
    store = SQLiteStore(path, synchronous="off")
    await store.open()
    baseline = None
    if settings.baseline is not None:
        baseline = baseline_store(settings.baseline, path)
        await baseline.open()
    try:
        built = 0
        for size in settings.store_sizes:
            seconds = await build(store, built, size)
            log(f"  built {size:,} completions (+{size - built:,} in {seconds:.1f} s)")
            reads = await bench_reads(store, size, settings.read_calls, baseline=baseline)
            result[str(size)] = {
                "build_seconds": seconds,
                "build_per_second": (size - built) / seconds,
                "db_bytes": sum(p.stat().st_size for p in workdir.glob("reads.db*")),
                "reads_ms": reads,
            }
            built = size
            for name, figures in reads.items():
                log(f"    {name:<24} p50 {figures['p50']:7.3f} ms  p99 {figures['p99']:7.3f} ms")
    finally:
        if baseline is not None:
            await baseline.close()
        await store.close()
    size = settings.store_sizes[-1]
    log(f"  Writer.commit at {size:,} stored, search on and off in turns:")
    result["search_writes"] = await bench_search_writes(
        path, settings.write_records // 5, max(settings.rounds, 2), log
    )
    return result


def run_store_phase(settings: Settings, workdir: Path, log: Callable[[str], None]) -> Any:
    return on_uvloop(store_phase(settings, workdir, log))
