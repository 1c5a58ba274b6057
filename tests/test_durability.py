"""Durability promises proven with real processes (R1, R2 and R17 of docs/reliability.md),
and CLI exits.

The proxy runs as a subprocess (``tests/processes.py``); the fake upstream runs in this
process, so a test can count what reached it. A client-side ledger records the id of every
completion the client fully received -- a plain body read to its end, or a stream read
through ``data: [DONE]`` -- and is compared afterwards with the store, read both through the
proxy's list API (one bearer token per ledger) and directly from the SQLite file.

Nothing waits on a fixed sleep: tests wait on ledger counts, upstream arrivals, ports,
``/healthz`` and process exits, each with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.fakes import FakeUpstream, Reply
from tests.processes import ProxyProcess, free_port, run_cli

ProxyStarter = Callable[[str], ProxyProcess]

RESTART_LIMIT = 2.0  # seconds from spawn to a healthy /healthz after kill -9 (R2)
KILL_ROUNDS = 3
ACKS_PER_ROUND = 300  # completions the client fully receives before each kill -9
IN_FLIGHT = 100  # requests in flight when SIGTERM arrives (R17)
DRAIN_SECONDS = 1.0  # how long their answers still take once shutdown has begun (R17)


# -- the client-side ledger --------------------------------------------------------------------


@dataclass
class Ledger:
    """What the client fully received, and every way a request did not make it."""

    received: dict[str, str] = field(default_factory=dict)  # completion id -> "plain" | "stream"
    repeated: list[str] = field(default_factory=list)  # ids the client got more than once
    failures: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    acks: int = 0
    _marks: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)

    def acknowledge(self, completion_id: str, kind: str) -> None:
        if completion_id in self.received:
            self.repeated.append(completion_id)
        self.received[completion_id] = kind
        self.acks += 1
        for count, mark in self._marks:
            if self.acks >= count and not mark.done():
                mark.set_result(None)

    async def reach(self, count: int, timeout: float) -> None:
        """Wait until ``count`` completions have been fully received."""
        if self.acks >= count:
            return
        mark = asyncio.get_running_loop().create_future()
        self._marks.append((count, mark))
        try:
            await asyncio.wait_for(mark, timeout)
        except TimeoutError:
            raise AssertionError(
                f"only {self.acks}/{count} completions received in {timeout} s;"
                f" failures: {dict(self.failures)}"
            ) from None

    def failed(self) -> int:
        return sum(self.failures.values())


def chat_body(index: int, *, stream: bool) -> bytes:
    return orjson.dumps(
        {
            "model": "gpt-test",
            "messages": [{"role": "user", "content": f"durability {index}"}],
            "store": True,
            "stream": stream,
        }
    )


async def _read_stream(response: aiohttp.ClientResponse, ledger: Ledger) -> None:
    completion_id: str | None = None
    done = False
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: ") :].strip()
        if data == b"[DONE]":
            if completion_id is None:
                ledger.failures["[DONE] before any chunk"] += 1
                return
            # Received through [DONE]: acknowledged, whatever happens to the bytes after it.
            ledger.acknowledge(completion_id, "stream")
            done = True
        elif completion_id is None:
            completion_id = orjson.loads(data)["id"]
    if not done:
        ledger.failures["stream ended without [DONE]"] += 1


async def exchange(
    session: aiohttp.ClientSession, base_url: str, token: str, index: int, ledger: Ledger
) -> None:
    """One store:true request; odd indexes stream. Failures are counted, never raised."""
    stream = index % 2 == 1
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    try:
        async with session.post(
            base_url + "/chat/completions", data=chat_body(index, stream=stream), headers=headers
        ) as response:
            ledger.statuses[response.status] += 1
            if response.status != 200:
                await response.read()
                ledger.failures[f"status {response.status}"] += 1
                return
            if stream:
                await _read_stream(response, ledger)
            else:
                body = await response.read()  # the whole Content-Length, or it raises
                ledger.acknowledge(orjson.loads(body)["id"], "plain")
    except (aiohttp.ClientError, TimeoutError, ConnectionError, ValueError) as error:
        ledger.failures[type(error).__name__] += 1


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),  # concurrency is set by the workers
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
    )


async def run_load(
    base_url: str,
    token: str,
    ledger: Ledger,
    *,
    concurrency: int,
    total: int | None = None,
    stop: asyncio.Event | None = None,
    indexes: Iterator[int] | None = None,
) -> None:
    """``concurrency`` workers send requests until ``total`` were sent or ``stop`` is set."""
    counter = indexes if indexes is not None else itertools.count()
    sent = itertools.count()
    async with client_session() as session:

        async def worker() -> None:
            while stop is None or not stop.is_set():
                if total is not None and next(sent) >= total:
                    return
                await exchange(session, base_url, token, next(counter), ledger)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


# -- reading the store ---------------------------------------------------------------------------


@dataclass
class StoreView:
    integrity: str
    ids: Counter[str]

    def missing(self, ledger: Ledger) -> list[str]:
        return sorted(set(ledger.received) - set(self.ids))

    def duplicates(self) -> list[str]:
        return sorted(i for i, n in self.ids.items() if n > 1)


def inspect_store(db: Path) -> StoreView:
    """integrity_check and every stored id; only for a file no proxy has open."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        integrity = "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        ids: Counter[str] = Counter()
        for completion_id, count in conn.execute(
            "SELECT id, count(*) FROM completions GROUP BY id"
        ):
            ids[completion_id] = count
    return StoreView(integrity, ids)


def snapshot(db: Path, into: Path) -> Path:
    """A copy of the database and its WAL as a killed proxy left them; the original is untouched."""
    into.mkdir()
    for suffix in ("", "-wal"):
        source = db.with_name(db.name + suffix)
        if source.exists():
            shutil.copyfile(source, into / source.name)
    return into / db.name


async def listed_ids(base_url: str, token: str) -> list[str]:
    """Every id the list API shows this caller, page by page."""
    ids: list[str] = []
    params = {"limit": "100", "order": "asc"}
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(
                base_url + "/chat/completions", params=params, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
                page = await response.json()
            ids += [item["id"] for item in page["data"]]
            if not page["has_more"]:
                return ids
            params["after"] = page["data"][-1]["id"]


def assert_ledger_in(ledger: Ledger, ids: list[str] | Counter[str], where: str, log: str) -> None:
    listed = Counter(ids)
    missing = sorted(set(ledger.received) - set(listed))
    duplicates = sorted(i for i, n in listed.items() if n > 1)
    kinds = Counter(ledger.received[i] for i in missing)
    assert not missing, (
        f"{len(missing)} fully received completion(s) missing from {where}"
        f" ({dict(kinds)}), e.g. {missing[:5]}\n{log}"
    )
    assert not duplicates, f"duplicates in {where}: {duplicates[:5]}"
    assert not ledger.repeated, f"the client received ids twice: {ledger.repeated[:5]}"


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[ProxyStarter]:
    """Makes proxy processes on one database file; every one is killed and reaped in teardown."""
    made: list[ProxyProcess] = []

    def make(upstream_url: str) -> ProxyProcess:
        process = ProxyProcess(
            db=tmp_path / "completions.db",
            upstream_url=upstream_url,
            log_path=tmp_path / "proxy.log",
        )
        made.append(process)
        return process

    yield make
    for process in made:
        process.stop()


class GatedUpstream(FakeUpstream):
    """The fake upstream, holding every chat request until the test opens the gate.

    Once the gate opens, answers stay slow (a scripted delay before a plain body, between
    stream chunks), so the proxy's shutdown has to wait for them rather than race them.
    """

    def __init__(self, expected: int, *, slowness: float) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.expected = expected
        self.slowness = slowness
        self.held = 0
        self.all_held = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            self.held += 1
            if self.held >= self.expected:
                self.all_held.set()
            await self.gate.wait()
        return await super().handle(request)

    def default(self, request: web.Request, body: bytes) -> Reply:
        reply = super().default(request, body)
        if reply.sse is not None:
            reply.piece_delay = self.slowness / len(reply.sse)
        else:
            reply.delay = self.slowness
        return reply


@pytest.fixture
async def gated_upstream(aiohttp_server: Any) -> Any:
    fake = GatedUpstream(IN_FLIGHT, slowness=DRAIN_SECONDS)
    server = await aiohttp_server(fake.app)
    fake.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    yield fake
    fake.gate.set()  # never leave a handler waiting for the server's shutdown


# -- R1: every completion the client fully received is stored, once ------------------------------


async def _ledger_matches_store(
    upstream: FakeUpstream, proxies: ProxyStarter, *, total: int, concurrency: int
) -> None:
    proxy = proxies(upstream.url)  # type: ignore[attr-defined]
    proxy.start()
    await proxy.wait_healthy()
    token = f"sk-durability-r1-{total}"
    ledger = Ledger()
    started = time.monotonic()
    await asyncio.wait_for(
        run_load(proxy.base_url, token, ledger, concurrency=concurrency, total=total),
        timeout=max(60.0, total / 10),
    )
    elapsed = time.monotonic() - started
    assert not ledger.failures, f"failed requests: {dict(ledger.failures)}\n{proxy.log_tail()}"
    assert ledger.acks == total
    assert Counter(ledger.received.values()) == {"plain": total // 2, "stream": total - total // 2}
    assert len(upstream.chat_requests()) == total

    listed = await listed_ids(proxy.base_url, token)
    assert_ledger_in(ledger, listed, "the list API", proxy.log_tail())
    assert set(listed) == set(ledger.received), "the list API shows completions never received"

    proxy.terminate()
    assert await proxy.wait_exit(30) == 0, proxy.log_tail()
    view = inspect_store(proxy.db)
    assert view.integrity == "ok"
    assert_ledger_in(ledger, view.ids, "the database file", proxy.log_tail())
    assert sum(view.ids.values()) == total
    print(f"R1: {total} requests at {concurrency} concurrent in {elapsed:.1f} s")


async def test_r1_every_received_completion_is_stored_once(
    upstream: FakeUpstream, proxies: ProxyStarter
) -> None:
    await _ledger_matches_store(upstream, proxies, total=1_000, concurrency=50)


@pytest.mark.slow  # deselected by default (pyproject addopts); run with -m slow
async def test_r1_soak_10000_requests_at_200_concurrent(
    upstream: FakeUpstream, proxies: ProxyStarter
) -> None:
    await _ledger_matches_store(upstream, proxies, total=10_000, concurrency=200)


# -- R2: kill -9 mid-load loses nothing acknowledged ----------------------------------------------


async def test_r2_kill_9_mid_load_loses_no_acknowledged_completion(
    upstream: FakeUpstream, proxies: ProxyStarter, tmp_path: Path
) -> None:
    proxy = proxies(upstream.url)  # type: ignore[attr-defined]
    token = "sk-durability-r2"
    ledger = Ledger()
    indexes = itertools.count()
    restarts: list[float] = []
    for round_no in range(1, KILL_ROUNDS + 1):
        proxy.start()
        healthy_after = await proxy.wait_healthy()
        if round_no > 1:
            restarts.append(healthy_after)
        failed_before = ledger.failed()
        stop = asyncio.Event()
        load = asyncio.create_task(
            run_load(proxy.base_url, token, ledger, concurrency=50, stop=stop, indexes=indexes)
        )
        try:
            await ledger.reach(ledger.acks + ACKS_PER_ROUND, timeout=30)
            proxy.kill()
            assert await proxy.wait_exit(10) == -signal.SIGKILL
        finally:
            stop.set()
            await asyncio.wait_for(load, 30)
        # Requests were in flight when the proxy died: the kill really was mid-load.
        assert ledger.failed() > failed_before, "no request was cut by the kill"

        killed = inspect_store(snapshot(proxy.db, tmp_path / f"killed-{round_no}"))
        assert killed.integrity == "ok", f"round {round_no}: {killed.integrity}"
        assert_ledger_in(ledger, killed.ids, f"the file after kill #{round_no}", proxy.log_tail())

    proxy.start()
    restarts.append(await proxy.wait_healthy())
    assert max(restarts) < RESTART_LIMIT, f"restart to healthy took {restarts} s"
    listed = await listed_ids(proxy.base_url, token)
    assert_ledger_in(ledger, listed, "the list API after the restarts", proxy.log_tail())

    proxy.terminate()
    assert await proxy.wait_exit(30) == 0, proxy.log_tail()
    view = inspect_store(proxy.db)
    assert view.integrity == "ok"
    assert_ledger_in(ledger, view.ids, "the database file", proxy.log_tail())
    assert set(ledger.received.values()) == {"plain", "stream"}, "the load was not mixed"
    print(
        f"R2: {ledger.acks} acknowledged over {KILL_ROUNDS} kills, {ledger.failed()} cut,"
        f" {sum(view.ids.values())} stored; restarts {[round(t, 2) for t in restarts]} s"
    )


# -- R17: SIGTERM drains what is in flight --------------------------------------------------------


async def test_r17_sigterm_answers_and_stores_everything_in_flight(
    gated_upstream: GatedUpstream, proxies: ProxyStarter
) -> None:
    proxy = proxies(gated_upstream.url)  # type: ignore[attr-defined]
    proxy.start()
    await proxy.wait_healthy()
    token = "sk-durability-r17"
    ledger = Ledger()
    async with client_session() as session:
        tasks = [
            asyncio.create_task(exchange(session, proxy.base_url, token, index, ledger))
            for index in range(IN_FLIGHT)
        ]
        try:
            # Every request has reached the upstream and is held there: all are in flight.
            await asyncio.wait_for(gated_upstream.all_held.wait(), 30)
            assert gated_upstream.held == IN_FLIGHT
            proxy.terminate()
            await proxy.wait_not_listening()  # shutdown has begun; nothing has been answered
            assert ledger.acks == 0
            gated_upstream.gate.set()  # answers now take DRAIN_SECONDS, all during shutdown
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            gated_upstream.gate.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    code = await proxy.wait_exit(30)
    assert ledger.statuses == {200: IN_FLIGHT}, (
        f"statuses {dict(ledger.statuses)}, failures {dict(ledger.failures)}\n{proxy.log_tail()}"
    )
    assert not ledger.failures, f"{dict(ledger.failures)}\n{proxy.log_tail()}"
    assert ledger.acks == IN_FLIGHT
    assert code == 0, proxy.log_tail()
    view = inspect_store(proxy.db)
    assert view.integrity == "ok"
    assert_ledger_in(ledger, view.ids, "the database file", proxy.log_tail())
    assert sum(view.ids.values()) == IN_FLIGHT


# -- the command line: bad config or flag → exit 2 and one readable message ------------------------


def assert_one_message(stderr: str, *fragments: str) -> None:
    """One message for a person: no traceback, not repeated, naming what is wrong."""
    assert "Traceback" not in stderr, stderr
    assert stderr.strip(), "no message on stderr"
    if stderr.startswith("completions-proxy: "):  # a ConfigError from the CLI
        assert stderr.count("completions-proxy: ") == 1, stderr
    else:  # argparse: the usage, then one error line
        assert sum("error:" in line for line in stderr.splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in {stderr!r}"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("server: [unclosed\n", ("not valid YAML",)),
        ("server:\n  bogus: 1\n", ("server.bogus", "Extra inputs are not permitted")),
        ("server:\n  port: high\n", ("server.port",)),
        ("- a\n- list\n", ("must be a mapping",)),
    ],
    ids=["not-yaml", "unknown-key", "wrong-type", "not-a-mapping"],
)
def test_check_config_rejects_a_bad_file_with_exit_2(
    tmp_path: Path, text: str, fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith("completions-proxy: "), result.stderr
    assert_one_message(result.stderr, str(path), *fragments)


def test_check_config_rejects_a_missing_file_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    result = run_cli("check-config", str(path))
    assert result.returncode == 2, result
    assert result.stderr.startswith("completions-proxy: "), result.stderr
    assert_one_message(result.stderr, "cannot read config file", str(path))


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("server:\n  port: 9000\n", encoding="utf-8")
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "port: 9000" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("check-config", "--bogus", "FILE"), ("unrecognized arguments: --bogus",)),
        (("serve", "--port", "eighty"), ("--port", "invalid int value")),
        (("serve", "--port", "70000"), ("server.port",)),
        (("serve", "--upstream", "ftp://127.0.0.1/v1"), ("upstream.url",)),
    ],
    ids=["unknown-flag", "port-not-a-number", "port-out-of-range", "upstream-not-http"],
)
def test_a_bad_flag_exits_2_with_one_message(
    tmp_path: Path, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    if args[0] == "serve":
        args = (*args, "--db", str(tmp_path / "x.db"))
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert_one_message(result.stderr, *fragments)
    assert not (tmp_path / "x.db").exists(), "a rejected serve created its database"


@pytest.mark.parametrize("command", ["serve", "export", "import", "usage"])
def test_a_file_that_is_not_a_database_exits_1_with_one_message(
    tmp_path: Path, command: str
) -> None:
    """The same way a database locked by another process past the busy timeout fails."""
    db = tmp_path / "notes.db"
    db.write_bytes(b"these are my notes, not a database\n" * 200)
    args = {
        "serve": ("serve", "--port", str(free_port()), "--db", str(db)),
        "export": ("export", "--db", str(db)),
        "import": ("import", "-", "--db", str(db)),
        "usage": ("usage", "--db", str(db)),
    }[command]
    result = run_cli(*args)
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr, result.stderr
    if command == "serve":  # the server logs JSON lines
        [line] = [orjson.loads(line) for line in result.stderr.splitlines()]
        assert line["level"] == "error"
        assert line["message"] == f"cannot open the store at {db}: file is not a database"
    else:
        assert result.stderr == "completions-proxy: the store failed: file is not a database\n"
    assert db.read_bytes() == b"these are my notes, not a database\n" * 200  # untouched
    assert not (tmp_path / "notes.db-lock").exists(), "the write lock's file was left beside it"


def test_serve_with_an_unknown_config_key_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("store:\n  path: x.db\n  fsync_everything: true\n", encoding="utf-8")
    port = free_port()
    result = run_cli(
        "serve", "--config", str(path), "--port", str(port), "--db", str(tmp_path / "x.db")
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith("completions-proxy: "), result.stderr
    assert_one_message(result.stderr, "store.fsync_everything", str(path))
    assert not (tmp_path / "x.db").exists(), "a rejected serve created its database"
