"""Instructions per request: each subject run under valgrind's callgrind and counted.

    python -m tests.bench.instructions                      # floor, relay, proxy, proxy_nosearch
    python -m tests.bench.instructions --baseline HEAD~3    # and proxy@base: that revision's proxy/
    python -m tests.bench.instructions --pg postgresql://postgres@127.0.0.1:5432   # and proxy_pg
    python -m tests.bench.instructions --subjects floor,proxy --repeat 3

CPU time per request moves with whatever else the machine is doing, by tens of percent on a
shared machine; the number of instructions a process executes for the same code, inputs and
load does not (repeated runs agree within about 1%). So two versions of the proxy, or the
proxy and the floor, can be compared in a few minutes where ``wrk`` needs many interleaved
rounds to tell 5% apart.

Each subject runs alone, from a fresh database, under ``valgrind --tool=callgrind`` (every
thread counted). ``wrk`` sends ``--warmup`` plain requests at 32 connections (``"store":
true``, but ``false`` for relay), the counters are zeroed (``callgrind_control -z``),
``--requests`` more are sent, and the counters are dumped (``callgrind_control -d``).
Reported: instructions per request in each round, and the smallest of a subject's counts
against the floor's smallest. The dumps stay in the work directory for ``callgrind_annotate``.

What the count leaves out: the kernel's work (system calls, the network stack, page
copies), and time itself: an instruction of a regular expression or a ``memcpy`` takes a
fraction of a cycle, one of the interpreter's loop more. Under valgrind every process runs
tens of times slower, so the writer's batches are not those of a normal run; compare
versions with each other here, and use ``tests.bench.run`` for throughput and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tests.bench.processes import (
    BenchError,
    Server,
    floor,
    mock_upstream,
    proxy,
    snapshot_baseline,
    snapshot_proxy,
)
from tests.bench.wrk import CONNECTIONS, run_wrk

SUBJECTS = ("floor", "relay", "proxy", "proxy_nosearch", "proxy_pg", "proxy@base", "proxy_pg@base")
START_TIMEOUT = 300.0  # seconds for a server to answer /healthz under valgrind
DUMP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Count:
    subject: str
    instructions: int
    requests: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def dumped_total(path: Path) -> int:
    """The event total of a callgrind dump (its ``summary:`` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise BenchError(f"no summary line in {path}")


def _wait_for_dump(path: Path) -> int:
    """The total of the dump at ``path`` once valgrind has written all of it."""
    deadline = time.monotonic() + DUMP_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, BenchError):
            if "\ntotals:" in path.read_text(errors="replace"):
                return dumped_total(path)
        time.sleep(0.1)
    raise BenchError(f"callgrind wrote no complete dump at {path}")


def counted(
    server: Server, workdir: Path, *, store: bool, warmup: int, requests: int
) -> tuple[int, int]:
    """Start ``server`` under callgrind, warm it, send about ``requests`` more; the
    instructions it executed for those, and how many it answered."""
    out = workdir / f"{server.name.split()[0]}-{server.port}.cg"
    server.argv = [
        *("valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}"),
        *server.argv,
    ]
    server.start(timeout=START_TIMEOUT)

    def send(count: int) -> int:
        return run_wrk(
            server.url,
            "plain",
            connections=CONNECTIONS,
            duration=600,
            max_requests=count,
            store=store,
        ).requests

    def control(option: str) -> None:
        subprocess.run(
            ["callgrind_control", option, str(server.pid)], check=True, capture_output=True
        )

    try:
        send(warmup)
        control("-z")  # zero the counters
        served = send(requests)
        control("-d")  # dump them
        return _wait_for_dump(Path(f"{out}.1")), served
    finally:
        server.stop()


@contextlib.contextmanager
def pg_database(pg: str) -> Iterator[str]:
    """A fresh PostgreSQL database's URL, dropped afterwards."""
    name = f"bench_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(f"{pg}/postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield f"{pg}/{name}"
    finally:
        asyncio.run(admin(f"DROP DATABASE {name} WITH (FORCE)"))


def measure(subject: str, workdir: Path, args: argparse.Namespace, round_: int) -> Count:
    upstream = mock_upstream(workdir, None).start()
    try:
        with contextlib.ExitStack() as stack:
            source = "base" if subject.endswith("@base") else "src"
            db: str | Path = workdir / f"{subject}-{round_}.db"
            if subject.startswith("proxy_pg"):
                db = stack.enter_context(pg_database(args.pg))
            if subject == "floor":
                server = floor(workdir, upstream, None)
            else:
                config = None
                if subject == "proxy_nosearch":
                    config = workdir / "nosearch.yaml"
                    config.write_text("store:\n  search: false\n", encoding="utf-8")
                server = proxy(workdir, upstream, db, None, source=source, config=config)
            total, served = counted(
                server,
                workdir,
                store=subject != "relay",
                warmup=args.warmup,
                requests=args.requests,
            )
            return Count(subject, total, served)
    finally:
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", default="floor,relay,proxy,proxy_nosearch")
    parser.add_argument("--baseline", help="a git revision: adds proxy@base (and proxy_pg@base)")
    parser.add_argument("--pg", help="a PostgreSQL server URL without a database: adds proxy_pg")
    parser.add_argument("--requests", type=int, default=2_000, help="requests counted")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, subjects in turn")
    parser.add_argument("--workdir", type=Path, help="where databases, logs and dumps go (kept)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install valgrind wrk)")
    subjects = [s for s in args.subjects.split(",") if s]
    subjects += ["proxy_pg"] if args.pg else []
    if args.baseline:
        subjects += ["proxy@base"] + (["proxy_pg@base"] if args.pg else [])
    subjects = list(dict.fromkeys(subjects))  # each once, in order
    unknown = [s for s in subjects if s not in SUBJECTS]
    if unknown:
        sys.exit(f"unknown subject(s): {', '.join(unknown)}; known: {', '.join(SUBJECTS)}")
    if not args.pg and any(s.startswith("proxy_pg") for s in subjects):
        sys.exit("proxy_pg needs --pg URL (a PostgreSQL server, without a database name)")
    if not args.baseline and any(s.endswith("@base") for s in subjects):
        sys.exit("a @base subject needs --baseline REV")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    workdir.mkdir(parents=True, exist_ok=True)
    snapshot_proxy(workdir)
    if args.baseline:
        snapshot_baseline(workdir, args.baseline)
    counts: dict[str, list[Count]] = {s: [] for s in subjects}
    for round_ in range(1, args.repeat + 1):
        for subject in subjects:
            count = measure(subject, workdir, args, round_)
            counts[subject].append(count)
            print(
                f"round {round_} {subject:<15} {count.per_request / 1000:10.1f} k instructions"
                " a request",
                flush=True,
            )
    floor_per = min((c.per_request for c in counts.get("floor", [])), default=None)
    print(f"\n{'subject':<15} {'k instructions a request':>26} {'x floor':>8}")
    for subject, runs in counts.items():
        best = min(c.per_request for c in runs)
        each = " / ".join(f"{c.per_request / 1000:.1f}" for c in runs)
        ratio = f"{best / floor_per:8.3f}" if floor_per else f"{'':8}"
        print(f"{subject:<15} {each:>26} {ratio}")
    print(f"\ndumps, logs and databases: {workdir}")


if __name__ == "__main__":
    main()
