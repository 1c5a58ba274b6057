"""The benchmark: direct vs floor vs proxy over loopback, and the store at 100k / 1M rows.

    python -m tests.bench.run [--quick] [--out tests/bench/results.json]

What runs, in order (one run, one table, one JSON file):

1. HTTP, with ``wrk`` (one thread) as the client, for four subjects:
   - direct: the mock upstream (``mock_upstream.py``) called directly;
   - floor: ``floor.py``, a bare aiohttp passthrough, in front of the mock;
   - relay: the proxy below, sent ``"store": false``: forwarded, neither captured nor
     stored, which shows what capture and commit add to a request;
   - proxy: ``python -m proxy serve`` in front of the mock, fresh database;
   every request is ``POST /v1/chat/completions`` with ``"store": true`` (``plain.lua``,
   ``stream.lua``: 50-chunk SSE), except relay's. Throughput at 32 connections for a fixed
   time, then p50/p99 latency at 1 connection; three rounds, subjects interleaved, medians
   reported.
   The proxy runs from a copy of ``proxy/`` taken at the start, so one run measures one
   version of the code even while it is being edited.
2. Peak RSS: a fresh proxy and database, 100,000 requests (half plain, half streamed), then
   ``VmHWM`` from ``/proc/PID/status``.
3. The store, in this process through ``SQLiteStore``: write throughput (``write_batch`` in
   batches of 256, and through ``Writer`` under many concurrent ``commit()`` calls), then a
   database built to 100,000 and to 1,000,000 completions (~3 KB each, one caller: every
   list reads that caller's whole range), and retrieve / list latency on each.

CPU placement (when ``taskset`` exists; ``--no-pin`` turns it off): the subject under test
always has CPU 1 to itself; ``wrk`` runs on CPU 0, and so does the mock upstream when it
sits behind the floor or the proxy. For direct, the mock is the subject and runs on CPU 1.
Each throughput row notes the CPU use of the subject and of the upstream, so a run where
the upstream (not the subject) saturated is visible.

``--quick`` uses one round of 3 s runs, 10,000 requests for RSS and 10k / 100k stored
completions.
Exit status: 0 when the benchmark ran (``--check``: 3 when a target fails), 1 when it
could not run, 2 when ``wrk`` is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from tests.bench.http_phase import SUBJECTS, Subject, http_phase, rss_phase
from tests.bench.processes import (
    HERE,
    BenchError,
    Server,
    snapshot_baseline,
    snapshot_proxy,
    source_digest,
)
from tests.bench.report import Figure, http_figures, render, rss_figure, store_figures
from tests.bench.settings import Settings
from tests.bench.store_phase import run_store_phase


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="short runs, smaller databases")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="JSON results file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--workdir", type=Path, help="where databases and logs go (kept)")
    parser.add_argument("--check", action="store_true", help="exit 3 when a target fails")
    parser.add_argument(
        "--only",
        choices=("http", "rss", "store"),
        action="append",
        help="run only these parts (repeatable); the table then lacks the others",
    )
    parser.add_argument("--rounds", type=int, help="HTTP rounds (default 3; --quick 1)")
    parser.add_argument("--seconds", type=int, help="seconds per wrk run (default 10; quick 3)")
    parser.add_argument(
        "--subjects",
        type=lambda text: tuple(text.split(",")),
        default=SUBJECTS,
        help=f"HTTP subjects, comma-separated (default {','.join(SUBJECTS)})",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="compare with git revision REV: HTTP measures relay@base and proxy@base (proxy/"
        " as of REV) in the same interleaved rounds; the store part times the multi-pair"
        " lists with REV's SQLite store on the same database, right after each case",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also install and measure LiteLLM's proxy and Portkey's gateway (store: false;"
        " needs pip and npm to reach their registries; not run in CI)",
    )
    parser.add_argument(
        "--peers-dir", type=Path, help="where --peers installs them (kept; default: a temp dir)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if shutil.which("wrk") is None:
        sys.stderr.write(
            "wrk is not installed; install it with `apt-get install -y wrk`"
            " (or `brew install wrk`), then run again.\n"
        )
        return 2
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    settings = Settings.of(args.quick, pin, args.baseline)
    if args.rounds is not None:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    if args.seconds is not None:
        settings = dataclasses.replace(
            settings, duration=args.seconds, latency_duration=args.seconds
        )
    unknown = set(args.subjects) - set(SUBJECTS)
    if unknown:
        sys.stderr.write(f"unknown subjects: {', '.join(sorted(unknown))}\n")
        return 2
    parts = set(args.only or ("http", "rss", "store"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="completions-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    digest_at_start = snapshot_proxy(workdir)
    baseline_digest = snapshot_baseline(workdir, args.baseline) if args.baseline else None

    def log(line: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - started:7.1f}s] {line}\n")
        sys.stderr.flush()

    log(
        f"{'quick' if settings.quick else 'full'} run, workdir {workdir},"
        f" pinning {'subject on CPU 1, wrk + upstream on CPU 0' if pin else 'off'}"
    )
    out: dict[str, Any] = {"settings": settings.__dict__}
    figures: list[Figure] = []
    try:
        if "http" in parts:
            log("HTTP: " + ", ".join(args.subjects) + (", baseline" if args.baseline else ""))
            peers = None
            if args.peers:
                from tests.bench.peers import peer_subjects  # noqa: PLC0415 - only with --peers

                peers_dir = args.peers_dir or workdir / "peers"
                peers_dir.mkdir(parents=True, exist_ok=True)
                out["peers"] = {}

                def peers(upstream: Server, stack: contextlib.ExitStack) -> list[Subject]:
                    return peer_subjects(peers_dir, workdir, upstream, stack, log, out["peers"])

            http, proxy_extra = http_phase(
                settings,
                workdir,
                log,
                only=args.subjects,
                baseline=bool(args.baseline),
                peers=peers,
            )
            figures += http_figures(http)
            out["http"] = {
                subject: {
                    name: {
                        "rounds": [run.__dict__ | {"rps": run.rps} for run in measured.runs],
                        "cpu": measured.cpu,
                    }
                    for name, measured in runs.items()
                }
                for subject, runs in http.items()
            }
            out["http"]["proxy_after_runs"] = proxy_extra
        if "rss" in parts:
            log(f"RSS: {settings.rss_requests:,} requests through a fresh proxy")
            out["rss"] = rss_phase(settings, workdir, log)
            figures.append(rss_figure(out["rss"]))
        if "store" in parts:
            log(
                "store: write throughput, then reads at "
                + " and ".join(f"{size:,}" for size in settings.store_sizes)
            )
            out["store"] = run_store_phase(settings, workdir, log)
            figures += store_figures(out["store"], settings)
    except BenchError as error:
        log(f"benchmark failed: {error}")
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    out["meta"] = {
        "command": " ".join(["python -m tests.bench.run", *(argv or sys.argv[1:])]),
        "elapsed_seconds": elapsed,
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "pinning": "subject CPU 1; wrk and upstream CPU 0" if pin else "off",
        "proxy_source_sha256": digest_at_start,
        "baseline": None if args.baseline is None else [args.baseline, baseline_digest],
        "load_average_at_end": Path("/proc/loadavg").read_text().split()[:3],
        "proxy_source_changed_during_run": source_digest() != digest_at_start,
        "proxy_source": "a snapshot of proxy/ taken at the start of the run",
    }
    if out["meta"]["proxy_source_changed_during_run"]:
        log(
            "note: proxy/*.py changed during the run; the servers ran the snapshot taken at"
            f" the start ({digest_at_start}), the store phase the modules imported then"
        )
    out["figures"] = [figure.__dict__ for figure in figures]
    table = render(figures)
    sys.stdout.write(table + "\n")
    failed = [f.name for f in figures if f.passed is False]
    sys.stdout.write(
        f"\n{sum(f.passed is True for f in figures)} targets pass, {len(failed)} fail;"
        f" run took {elapsed / 60:.1f} min; results in {args.out}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2, default=str))
    return 3 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
