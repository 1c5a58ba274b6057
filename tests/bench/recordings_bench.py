"""Export and import throughput and memory at scale (issue: portable recordings).

    python -m tests.bench.recordings_bench [--rows 1000000] [--dir /tmp/recordings-bench]

Builds a store of ~3 KB completions through SQLiteStore.write_batch, then times the real
commands as subprocesses: ``completions-proxy export`` to a file, and ``completions-proxy
import`` of that file into a fresh database. Peak RSS of each command comes from the
kernel (``ru_maxrss`` of that child alone, from ``wait4``), so constant memory shows as a
flat figure whatever ``--rows`` is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from proxy.identity import request_key
from proxy.store import CompletionRecord
from proxy.store.sqlite import SQLiteStore


def _record(n: int) -> CompletionRecord:
    request = {
        "model": "gpt-4o-mini",
        "store": True,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. " * 10},
            {"role": "user", "content": f"Question {n}: " + "tell me about the weather. " * 30},
        ],
    }
    completion = {
        "id": f"chatcmpl-bench{n:09d}",
        "object": "chat.completion",
        "created": 1_700_000_000 + n // 100,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "It is sunny. " * 80, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 300, "completion_tokens": 240, "total_tokens": 540},
    }
    return CompletionRecord(
        id=completion["id"],
        caller=f"caller_{n % 7:032d}",
        created=completion["created"],
        model="gpt-4o-mini",
        metadata={"suite": f"s{n % 10}", "run": "bench"},
        completion=orjson.dumps(completion),
        request=orjson.dumps(request),
        request_id=f"req_{n}",
        stream=bool(n % 2),
        outcome="complete",
        request_key=request_key(request),
    )


async def build(path: Path, rows: int) -> float:
    store = SQLiteStore(path)
    await store.open()
    started = time.perf_counter()
    batch = 5000
    for start in range(0, rows, batch):
        await store.write_batch([_record(n) for n in range(start, min(rows, start + batch))])
    await store.close()
    return time.perf_counter() - started


def timed(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in MB (of this command alone, from wait4), and its stderr."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args], stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - started
        err.seek(0)
        said = err.read().decode().strip()
    if child.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({child.returncode}): {said}")
    return elapsed, usage.ru_maxrss // 1024, said


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", default="/tmp/recordings-bench")
    parser.add_argument("--build-only", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:  # the child that builds the source store (see below)
        print(asyncio.run(build(Path(args.build_only), args.rows)))
        return
    where = Path(args.dir)
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    source, target, dump = where / "source.db", where / "target.db", where / "export.jsonl"

    # Built in a child process: a child forked from a process that holds a big store's worth
    # of memory would count that memory in its own peak (ru_maxrss) until it execs.
    build_s = float(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.bench.recordings_bench",
                "--rows",
                str(args.rows),
                "--build-only",
                str(source),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    export_s, export_mb, _ = timed(["export", "--db", str(source), "-o", str(dump)])
    import_s, import_mb, said = timed(["import", str(dump), "--db", str(target)])
    result = {
        "rows": args.rows,
        "row_bytes": os.path.getsize(dump) // args.rows,
        "build_rows_per_s": round(args.rows / build_s),
        "export_rows_per_s": round(args.rows / export_s),
        "export_peak_rss_mb": export_mb,
        "import_rows_per_s": round(args.rows / import_s),
        "import_peak_rss_mb": import_mb,
        "import_said": said,
    }
    print(json.dumps(result, indent=2))
    shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
