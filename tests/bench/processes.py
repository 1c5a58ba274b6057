"""The benchmark's servers as subprocesses on loopback ports, where they run, and the CPU
time of a process tree."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

HERE = Path(__file__).resolve().parent


ROOT = HERE.parent.parent


PYTHON = sys.executable


LOAD_CPU = 0  # wrk, and the upstream behind a floor or a proxy


SUBJECT_CPU = 1  # the process under test


TOKEN = "sk-bench-0123456789abcdef"  # the bearer token in wrk_common.lua


CLK_TCK = os.sysconf("SC_CLK_TCK")


T = TypeVar("T")


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
    db: Path | str,
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
    stem = db.stem if isinstance(db, Path) else db.rsplit("/", 1)[-1]  # a file or a database URL
    return Server(name, argv, workdir / f"proxy-{stem}.log", cpu, cwd=workdir / source)


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


def on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, as the proxy does; else on asyncio's loop."""
    try:
        import uvloop  # noqa: PLC0415 - optional, as in the proxy
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def source_digest(package: Path = ROOT / "proxy") -> str:
    """A digest of proxy/**/*.py, so results can be matched to the code they measured."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
