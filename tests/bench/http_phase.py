"""The HTTP part: every subject, every run, rounds interleaved; and peak RSS."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.bench.processes import (
    LOAD_CPU,
    SUBJECT_CPU,
    TOKEN,
    BenchError,
    Server,
    busy_cpu_seconds,
    floor,
    mock_upstream,
    proxy,
)
from tests.bench.settings import Settings
from tests.bench.wrk import CONNECTIONS, WrkResult, run_wrk

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
                        f"  {per_request:6.0f} us cpu/req  {cpu_note(cpu)}"
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


def cpu_note(cpu: dict[str, float]) -> str:
    return "cpu " + ", ".join(f"{k} {v:.0%}" for k, v in cpu.items())
