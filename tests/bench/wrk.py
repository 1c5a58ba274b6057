"""One ``wrk`` run against a server, parsed."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from dataclasses import dataclass

import orjson

from tests.bench.processes import HERE, BenchError, pinned

CONNECTIONS = 32


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
