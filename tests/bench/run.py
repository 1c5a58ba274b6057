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
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import importlib.util
import os
import platform
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

from proxy.models import ListQuery, PageQuery
from proxy.store import CompletionRecord
from proxy.store.sqlite import SQLiteStore
from proxy.writer import Writer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PYTHON = sys.executable
LOAD_CPU = 0  # wrk, and the upstream behind a floor or a proxy
SUBJECT_CPU = 1  # the process under test
TOKEN = "sk-bench-0123456789abcdef"  # the bearer token in wrk_common.lua
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 32

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    quick: bool
    duration: int  # seconds per throughput run
    latency_duration: int  # seconds per 1-connection latency run
    warmup: int  # seconds of warm-up per subject and kind
    rounds: int  # HTTP runs are repeated this many times, subjects interleaved; medians win
    rss_requests: int
    store_sizes: tuple[int, int]
    read_calls: int
    write_records: int
    pin: bool
    baseline: str | None = None  # a git revision whose store the multi-pair lists also run on

    @classmethod
    def of(cls, quick: bool, pin: bool, baseline: str | None = None) -> Settings:
        if quick:
            return cls(True, 3, 3, 1, 1, 10_000, (10_000, 100_000), 2_000, 20_000, pin, baseline)
        return cls(
            False, 10, 10, 2, 3, 100_000, (100_000, 1_000_000), 2_000, 100_000, pin, baseline
        )


# -- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def busy_cpu_seconds() -> float:
    """CPU time spent busy on the whole machine so far (every CPU, every process)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _children(pid: int) -> list[int]:
    children = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                children += [int(child) for child in text.split()]
    return children


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its reaped children (cutime + cstime), plus the same
    for every live descendant."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0  # gone meanwhile: its time is in its parent's cutime once reaped
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / CLK_TCK + sum(tree_cpu_seconds(child) for child in _children(pid))


def pinned(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


class BenchError(RuntimeError):
    """The benchmark could not run as planned."""


@dataclass
class Server:
    """A server subprocess on a loopback port, ready once GET /healthz answers 200."""

    name: str
    argv: list[str]
    log: Path
    cpu: int | None
    cwd: Path = ROOT
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    health: str = "/healthz"
    env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Server:
        argv = [arg.replace("{port}", str(self.port)) for arg in self.argv]
        with self.log.open("ab") as log:
            # taskset execs the server, so the pid is the server's own.
            self.proc = subprocess.Popen(
                [*pinned(self.cpu), *argv],
                cwd=self.cwd,
                stdout=log,
                stderr=log,
                env=None if self.env is None else {**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while True:  # poll readiness; no fixed sleep
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not ready after {timeout} s:\n{self.tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # aiohttp's run_app shuts down cleanly on it
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User + system time of the process tree so far: the server, every live process
        under it, and the children it has reaped (a supervisor's workers, a floor's
        processes, LiteLLM's workers)."""
        return tree_cpu_seconds(self.pid)

    def status_kb(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        raise BenchError(f"no {name} in /proc/{self.pid}/status")

    def get_json(self, path: str, token: str | None = None) -> Any:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return orjson.loads(answer.read())
        except urllib.error.HTTPError as error:  # e.g. /healthz says 503 when degraded
            return orjson.loads(error.read())


def mock_upstream(workdir: Path, cpu: int | None) -> Server:
    argv = [PYTHON, "-m", "tests.bench.mock_upstream", "--port", "{port}"]
    return Server("mock upstream", argv, workdir / "mock_upstream.log", cpu)


def floor(workdir: Path, upstream: Server, cpu: int | None, processes: int = 1) -> Server:
    argv = [PYTHON, "-m", "tests.bench.floor", "--port", "{port}"]
    argv += ["--upstream", upstream.url + "/v1", "--processes", str(processes)]
    return Server(f"floor x{processes}", argv, workdir / f"floor-{processes}.log", cpu)


def proxy(
    workdir: Path,
    upstream: Server,
    db: Path,
    cpu: int | None,
    *,
    workers: int = 1,
    source: str = "src",
    config: Path | None = None,
) -> Server:
    argv = [PYTHON, "-m", "proxy", "serve", "--host", "127.0.0.1", "--port", "{port}"]
    argv += ["--upstream", upstream.url + "/v1", "--db", str(db)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    if config is not None:
        argv += ["--config", str(config)]
    # The snapshot taken at the start (see snapshot_proxy), so every proxy of one run is the
    # same code even while proxy/ is being edited.
    name = f"proxy ({source}, {workers} worker{'s' if workers > 1 else ''})"
    return Server(name, argv, workdir / f"proxy-{db.stem}.log", cpu, cwd=workdir / source)


def snapshot_proxy(workdir: Path) -> str:
    """Copy proxy/ to WORKDIR/src/proxy (``python -m proxy`` runs from there); its digest."""
    target = workdir / "src" / "proxy"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT / "proxy", target, ignore=shutil.ignore_patterns("__pycache__"))
    return source_digest(target)


def snapshot_baseline(workdir: Path, ref: str) -> str:
    """proxy/ as of the git revision ``ref``, in WORKDIR/base/proxy; its digest."""
    target = workdir / "base"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "proxy"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {ref} failed: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return source_digest(target / "proxy")


# -- wrk ---------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    latency_us: dict[str, float]
    errors: dict[str, int]
    wrk_cpu: float  # seconds of CPU wrk used

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def ms(self, percentile: str) -> float:
        return self.latency_us[percentile] / 1000


def run_wrk(
    url: str,
    kind: str,
    *,
    connections: int,
    duration: int,
    latency: bool = False,
    max_requests: int | None = None,
    cpu: int | None = None,
    store: bool = True,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """One wrk run; ``max_requests`` ends it after that many responses (``duration`` caps it);
    ``store=False`` sends ``"store": false``; ``headers`` are added to every request."""
    argv = [*pinned(cpu), "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    argv += ["-s", str(HERE / f"{kind}.lua")]
    if latency:
        argv.append("--latency")
    argv.append(url + "/v1/chat/completions")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"BENCH_MAX_REQUESTS", "BENCH_STORE", "BENCH_HEADERS"}
    }
    if headers:
        env["BENCH_HEADERS"] = "\n".join(f"{name}: {value}" for name, value in headers.items())
    if not store:
        env["BENCH_STORE"] = "0"
    if max_requests is not None:
        env["BENCH_MAX_REQUESTS"] = str(max_requests)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    summary = None
    for line in proc.stdout:
        if line.startswith("BENCH_STOP"):
            proc.send_signal(signal.SIGINT)  # ends wrk's sleep; it prints its summary
        elif line.startswith("BENCH_JSON "):
            summary = orjson.loads(line[len("BENCH_JSON ") :])
    stderr = proc.stderr.read()
    proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or summary is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {' '.join(argv)}\n{stderr}")
    return WrkResult(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        latency_us=summary["latency_us"],
        errors=summary["errors"],
        wrk_cpu=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


# -- HTTP phase ----------------------------------------------------------------------------

# (run name, wrk script, connections); throughput at 32 connections, latency at 1.
PLAN = (
    ("plain_throughput", "plain", CONNECTIONS),
    ("stream_throughput", "stream", CONNECTIONS),
    ("plain_latency", "plain", 1),
    ("stream_latency", "stream", 1),
)
THROUGHPUT = ("plain_throughput", "stream_throughput")
# Every subject of a default run, in the order rounds visit them.
SUBJECTS = (
    "direct",
    "floor",
    "relay",
    "proxy",
    "proxy_nosearch",
    "proxy_w2",
    "proxy_w2_pinned",
    "floor_x2",
)
# Throughput only, against floor_x2; not placed by the bench (see http_phase).
TWO_PROCESS = ("proxy_w2", "proxy_w2_pinned", "floor_x2")


@dataclass
class Subject:
    """A server under test and how it is asked: ``store`` in the body, extra headers."""

    label: str
    server: Server
    behind: Server | None  # the upstream it calls, whose CPU is noted too
    store: bool = True
    runs: tuple[str, ...] = tuple(name for name, _, _ in PLAN)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Measured:
    """One subject's runs of one kind: a wrk result and CPU shares per round."""

    runs: list[WrkResult] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    def median_rps(self) -> float:
        return statistics.median(run.rps for run in self.runs)

    def median_ms(self, percentile: str) -> float:
        return statistics.median(run.ms(percentile) for run in self.runs)

    def median_cpu(self) -> dict[str, float]:
        return {key: statistics.median(c[key] for c in self.cpu) for key in self.cpu[0]}

    def cpu_us_per_request(self) -> list[float]:
        """The subject's process tree: CPU time (user + system) per request served."""
        return [
            c["subject"] * run.seconds / run.requests * 1e6
            for run, c in zip(self.runs, self.cpu, strict=True)
            if run.requests
        ]

    def median_cpu_us(self) -> float:
        return statistics.median(self.cpu_us_per_request())


def measure(
    subject: Subject,
    kind: str,
    *,
    connections: int,
    duration: int,
    pin: bool,
) -> tuple[WrkResult, dict[str, float]]:
    watched = {"subject": subject.server} | ({"upstream": subject.behind} if subject.behind else {})
    cpu_before = {key: server.cpu_seconds() for key, server in watched.items()}
    busy_before = busy_cpu_seconds()
    run = run_wrk(
        subject.server.url,
        kind,
        connections=connections,
        duration=duration,
        latency=connections == 1,
        cpu=LOAD_CPU if pin else None,
        store=subject.store,
        headers=subject.headers,
    )
    cpu = {
        key: (server.cpu_seconds() - cpu_before[key]) / run.seconds
        for key, server in watched.items()
    }
    cpu["wrk"] = run.wrk_cpu / run.seconds
    # Anything else busy on the machine meanwhile (other jobs skew every figure).
    busy = (busy_cpu_seconds() - busy_before) / run.seconds
    cpu["other"] = max(0.0, busy - sum(cpu.values()))
    if run.errors["status"]:
        raise BenchError(f"{subject.label}: {run.errors['status']} non-2xx answers ({kind})")
    return run, cpu


def http_phase(
    settings: Settings,
    workdir: Path,
    log: Callable[[str], None],
    *,
    only: tuple[str, ...] = SUBJECTS,
    baseline: bool = False,
    peers: Callable[[Server, contextlib.ExitStack], list[Subject]] | None = None,
) -> tuple[dict[str, dict[str, Measured]], dict[str, Any]]:
    """Every subject, every run, ``settings.rounds`` times, subjects interleaved.

    All servers stay up; only the one under load is busy (relay and proxy are the same
    server, sent ``"store": false`` and ``true``). Interleaving (direct, floor, relay, proxy,
    ..., direct, ...) and taking medians keeps a drift of the machine (other jobs, CPU
    frequency) from landing on one subject only.

    The two-process subjects (the proxy with ``--workers 2``, unpinned and with
    ``server.pin_workers``, the floor with two processes) are not placed by the bench: on a
    two-CPU machine they share both CPUs with wrk and the upstream, and their figure is the
    one against the other (proxy_w2 / floor_x2).
    With ``baseline``, relay@base and proxy@base (the code of the ``--baseline`` revision)
    are measured beside relay and proxy, in the same rounds.
    """
    subject_cpu = SUBJECT_CPU if settings.pin else None
    load_cpu = LOAD_CPU if settings.pin else None
    subjects: list[Subject] = []
    extra: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:

        def started(server: Server) -> Server:
            stack.callback(server.stop)
            return server.start()

        direct = started(mock_upstream(workdir, subject_cpu))
        upstream = started(mock_upstream(workdir, load_cpu))
        wanted = set(only)
        if "direct" in wanted:
            subjects.append(Subject("direct", direct, None))
        if "floor" in wanted:
            subjects.append(
                Subject("floor", started(floor(workdir, upstream, subject_cpu)), upstream)
            )
        served = None
        if wanted & {"relay", "proxy"}:
            served = started(proxy(workdir, upstream, workdir / "proxy-http.db", subject_cpu))
            if "relay" in wanted:
                subjects.append(Subject("relay", served, upstream, store=False))
            if "proxy" in wanted:
                subjects.append(Subject("proxy", served, upstream))
        if "proxy_nosearch" in wanted:
            # The same code with store.search: false: what indexing for search costs a request.
            nosearch = workdir / "nosearch.yaml"
            nosearch.write_text("store:\n  search: false\n", encoding="utf-8")
            quiet = started(
                proxy(
                    workdir, upstream, workdir / "proxy-nosearch.db", subject_cpu, config=nosearch
                )
            )
            subjects.append(Subject("proxy_nosearch", quiet, upstream))
        if baseline:
            base = started(
                proxy(workdir, upstream, workdir / "proxy-base.db", subject_cpu, source="base")
            )
            subjects.append(Subject("relay@base", base, upstream, store=False))
            subjects.append(Subject("proxy@base", base, upstream))
        if "proxy_w2" in wanted:
            workers = started(proxy(workdir, upstream, workdir / "proxy-w2.db", None, workers=2))
            subjects.append(Subject("proxy_w2", workers, upstream, runs=THROUGHPUT))
        if "proxy_w2_pinned" in wanted:
            # The same with server.pin_workers: each worker and its threads on a CPU of its own.
            pin = workdir / "pinned.yaml"
            pin.write_text("server:\n  pin_workers: true\n", encoding="utf-8")
            pinned_pair = started(
                proxy(workdir, upstream, workdir / "proxy-w2p.db", None, workers=2, config=pin)
            )
            subjects.append(Subject("proxy_w2_pinned", pinned_pair, upstream, runs=THROUGHPUT))
        if "floor_x2" in wanted:
            pair = started(floor(workdir, upstream, None, processes=2))
            subjects.append(Subject("floor_x2", pair, upstream, runs=THROUGHPUT))
        if peers is not None:
            subjects += peers(upstream, stack)
        results = {s.label: {name: Measured() for name in s.runs} for s in subjects}
        for subject in subjects:
            for kind in ("plain", "stream"):
                run_wrk(
                    subject.server.url,
                    kind,
                    connections=CONNECTIONS,
                    duration=settings.warmup,
                    cpu=load_cpu,
                    store=subject.store,
                    headers=subject.headers,
                )
        for round_ in range(1, settings.rounds + 1):
            for name, kind, connections in PLAN:
                duration = settings.duration if connections > 1 else settings.latency_duration
                for subject in subjects:
                    if name not in subject.runs:
                        continue
                    run, cpu = measure(
                        subject,
                        kind,
                        connections=connections,
                        duration=duration,
                        pin=settings.pin,
                    )
                    results[subject.label][name].runs.append(run)
                    results[subject.label][name].cpu.append(cpu)
                    per_request = cpu["subject"] * run.seconds / max(run.requests, 1) * 1e6
                    log(
                        f"  round {round_} {subject.label:<10} {name:<18} {run.rps:8.1f} req/s"
                        f"  p50 {run.ms('p50'):7.3f} ms  p99 {run.ms('p99'):7.3f} ms"
                        f"  {per_request:6.0f} us cpu/req  {_cpu_note(cpu)}"
                    )
        if served is not None and "proxy" in results:
            sent = sum(run.requests for m in results["proxy"].values() for run in m.runs)
            extra["store"] = proxy_sanity(served, sent)
            extra["vmhwm_kb"] = served.status_kb("VmHWM")
            served.stop()
            extra["outcomes"] = access_outcomes(served.log)
    return results, extra


def proxy_sanity(server: Server, sent: int) -> dict[str, Any]:
    """What the proxy committed, and that its own API serves it back."""
    health = server.get_json("/healthz")["store"]
    page = server.get_json("/v1/chat/completions?limit=1&metadata[bench]=wrk", TOKEN)
    if not page.get("data"):
        raise BenchError(f"the proxy listed no stored completion after the run: {page}")
    if health.get("writable") is False:
        raise BenchError(f"the proxy's store stopped writing: {health}\n{server.tail()}")
    return {
        "sent_in_measured_runs": sent,
        "committed_incl_warmup": health.get("committed"),
        "failed": health.get("failed"),
    }


def access_outcomes(log: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    with log.open("rb") as lines:
        for line in lines:
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if entry.get("logger") == "proxy.access":
                    counts[str(entry.get("outcome"))] += 1
    return dict(counts)


def rss_phase(settings: Settings, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Peak RSS of a fresh proxy after ``rss_requests`` requests, half plain, half streamed."""
    subject_cpu = SUBJECT_CPU if settings.pin else None
    load_cpu = LOAD_CPU if settings.pin else None
    with contextlib.ExitStack() as stack:
        upstream = mock_upstream(workdir, load_cpu).start()
        stack.callback(upstream.stop)
        served = proxy(workdir, upstream, workdir / "proxy-rss.db", subject_cpu).start()
        stack.callback(served.stop)
        at_start = served.status_kb("VmHWM")
        runs = {}
        started = time.perf_counter()
        for kind in ("plain", "stream"):
            runs[kind] = run_wrk(
                served.url,
                kind,
                connections=CONNECTIONS,
                duration=3600,
                max_requests=settings.rss_requests // 2,
                cpu=load_cpu,
            )
        sent = sum(run.requests for run in runs.values())
        refused = sum(run.errors["status"] for run in runs.values())
        if refused:
            raise BenchError(f"proxy: {refused} non-2xx answers during the RSS run")
        seconds = time.perf_counter() - started
        hwm_kb, rss_kb = served.status_kb("VmHWM"), served.status_kb("VmRSS")
        result = {
            "requests": sent,
            "seconds": seconds,
            "vmhwm_start_kb": at_start,
            "vmhwm_kb": hwm_kb,
            "vmrss_kb": rss_kb,
            "store": proxy_sanity(served, sent),
        }
        served.stop()
        result["outcomes"] = access_outcomes(served.log)
    log(
        f"  proxy {sent} requests in {seconds:.1f} s:"
        f" VmHWM {hwm_kb / 1024:.1f} MB (at start {at_start / 1024:.1f} MB),"
        f" VmRSS {rss_kb / 1024:.1f} MB"
    )
    return result


# -- store phase ---------------------------------------------------------------------------

# Shaped like the proxy's caller fingerprints (HMAC-SHA256 of the bearer token); the store
# takes any string, so this does not depend on how proxy.callers derives it.
CALLER = "caller_" + hmac.new(b"bench-secret", TOKEN.encode(), hashlib.sha256).hexdigest()[:32]
CREATED_BASE = 1_700_000_000
_ID_SLOT = b"chatcmpl-" + b"@" * 30
ENVS = ("prod", "staging", "dev")
USERS = 1000
_LOREM = (
    "A logging proxy sits between the client and the model provider. It forwards every "
    "byte unchanged, keeps a copy of the answer, and commits it before the last byte leaves. "
)


def env_of(user: int) -> str:
    """Each user works in one environment: a user's filter and another environment's each
    match many completions, and never the same one."""
    return ENVS[user % 3]


def _templates() -> tuple[bytes, bytes]:
    """A stored completion (~1.9 KB, id slot to fill) and its request (~1.0 KB)."""
    completion = {
        "id": _ID_SLOT.decode(),
        "object": "chat.completion",
        "created": CREATED_BASE,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _LOREM * 9, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 220, "completion_tokens": 380, "total_tokens": 600},
        "system_fingerprint": "fp_bench",
        "service_tier": "default",
        "request_id": "req_bench",
        "seed": None,
        "temperature": 0.2,
        "top_p": None,
        "presence_penalty": None,
        "frequency_penalty": None,
        "tools": None,
        "tool_choice": None,
        "response_format": None,
        "input_user": None,
    }
    request = {
        "model": "gpt-4o-mini",
        "store": True,
        "temperature": 0.2,
        "metadata": {"user": "user-1", "env": "prod"},
        "messages": [
            {"role": "system", "content": _LOREM * 2},
            {"role": "user", "content": _LOREM * 3},
        ],
    }
    return orjson.dumps(completion), orjson.dumps(request)


COMPLETION_TEMPLATE, REQUEST_TEMPLATE = _templates()


def completion_id(i: int, salt: bytes = b"db") -> str:
    digest = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=15, key=salt).hexdigest()
    return "chatcmpl-" + digest


def make_record(i: int, salt: bytes = b"db") -> CompletionRecord:
    cid = completion_id(i, salt)
    return CompletionRecord(
        id=cid,
        caller=CALLER,
        created=CREATED_BASE + i // 20,
        model="gpt-4o-mini",
        metadata={"user": f"user-{i % USERS}", "env": env_of(i % USERS), "session": f"s-{i // 50}"},
        completion=COMPLETION_TEMPLATE.replace(_ID_SLOT, cid.encode()),
        request=REQUEST_TEMPLATE,
        request_id="req_" + cid[9:],
        stream=bool(i % 2),
        outcome="complete",
        duration_ms=412.5,
    )


def record_bytes() -> int:
    record = make_record(0)
    return len(record.completion) + len(record.request) + len(orjson.dumps(record.metadata))


def batches(start: int, stop: int, size: int, salt: bytes = b"db") -> Iterator[list[Any]]:
    for first in range(start, stop, size):
        yield [make_record(i, salt) for i in range(first, min(first + size, stop))]


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


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": statistics.median(ordered),
        "p90": cut[89],
        "p99": cut[98],
        "max": ordered[-1],
        "calls": len(ordered),
    }


async def timed(
    calls: int, call: Callable[[int], Awaitable[None]], budget: float | None = None
) -> dict[str, float]:
    """Latency percentiles over ``calls`` calls, after 100 to warm up; with ``budget``
    (seconds), fewer once it is spent (at least 5, after 2 to warm up), for a case too slow
    to call 2,000 times."""
    deadline = None if budget is None else time.perf_counter() + budget
    warm = min(100, calls) if budget is None else min(2, calls)
    for n in range(warm):  # warm the caches and the thread hop
        await call(n)
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        await call(n)
        samples.append((time.perf_counter() - started) * 1000)
        if deadline is not None and started > deadline and len(samples) >= 5:
            break
    return percentiles(samples)


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


def on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, as the proxy does; else on asyncio's loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional, as in the proxy
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_store_phase(settings: Settings, workdir: Path, log: Callable[[str], None]) -> Any:
    return on_uvloop(store_phase(settings, workdir, log))


# -- the table -----------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None
    ratio_floor: float | None = None
    ratio_direct: float | None = None
    note: str = ""

    def row(self) -> list[str]:
        def ratio(r: float | None) -> str:
            return f"{r:.3f}" if r is not None else ""

        if self.unit in {"req/s", "completions/s", "us"}:
            value = f"{self.value:,.0f} {self.unit}"
        else:
            value = f"{self.value:,.3f} {self.unit}"
        verdict = {True: "PASS", False: "FAIL", None: ""}[self.passed]
        return [
            self.name,
            value,
            self.target,
            ratio(self.ratio_floor),
            ratio(self.ratio_direct),
            verdict,
            self.note,
        ]


def _cpu_note(cpu: dict[str, float]) -> str:
    return "cpu " + ", ".join(f"{k} {v:.0%}" for k, v in cpu.items())


def _spread(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return ""
    return f"rounds {min(values):.{digits}f}..{max(values):.{digits}f}; "


# Targets against the floor (throughput) or per request (CPU): the subject, the figure, the
# bound and which way it must go.
THROUGHPUT_TARGETS = {
    ("relay", "plain"): 0.90,
    ("proxy", "plain"): 0.70,
    ("proxy", "stream"): 0.85,
}
CPU_TARGET = 1.5  # the proxy's CPU per stored plain request, as a multiple of the floor's
ADDED_P50_TARGET_MS = 0.8
P99_TARGET_MS = 3.0
WORKERS_TARGET = 0.70  # proxy_w2 / floor_x2, plain


def http_figures(http: dict[str, dict[str, Measured]]) -> list[Figure]:
    figures: list[Figure] = []
    labels = list(http)
    for kind in ("plain", "stream"):
        run = f"{kind}_throughput"
        base = {s: http[s][run].median_rps() for s in ("direct", "floor") if s in http}
        for subject in labels:
            if run not in http[subject]:
                continue
            measured = http[subject][run]
            value = measured.median_rps()
            floor_rps = base.get("floor")
            if subject in TWO_PROCESS and "floor_x2" in http:
                floor_rps = http["floor_x2"][run].median_rps()
            figure = Figure(
                f"{kind} throughput, {CONNECTIONS} conn [{subject}]",
                value,
                "req/s",
                ratio_floor=value / floor_rps if floor_rps else None,
                ratio_direct=value / base["direct"] if "direct" in base else None,
                note=_spread([r.rps for r in measured.runs], 0) + _cpu_note(measured.median_cpu()),
            )
            target = THROUGHPUT_TARGETS.get((subject, kind))
            if subject == "proxy_w2" and kind == "plain":
                target = WORKERS_TARGET
            if target is not None and figure.ratio_floor is not None:
                against = "floor_x2" if subject == "proxy_w2" else "floor"
                figure.target = f">= {target:.2f} x {against}"
                figure.passed = figure.ratio_floor >= target
            figures.append(figure)
        floor_cpu = http["floor"][run].median_cpu_us() if "floor" in http else None
        for subject in labels:
            if run not in http[subject]:
                continue
            measured = http[subject][run]
            value = measured.median_cpu_us()
            reference = floor_cpu
            if subject in TWO_PROCESS and "floor_x2" in http:
                reference = http["floor_x2"][run].median_cpu_us()
            figure = Figure(
                f"{kind} CPU per request [{subject}]",
                value,
                "us",
                ratio_floor=value / reference if reference else None,
                note=_spread(measured.cpu_us_per_request(), 0).rstrip("; ")
                + " (user + system of the subject's process tree / requests)",
            )
            if subject == "proxy" and kind == "plain" and figure.ratio_floor is not None:
                figure.target = f"<= {CPU_TARGET:.1f} x floor"
                figure.passed = figure.ratio_floor <= CPU_TARGET
            figures.append(figure)
    for kind in ("plain", "stream"):
        run = f"{kind}_latency"
        measured_here = [s for s in labels if run in http[s]]
        for percentile in ("p50", "p99"):
            base = {s: http[s][run].median_ms(percentile) for s in ("direct", "floor") if s in http}
            for subject in measured_here:
                measured = http[subject][run]
                value = measured.median_ms(percentile)
                figure = Figure(
                    f"{kind} latency {percentile}, 1 conn [{subject}]",
                    value,
                    "ms",
                    ratio_floor=value / base["floor"] if "floor" in base else None,
                    ratio_direct=value / base["direct"] if "direct" in base else None,
                    note=_spread([r.ms(percentile) for r in measured.runs], 3).rstrip("; "),
                )
                if subject == "proxy" and kind == "plain" and percentile == "p99":
                    figure.target = f"<= {P99_TARGET_MS:.0f} ms"
                    figure.passed = value <= P99_TARGET_MS
                figures.append(figure)
        if "direct" not in http:
            continue
        direct = http["direct"][run].median_ms("p50")
        for subject in measured_here:
            if subject == "direct":
                continue
            added = http[subject][run].median_ms("p50") - direct
            figure = Figure(f"{kind} p50 added over direct [{subject}]", added, "ms")
            if subject == "proxy":
                figure.target = f"<= {ADDED_P50_TARGET_MS} ms"
                figure.passed = added <= ADDED_P50_TARGET_MS
            figures.append(figure)
    figures += search_cost_figures(http)
    return figures


SEARCH_COST_TARGET = 0.05  # indexing may cost the proxy's plain throughput this much at most


def search_cost_figures(http: dict[str, dict[str, Measured]]) -> list[Figure]:
    """What indexing for search costs the stored plain request: proxy against
    proxy_nosearch, round by round (they run in the same rounds, one after the other)."""
    if "proxy" not in http or "proxy_nosearch" not in http:
        return []
    on, off = http["proxy"]["plain_throughput"], http["proxy_nosearch"]["plain_throughput"]
    rps = [a.rps / b.rps for a, b in zip(on.runs, off.runs, strict=True)]
    cpu = [a / b for a, b in zip(on.cpu_us_per_request(), off.cpu_us_per_request(), strict=True)]
    throughput = Figure(
        "plain throughput, search on / off",
        on.median_rps() / off.median_rps(),
        "x",
        target=f">= {1 - SEARCH_COST_TARGET:.2f}",
        note=_spread(rps, 3).rstrip("; ") + " (per round)",
    )
    throughput.passed = throughput.value >= 1 - SEARCH_COST_TARGET
    per_request = Figure(
        "plain CPU per request, search on / off",
        on.median_cpu_us() / off.median_cpu_us(),
        "x",
        target=f"<= {1 + SEARCH_COST_TARGET:.2f}",
        note=_spread(cpu, 3).rstrip("; ") + " (per round)",
    )
    per_request.passed = per_request.value <= 1 + SEARCH_COST_TARGET
    return [throughput, per_request]


def store_figures(store: dict[str, Any], settings: Settings) -> list[Figure]:
    figures = []
    small, large = (str(size) for size in settings.store_sizes)
    labels = {
        "retrieve": "retrieve by id",
        "list_metadata": "list, metadata filter",
        "list_after": "list, after",
        "list_metadata_two_pairs": "list, 2-pair metadata filter",
        "list_metadata_disjoint": "list, 2 pairs never together",
        "list_metadata_disjoint_common_first": "list, 2 pairs never together, common first",
        "list_metadata_after": "list, metadata filter + after",
        "list_newest": "list, newest first",
    }
    targets = {
        "retrieve": 2.0,
        "list_metadata": 5.0,
        "list_metadata_two_pairs": 5.0,
        "list_metadata_disjoint": 5.0,
        "list_metadata_disjoint_common_first": 5.0,
    }
    for name, label in labels.items():
        for size in (small, large):
            reads = store[size]["reads_ms"][name]
            baseline = store[size]["reads_ms"].get(f"{name} (baseline)")
            for percentile in ("p50", "p99"):
                figure = Figure(
                    f"store {label} {percentile} @ {int(size):,}", reads[percentile], "ms"
                )
                if baseline is not None:
                    figure.note = f"at {settings.baseline}: {baseline[percentile]:.3f} ms"
                if size == large and percentile == "p50" and name in targets:
                    figure.target = f"<= {targets[name]:.0f} ms"
                    if large != "1000000":
                        figure.target += " (at 1M)"
                    figure.passed = reads["p50"] <= targets[name]
                figures.append(figure)
    for key, label in (("write_batch", "write_batch, 256/batch"), ("writer", "Writer.commit")):
        write = store[key]
        note = f"~{store['record_bytes']:,} B each, {write['records']:,} records"
        if key == "writer":
            note += f", {write['concurrency']} concurrent, mean batch {write['mean_batch']:.0f}"
        figures.append(
            Figure(
                f"store write throughput, {label}",
                write["per_second"],
                "completions/s",
                target=">= 5,000/s",
                passed=write["per_second"] >= 5000,
                note=note,
            )
        )
    turns = store.get("search_writes")
    if turns:
        size = f"{settings.store_sizes[-1]:,}"
        median = {
            key: {
                name: statistics.median(run[key] for run in turns[name])
                for name in ("on", "off", "backlog")
            }
            for key in ("per_second", "cpu_us_per_record")
        }
        for name, label in (("on", "search on"), ("off", "search off")):
            figure = Figure(
                f"store Writer.commit @ {size}, {label}",
                median["per_second"][name],
                "completions/s",
                note=_spread([run["per_second"] for run in turns[name]], 0)
                + f"{median['cpu_us_per_record'][name]:.0f} us CPU per completion;"
                f" {turns['records']:,} a turn, on and off in turns",
            )
            if name == "on":
                figure.target, figure.passed = ">= 5,000/s", figure.value >= 5000
            figures.append(figure)
        figures.append(
            Figure(
                f"store search backlog indexed at open @ {size}",
                median["per_second"]["backlog"],
                "completions/s",
                note=f"{median['cpu_us_per_record']['backlog']:.0f} us CPU per completion",
            )
        )
    return figures


def rss_figure(rss: dict[str, Any]) -> Figure:
    return Figure(
        f"proxy peak RSS (VmHWM) after {rss['requests']:,} requests",
        rss["vmhwm_kb"] / 1024,
        "MB",
        target="<= 100 MB",
        passed=rss["vmhwm_kb"] / 1024 <= 100,
        note=f"at start {rss['vmhwm_start_kb'] / 1024:.1f} MB;"
        f" VmRSS at end {rss['vmrss_kb'] / 1024:.1f} MB",
    )


def render(figures: list[Figure]) -> str:
    header = ["figure", "value", "target", "x floor", "x direct", "result", "note"]
    rows = [header] + [figure.row() for figure in figures]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 3, 4}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def source_digest(package: Path = ROOT / "proxy") -> str:
    """A digest of proxy/**/*.py, so results can be matched to the code they measured."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


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
