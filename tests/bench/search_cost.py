"""What indexing for search costs a store write, by batch size: ``write_batch`` of the bench's
records with ``store.search`` on and off, in turns, each turn on a fresh SQLite file.

    python -m tests.bench.search_cost                       # batches of 1, 4, 16, 256
    python -m tests.bench.search_cost --batch 2 --records 20000 --rounds 3

The proxy commits whatever its writer found queued, so under a steady load of single
requests a batch holds one to a few completions; FTS5 adds a segment to its index at every
commit and merges segments as they pile up, so the cost per completion depends on the batch.
Prints, per batch size and turn, this process's CPU time per completion (the writer's and
the checkpointer's threads included) and completions per second. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from proxy.store.sqlite import SQLiteStore
from tests.bench.processes import on_uvloop
from tests.bench.records import make_record

WARM = 1_000  # records written before the clock starts (caches, the first segments)


async def turn(path: Path, search: bool, batch: int, records: int) -> tuple[float, float]:
    """(CPU microseconds per completion, completions per second) of one turn."""
    store = SQLiteStore(path, search=search)
    await store.open()
    try:
        made = [make_record(i, b"sc") for i in range(WARM + records)]
        await store.write_batch(made[:WARM])
        cpu, started = time.process_time(), time.perf_counter()
        for first in range(WARM, WARM + records, batch):
            await store.write_batch(made[first : first + batch])
        cpu, seconds = time.process_time() - cpu, time.perf_counter() - started
    finally:
        await store.close()
    return cpu / records * 1e6, records / seconds


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="search-cost-") as scratch:
        for batch in args.batch or [1, 4, 16, 256]:
            runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for round_ in range(args.rounds):
                for search in (True, False):
                    path = Path(scratch) / f"{batch}-{round_}-{int(search)}.db"
                    runs[search].append(await turn(path, search, batch, args.records))
            on = statistics.median(cpu for cpu, _ in runs[True])
            off = statistics.median(cpu for cpu, _ in runs[False])
            rates = {s: statistics.median(rate for _, rate in runs[s]) for s in runs}
            print(
                f"batch {batch:4d}: search on {on:6.1f} us/completion ({rates[True]:6,.0f}/s),"
                f" off {off:6.1f} us ({rates[False]:6,.0f}/s): indexing {on - off:6.1f} us"
                f" per completion; turns on {[round(c) for c, _ in runs[True]]}"
                f" off {[round(c) for c, _ in runs[False]]}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="repeatable")
    parser.add_argument("--records", type=int, default=10_000, help="timed, per turn")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    on_uvloop(main_async(args))


if __name__ == "__main__":
    main()
