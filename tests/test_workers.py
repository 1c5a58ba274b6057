"""Several workers on one port and one store (R22), with real processes.

``serve --workers 2`` runs as a subprocess (``tests/processes.py``); the fake upstream runs in
this process. Which worker holds a connection is read from ``/proc``: the server side of an
established connection is a socket among that worker's file descriptors. A client-side
ledger records every completion the client fully received, compared afterwards with the
store file. Nothing waits on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.fakes import FakeUpstream
from tests.processes import HOST, POLL_INTERVAL, ProxyProcess, free_port, run_cli

WORKERS = 2


# -- which worker is which ---------------------------------------------------------------------


def worker_pids(parent: int) -> list[int]:
    """The parent's child processes (the workers), from /proc."""
    try:
        text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
    except OSError:
        return []
    return [int(pid) for pid in text.split()]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _established(port: int) -> dict[int, int]:
    """inode -> client port, for every established connection to ``port`` on loopback."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
        if state == "01" and int(local.split(":")[1], 16) == port:
            found[inode] = int(remote.split(":")[1], 16)
    return found


def connections_by_worker(parent: int, port: int) -> dict[int, set[int]]:
    """Worker pid -> the client ports of the connections it holds."""
    established = _established(port)
    return {
        pid: {established[i] for i in _socket_inodes(pid) if i in established}
        for pid in worker_pids(parent)
    }


def kill_all(proxy: ProxyProcess) -> None:
    """Kill every worker, then stop the supervisor, however the test ended: a worker shuts
    down by itself once its supervisor is gone, but only after draining."""
    if proxy.popen is not None:
        for pid in worker_pids(proxy.popen.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proxy.stop()


async def wait_ready(proxy: ProxyProcess) -> None:
    """Until the supervisor logs that every worker is ready (one may answer /healthz sooner)."""
    deadline = time.monotonic() + 30
    while '"workers ready"' not in proxy.log_path.read_text():
        if not proxy.running or time.monotonic() > deadline:
            raise AssertionError(f"workers not ready\n{proxy.log_tail()}")
        await asyncio.sleep(POLL_INTERVAL)


async def wait_ready_line(proxy: ProxyProcess, pid: int) -> None:
    """Until the supervisor logs that the restarted worker ``pid`` is ready."""
    deadline = time.monotonic() + 30
    while True:
        for line in proxy.log_path.read_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if entry.get("message") == "worker ready" and entry.get("pid") == pid:
                    return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {pid} not ready\n{proxy.log_tail()}")
        await asyncio.sleep(POLL_INTERVAL)


async def wait_workers(parent: int, count: int, *, other_than: int | None = None) -> list[int]:
    """Until the parent has ``count`` children (none of them ``other_than``)."""
    deadline = time.monotonic() + 20
    while True:
        pids = worker_pids(parent)
        if len(pids) == count and other_than not in pids:
            return pids
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers of {parent}: {pids}, wanted {count}")
        await asyncio.sleep(POLL_INTERVAL)


# -- one HTTP/1.1 connection whose server-side owner is known ---------------------------------


class Connection:
    """A keep-alive HTTP/1.1 connection spoken by hand, so its local port is known."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.local_port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def request(
        self, method: str, path: str, body: bytes = b"", token: str = "sk-workers"
    ) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def one_connection_per_worker(proxy: ProxyProcess) -> dict[int, Connection]:
    """Open connections until every worker holds one; the others are closed."""
    assert proxy.popen is not None
    parent = proxy.popen.pid
    pids = await wait_workers(parent, WORKERS)
    chosen: dict[int, Connection] = {}
    spare: list[Connection] = []
    try:
        for _ in range(200):
            connection = await Connection.open(proxy.port)
            status, _ = await connection.request("GET", "/healthz")  # accepted once answered
            assert status == 200
            owners = connections_by_worker(parent, proxy.port)
            owner = next(pid for pid in pids if connection.local_port in owners.get(pid, ()))
            if owner in chosen:
                spare.append(connection)
            else:
                chosen[owner] = connection
            if len(chosen) == WORKERS:
                return chosen
        raise AssertionError(f"200 connections reached only workers {list(chosen)}")
    finally:
        for connection in spare:
            connection.close()


# -- the ledger and the load ---------------------------------------------------------------


@dataclass
class Ledger:
    received: dict[str, str] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    acks: int = 0

    def acknowledge(self, completion_id: str, kind: str) -> None:
        assert completion_id not in self.received, f"{completion_id} received twice"
        self.received[completion_id] = kind
        self.acks += 1

    async def reach(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.acks < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.acks}/{count} received; failures {dict(self.failures)}"
                )
            await asyncio.sleep(POLL_INTERVAL)


def chat_body(index: int, *, stream: bool) -> bytes:
    return orjson.dumps(
        {
            "model": "gpt-test",
            "messages": [{"role": "user", "content": f"workers {index}"}],
            "store": True,
            "stream": stream,
        }
    )


async def exchange(
    session: aiohttp.ClientSession, base_url: str, index: int, ledger: Ledger
) -> None:
    """One store:true request, odd indexes streamed; failures are counted, never raised."""
    stream = index % 2 == 1
    headers = {"Authorization": "Bearer sk-workers", "Content-Type": "application/json"}
    try:
        async with session.post(
            base_url + "/chat/completions", data=chat_body(index, stream=stream), headers=headers
        ) as response:
            if response.status != 200:
                ledger.failures[f"status {response.status}"] += 1
                await response.read()
                return
            if not stream:
                ledger.acknowledge(orjson.loads(await response.read())["id"], "plain")
                return
            completion_id = None
            async for line in response.content:
                if line.startswith(b"data: [DONE]"):
                    assert completion_id is not None
                    ledger.acknowledge(completion_id, "stream")
                    return
                if line.startswith(b"data: ") and completion_id is None:
                    completion_id = orjson.loads(line[6:])["id"]
            ledger.failures["stream ended without [DONE]"] += 1
    except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as error:
        ledger.failures[type(error).__name__] += 1


async def run_load(
    base_url: str,
    ledger: Ledger,
    *,
    concurrency: int,
    total: int | None = None,
    stop: asyncio.Event | None = None,
    keep: list[aiohttp.ClientSession] | None = None,
) -> None:
    """``concurrency`` loops send requests until ``total`` were sent or ``stop`` is set;
    the session is left open (its keep-alive connections with it) when ``keep`` is given."""
    counter = itertools.count()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
    )

    async def loop() -> None:
        while stop is None or not stop.is_set():
            index = next(counter)
            if total is not None and index >= total:
                return
            await exchange(session, base_url, index, ledger)

    try:
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    finally:
        if keep is None:
            await session.close()
        else:
            keep.append(session)


def stored_ids(db: Path) -> Counter[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return Counter(row[0] for row in conn.execute("SELECT id FROM completions"))


def assert_all_stored(ledger: Ledger, db: Path, log: str) -> None:
    stored = stored_ids(db)
    missing = sorted(set(ledger.received) - set(stored))
    assert not missing, f"{len(missing)} received completions not stored: {missing[:5]}\n{log}"
    assert not [i for i, n in stored.items() if n > 1], "a completion stored twice"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def workers_proxy(tmp_path: Path, upstream: FakeUpstream, store_url: str) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(
        db=store_url,  # a SQLite path or a postgresql:// URL, given as --db
        upstream_url=upstream.url,  # type: ignore[attr-defined]
        log_path=tmp_path / "proxy.log",
        extra_args=["--workers", str(WORKERS)],
    )
    yield proxy
    kill_all(proxy)


@pytest.fixture
async def started(workers_proxy: ProxyProcess) -> AsyncIterator[ProxyProcess]:
    workers_proxy.start()
    await wait_ready(workers_proxy)
    assert workers_proxy.popen is not None
    await wait_workers(workers_proxy.popen.pid, WORKERS)
    yield workers_proxy


async def stop_and_check(proxy: ProxyProcess) -> str:
    """SIGTERM the parent; it exits 0 once both workers drained; the log has no lock errors."""
    proxy.terminate()
    assert await proxy.wait_exit(60) == 0, proxy.log_tail()
    log = proxy.log_path.read_text()
    assert "database is locked" not in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    return log


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_a_completion_is_visible_through_every_worker_at_once(
    started: ProxyProcess,
) -> None:
    connections = await one_connection_per_worker(started)
    try:
        first, second = connections.values()
        for index in range(20):
            writer, reader = (first, second) if index % 2 == 0 else (second, first)
            status, body = await writer.request(
                "POST", "/v1/chat/completions", chat_body(index, stream=False)
            )
            assert status == 200, body
            completion_id = orjson.loads(body)["id"]
            # The other worker, right after the client got the answer: no wait, no retry.
            status, body = await reader.request("GET", f"/v1/chat/completions/{completion_id}")
            assert status == 200, body
            assert orjson.loads(body)["id"] == completion_id
        for connection in (first, second):
            status, body = await connection.request("GET", "/v1/chat/completions?limit=100")
            assert status == 200
            assert len(orjson.loads(body)["data"]) == 20
    finally:
        for connection in connections.values():
            connection.close()
    await stop_and_check(started)


async def test_metrics_report_the_whole_server(started: ProxyProcess) -> None:
    connections = await one_connection_per_worker(started)
    try:
        for index, connection in enumerate(connections.values()):
            for n in range(3 + index):  # 3 through one worker, 4 through the other
                status, _ = await connection.request(
                    "POST", "/v1/chat/completions", chat_body(n, stream=False)
                )
                assert status == 200
        # Metrics are counted just after the answer is sent, so the last ones may lag a little.
        for connection in connections.values():
            deadline = time.monotonic() + 10
            while (counts := await _scrape(connection)) != (7.0, 7.0):
                assert time.monotonic() < deadline, counts
                await asyncio.sleep(POLL_INTERVAL)
    finally:
        for connection in connections.values():
            connection.close()
    await stop_and_check(started)


async def _scrape(connection: Connection) -> tuple[float, float]:
    """(successful creates, completions stored) as one worker's /metrics reports them."""
    status, body = await connection.request("GET", "/metrics")
    assert status == 200
    lines = body.decode().splitlines()
    created = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("completions_proxy_requests_total{")
        and 'route="create"' in line
        and 'status="200"' in line
    )
    stored = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("completions_proxy_completions_stored_total{")
    )
    return created, stored


async def test_two_workers_under_load_store_everything(started: ProxyProcess) -> None:
    assert started.popen is not None
    ledger = Ledger()
    sessions: list[aiohttp.ClientSession] = []
    total = 600
    try:
        await asyncio.wait_for(
            run_load(started.base_url, ledger, concurrency=32, total=total, keep=sessions), 120
        )
        # The load's keep-alive connections are still open: both workers hold some.
        held = connections_by_worker(started.popen.pid, started.port)
        assert len(held) == WORKERS
        assert all(held.values()), f"a worker served no connection: {held}"
    finally:
        for session in sessions:
            await session.close()
    assert not ledger.failures, f"{dict(ledger.failures)}\n{started.log_tail()}"
    assert ledger.acks == total
    log = await stop_and_check(started)
    assert_all_stored(ledger, started.db, log[-4000:])
    assert len(stored_ids(started.db)) == total


async def test_kill_9_of_one_worker_mid_load(started: ProxyProcess) -> None:
    assert started.popen is not None
    parent = started.popen.pid
    victim, survivor = await wait_workers(parent, WORKERS)
    ledger = Ledger()
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(started.base_url, ledger, concurrency=16, stop=stop))
    try:
        await ledger.reach(200)
        os.kill(victim, signal.SIGKILL)
        killed_at = ledger.acks
        # The survivor keeps serving while the parent starts a replacement.
        await ledger.reach(killed_at + 200)
        pids = await wait_workers(parent, WORKERS, other_than=victim)
        assert survivor in pids
        await ledger.reach(ledger.acks + 300)
    finally:
        stop.set()
        await asyncio.wait_for(load, 60)
    # Only requests caught in the killed worker may fail, and only as broken connections.
    assert set(ledger.failures) <= {
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientConnectorError",
        "ClientConnectionResetError",
        "ClientPayloadError",
        "stream ended without [DONE]",
    }, dict(ledger.failures)
    # Each of the 16 clients may lose its request in flight, and once more a reconnect that
    # landed in the killed worker's accept queue before the kernel dropped its socket.
    assert sum(ledger.failures.values()) <= 2 * 16
    # The replacement takes connections: one through each worker stores and reads back.
    connections = await one_connection_per_worker(started)
    try:
        for index, connection in enumerate(connections.values()):
            status, body = await connection.request(
                "POST", "/v1/chat/completions", chat_body(index, stream=False)
            )
            assert status == 200, body
            ledger.acknowledge(orjson.loads(body)["id"], "plain")
    finally:
        for connection in connections.values():
            connection.close()
    log = await stop_and_check(started)
    assert "worker exited; starting a new one" in log
    assert '"status":"killed by SIGKILL"' in log
    assert_all_stored(ledger, started.db, log[-4000:])


def cpus_of(pid: int) -> set[int]:
    """The CPUs any thread of ``pid`` may run on (``Cpus_allowed_list`` of each task)."""
    allowed: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
            (listed,) = (
                line for line in status.splitlines() if line.startswith("Cpus_allowed_list")
            )
            for part in listed.split(":")[1].strip().split(","):
                first, _, last = part.partition("-")
                allowed.update(range(int(first), int(last or first) + 1))
    return allowed


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to tell")
async def test_pinned_workers_each_run_on_a_cpu_of_their_own(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = tmp_path / "pinned.yaml"
    config.write_text("server:\n  pin_workers: true\n", encoding="utf-8")
    proxy = ProxyProcess(
        db=tmp_path / "c.db",
        upstream_url=upstream.url,  # type: ignore[attr-defined]
        log_path=tmp_path / "proxy.log",
        extra_args=["--workers", str(WORKERS), "--config", str(config)],
    )
    proxy.start()
    try:
        await wait_ready(proxy)
        assert proxy.popen is not None
        parent = proxy.popen.pid
        pids = await wait_workers(parent, WORKERS)
        # The store's threads are running by now: every thread of a worker is on its CPU.
        placed = {pid: cpus_of(pid) for pid in pids}
        assert all(len(cpus) == 1 for cpus in placed.values()), placed
        assert set().union(*placed.values()) == set(sorted(os.sched_getaffinity(0))[:WORKERS])
        assert cpus_of(parent) == os.sched_getaffinity(0)  # the supervisor is not pinned
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        (replacement,) = set(await wait_workers(parent, WORKERS, other_than=victim)) - set(pids)
        await wait_ready_line(proxy, replacement)
        assert cpus_of(replacement) == placed[victim]  # its slot's CPU again
        await stop_and_check(proxy)
    finally:
        kill_all(proxy)


class GatedUpstream(FakeUpstream):
    """Holds every chat request until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.held = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            self.held += 1
            await self.gate.wait()
        return await super().handle(request)


@pytest.fixture
async def gated(aiohttp_server: Any) -> AsyncIterator[GatedUpstream]:
    fake = GatedUpstream()
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    yield fake
    fake.gate.set()


async def test_sigterm_drains_both_workers(gated: GatedUpstream, tmp_path: Path) -> None:
    proxy = ProxyProcess(
        db=tmp_path / "completions.db",
        upstream_url=gated.url,  # type: ignore[attr-defined]
        log_path=tmp_path / "proxy.log",
        extra_args=["--workers", str(WORKERS)],
    )
    in_flight = 40
    try:
        proxy.start()
        await wait_ready(proxy)
        assert proxy.popen is not None
        await wait_workers(proxy.popen.pid, WORKERS)
        ledger = Ledger()
        load = asyncio.create_task(
            run_load(proxy.base_url, ledger, concurrency=in_flight, total=in_flight)
        )
        deadline = time.monotonic() + 30
        while gated.held < in_flight:
            assert time.monotonic() < deadline, f"only {gated.held} reached the upstream"
            await asyncio.sleep(POLL_INTERVAL)
        held = connections_by_worker(proxy.popen.pid, proxy.port)
        assert all(held.values()), f"not every worker has requests in flight: {held}"
        proxy.terminate()
        await proxy.wait_not_listening()  # both stopped accepting, with requests in flight
        gated.gate.set()
        await asyncio.wait_for(load, 60)
        assert not ledger.failures, dict(ledger.failures)
        assert ledger.acks == in_flight
        assert await proxy.wait_exit(60) == 0, proxy.log_tail()
        assert_all_stored(ledger, proxy.db, proxy.log_tail())
        # Each worker logs one shutdown line naming itself; together they drained every
        # request that was in flight at SIGTERM.
        lines = [
            orjson.loads(line)
            for line in proxy.log_path.read_text(encoding="utf-8").splitlines()
            if line.startswith("{")
        ]
        shutdown = [line for line in lines if line["message"] == "shutdown"]
        assert sorted(line["worker"] for line in shutdown) == list(range(WORKERS))
        assert sum(line["requests_drained"] for line in shutdown) == in_flight
        assert sum(line["completions_committed"] for line in shutdown) == in_flight
    finally:
        kill_all(proxy)


def _one_message(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return str(lines[0])


def test_a_port_in_use_is_one_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            "--workers",
            "2",
            "--host",
            HOST,
            "--port",
            str(port),
            "--db",
            str(tmp_path / "c.db"),
        )
    assert result.returncode == 1
    message = _one_message(result)
    assert message.startswith(f"completions-proxy: cannot listen on {HOST}:{port}"), message


def test_a_store_that_cannot_open_is_one_message(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    db.write_bytes(b"this is not a database" * 100)
    result = run_cli("serve", "--workers", "2", "--port", str(free_port()), "--db", str(db))
    assert result.returncode == 1
    assert "cannot open the store" in _one_message(result)


def test_workers_must_be_a_count_or_auto(tmp_path: Path) -> None:
    result = run_cli("serve", "--workers", "0", "--db", str(tmp_path / "c.db"))
    assert result.returncode == 2
    assert "server.workers: Value error, must be at least 1, or auto" in result.stderr
    memory = run_cli("serve", "--workers", "2", "--db", ":memory:")
    assert memory.returncode == 2
    assert "several workers need a store they share" in _one_message(memory)
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  workers: auto\n")
    shown = run_cli("check-config", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "workers: auto" in shown.stdout
