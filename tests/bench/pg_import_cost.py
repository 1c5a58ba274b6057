"""What each part of the PostgreSQL import costs the server, per row.

    python -m tests.bench.pg_import_cost                     # every variant, 3 rounds
    python -m tests.bench.pg_import_cost --rows 40000 --rounds 3 base no_gin no_meta_rows

The bench's records (``tests.bench.backends.record``) are turned into the import's columns
once; then, for each variant in turn (rounds interleave the variants), a fresh database
(``bench_<random>``, dropped after) gets the schema, the variant takes one piece away (an
index, the metadata rows, the usage trigger, compression, the duplicate check), and the
columns are inserted by ``queries.IMPORT_BATCH`` in one transaction, chunk by chunk, as
``import_records`` does. The figure is the server backend's CPU (utime + stime of its
``/proc/<pid>/stat``) per row, which a shared machine disturbs less than the wall clock, and
the WAL bytes per row; the table gives each variant's median and its saving against ``base``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from proxy.store.postgres import queries, search
from proxy.store.postgres.migrations import migrate
from proxy.store.postgres.store import IMPORT_WORK_MEM
from proxy.store.postgres.writes import columns
from tests.bench.backends import batches

_NO_PAIRS = queries.IMPORT_BATCH.split("), pairs AS")[0] + ")\nSELECT count(*) FROM new"
_CONFLICT = "ON CONFLICT (id, caller) DO NOTHING"
_INDEXES = (
    "completions_search",
    "completion_metadata_pairs",
    "completions_caller_order",
    "completions_caller_model_order",
    "completions_request",
    "completions_unindexed",
)
_STORED = (
    "ALTER TABLE completions ALTER COLUMN completion SET STORAGE EXTERNAL,"
    " ALTER COLUMN request SET STORAGE EXTERNAL, ALTER COLUMN search SET STORAGE EXTERNAL"
)
# Each variant: statements run on the fresh schema, and the import statement it uses.
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "base": ((), queries.IMPORT_BATCH),
    "no_gin": (("DROP INDEX completions_search",), queries.IMPORT_BATCH),
    "no_meta_rows": ((), _NO_PAIRS),
    "no_pairs_idx": (("DROP INDEX completion_metadata_pairs",), queries.IMPORT_BATCH),
    "no_meta_pk": (
        ("ALTER TABLE completion_metadata DROP CONSTRAINT completion_metadata_pkey",),
        queries.IMPORT_BATCH,
    ),
    "no_caller_order": (("DROP INDEX completions_caller_order",), queries.IMPORT_BATCH),
    "no_model_order": (("DROP INDEX completions_caller_model_order",), queries.IMPORT_BATCH),
    "no_request_idx": (("DROP INDEX completions_request",), queries.IMPORT_BATCH),
    "no_unindexed": (("DROP INDEX completions_unindexed",), queries.IMPORT_BATCH),
    "no_trigger": (("DROP TRIGGER usage_by_day_insert ON completions",), queries.IMPORT_BATCH),
    "no_compress": ((_STORED,), queries.IMPORT_BATCH),
    "no_conflict": (
        ("DROP INDEX completions_id_caller",),
        queries.IMPORT_BATCH.replace(_CONFLICT, ""),
    ),
    "bare": (
        (
            *(f"DROP INDEX {name}" for name in _INDEXES),
            "DROP INDEX completions_id_caller",
            "ALTER TABLE completion_metadata DROP CONSTRAINT completion_metadata_pkey",
            "DROP TRIGGER usage_by_day_insert ON completions",
        ),
        _NO_PAIRS.replace(_CONFLICT, ""),
    ),
}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(pg: str, variant: str, chunks: Sequence[list[list[Any]]]) -> tuple[float, float]:
    """Server CPU seconds and WAL bytes of one import of ``chunks`` under ``variant``."""
    setup, statement = VARIANTS[variant]
    database = f"bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(f"{pg}/postgres")
    await admin.execute(f"CREATE DATABASE {database}")
    try:
        conn = await asyncpg.connect(f"{pg}/{database}", server_settings={"jit": "off"})
        try:
            await migrate(conn)
            await conn.set_type_codec("tsvector", **search.TSVECTOR_CODEC)
            for sql in setup:
                await conn.execute(sql)
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            wal = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
            started = _cpu_seconds(pid)
            async with conn.transaction():
                await conn.execute(f"SET LOCAL work_mem = '{IMPORT_WORK_MEM}'")
                for columns in chunks:
                    await conn.fetchval(statement, *columns)
            used = _cpu_seconds(pid) - started
            written = await conn.fetchval(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", wal
            )
            return used, float(written)
        finally:
            await conn.close()
    finally:
        await admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
        await admin.close()


async def main_async(args: argparse.Namespace) -> None:
    variants = args.variants or list(VARIANTS)
    now = time.time()
    chunks = [columns(batch, now) for batch in batches(0, args.rows, args.chunk, b"im")]
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wal: dict[str, float] = {}
    for round_ in range(args.rounds):
        for name in variants:
            used, written = await measure(args.pg, name, chunks)
            cpu[name].append(used / args.rows * 1e6)
            wal[name] = written / args.rows
            print(f"round {round_ + 1} {name}: {cpu[name][-1]:.1f} us/row", flush=True)
    base = statistics.median(cpu["base"]) if "base" in cpu else None
    print("| variant | server CPU, us/row (median) | saved against base | WAL, bytes/row |")
    print("|---|---|---|---|")
    for name in variants:
        median = statistics.median(cpu[name])
        saved = f"{base - median:+.1f}" if base is not None else ""
        print(f"| {name} | {median:.1f} | {saved} | {wal[name]:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=", ".join(VARIANTS))
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--chunk", type=int, default=2_000, help="rows per statement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
