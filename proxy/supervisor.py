"""Several worker processes on one port, and the parent that supervises them.

``completions-proxy serve --workers N`` (or ``server.workers``) with N > 1 runs this module's
``supervise`` in the parent process, which

- binds the port once with ``SO_REUSEPORT`` and keeps that socket (bound, never listening)
  until it exits: an address in use is one error before any worker starts, port 0 is
  resolved once, and the port stays reserved while workers come and go;
- opens the store once and closes it, so migrations run once instead of racing N times;
- starts N workers, each a fresh ``python -m proxy serve-worker`` given the configuration
  as JSON on its stdin; each binds its own ``SO_REUSEPORT`` socket on the port, so the kernel
  spreads new connections over the workers that listen;
- waits for every worker to say on a pipe that it is ready, or why it cannot start; if one
  cannot, the others are stopped and ``supervise`` raises ``WorkersFailed`` with that reason;
- starts a new worker in place of one that exits while the server runs, and logs it; a slot
  whose worker keeps failing waits longer before each new start (1 s doubling to 30 s);
- on SIGTERM or SIGINT sends SIGTERM to every worker, each of which drains (aiohttp's graceful
  shutdown: in-flight requests finish and are stored, within ``server.shutdown_timeout``),
  then kills whatever outlives that by 10 s. Workers run in their own process groups, so a
  terminal's Ctrl-C reaches them once, through the parent.

A worker watches a pipe only the parent holds open: if the parent dies, even by ``kill -9``,
the pipe ends and the worker shuts down gracefully on its own.

Work that must happen once per server, not once per worker: retention and the SQLite
store's WAL checkpoints run in worker 0 only (a replacement for worker 0 takes them over).

Metrics: workers keep prometheus_client's multiprocess files in a directory the parent makes
(``PROMETHEUS_MULTIPROC_DIR``) and removes at exit, so ``/metrics``, whichever worker answers
it, reports the whole server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from prometheus_client import multiprocess

from proxy import server
from proxy.app import create_app
from proxy.config import Config, validate
from proxy.lifecycle import Lifecycle
from proxy.store import StoreError, open_store

log = logging.getLogger("proxy.supervisor")

READY = b"ready\n"
START_TIMEOUT = 60.0  # seconds a worker may take to open its store and start listening
KILL_GRACE = 10.0  # seconds past shutdown_timeout before a draining worker is killed
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
STEADY = 10.0  # a worker that ran this long before it exited is restarted at once
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkersFailed(Exception):
    """The workers could not be started; the message says why, for a person."""


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


@dataclass
class _Slot:
    """One worker position: its index, the process in it now, and how often it failed."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    backoff: float = 0.0
    watch: asyncio.Task[int] | None = field(default=None, repr=False)


class Supervisor:
    """The parent: starts, watches, restarts and stops the workers."""

    def __init__(self, config: Config, count: int, metrics_dir: str) -> None:
        self._config = config
        self._count = count
        self._metrics_dir = metrics_dir
        self._slots = [_Slot(index) for index in range(count)]
        self._stopping = asyncio.Event()
        self._life_read, self._life_write = os.pipe()  # the workers' parent-alive pipe
        os.set_inheritable(self._life_write, False)

    def _worker_config(self, index: int) -> bytes:
        data = self._config.model_dump(mode="json")
        if index != 0:  # retention and WAL checkpoints once per server, not once per worker
            data["retention"]["days"] = None
            data["store"]["sqlite"]["checkpoints"] = False
        return orjson.dumps(data)

    async def _spawn(self, slot: _Slot) -> str | None:
        """Start the worker of ``slot``; None when it is ready, else why it is not."""
        ready_read, ready_write = os.pipe()
        env = {**os.environ, MULTIPROC_ENV: self._metrics_dir}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "serve-worker",
                "--index",
                str(slot.index),
                "--ready-fd",
                str(ready_write),
                "--life-fd",
                str(self._life_read),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(ready_write, self._life_read),
                env=env,
                process_group=0,
            )
        finally:
            os.close(ready_write)
        slot.process = process
        slot.started = time.monotonic()
        slot.ready = False
        assert process.stdin is not None
        process.stdin.write(self._worker_config(slot.index))
        process.stdin.close()
        try:
            answer = await asyncio.wait_for(_read_all(ready_read), START_TIMEOUT)
        except TimeoutError:
            process.kill()
            return f"worker {slot.index} did not start within {START_TIMEOUT:g} s"
        finally:
            os.close(ready_read)
        if answer.startswith(READY):
            slot.ready = True
            return None
        reason = answer.decode(errors="replace").strip()
        return reason or f"worker {slot.index} exited with status {await process.wait()}"

    async def run(self) -> None:
        """Start every worker, serve until SIGTERM or SIGINT, then drain them all."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        try:
            reasons = await asyncio.gather(*(self._spawn(slot) for slot in self._slots))
            failed = next((reason for reason in reasons if reason is not None), None)
            if failed is not None:
                await self._stop_all()
                raise WorkersFailed(failed)
            log.info(
                "workers ready",
                extra={"workers": self._count, "pids": [self._pid(slot) for slot in self._slots]},
            )
            for slot in self._slots:
                slot.watch = asyncio.create_task(self._watch(slot))
            await self._stopping.wait()
            log.info("stopping workers", extra={"workers": self._count})
            for slot in self._slots:
                if slot.watch is not None:
                    slot.watch.cancel()
            await asyncio.gather(
                *(s.watch for s in self._slots if s.watch is not None), return_exceptions=True
            )
            await self._stop_all()
        finally:
            os.close(self._life_write)
            os.close(self._life_read)

    @staticmethod
    def _pid(slot: _Slot) -> int | None:
        return slot.process.pid if slot.process is not None else None

    async def _watch(self, slot: _Slot) -> int:
        """Restart the worker of ``slot`` each time it exits, until the server stops."""
        while True:
            assert slot.process is not None
            status = await slot.process.wait()
            pid = slot.process.pid
            _forget(self._metrics_dir, pid)
            if time.monotonic() - slot.started >= STEADY:
                slot.backoff = 0.0
            delay = slot.backoff  # at once the first time; longer while it keeps failing
            slot.backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, slot.backoff * 2))
            log.error(
                "worker exited; starting a new one",
                extra={
                    "worker": slot.index,
                    "pid": pid,
                    "status": _describe_status(status),
                    "delay_s": delay,
                },
            )
            await self._restart(slot, delay)

    async def _restart(self, slot: _Slot, delay: float) -> None:
        """Start a new worker in ``slot`` after ``delay`` seconds, however many tries it takes
        to make a process; a worker that then fails to start is seen exiting by ``_watch``."""
        while True:
            if delay:
                await asyncio.sleep(delay)
            try:
                reason = await self._spawn(slot)
            except OSError as error:  # no process could be made (out of memory, pids, ...)
                log.error(
                    "worker did not start",
                    extra={"worker": slot.index, "reason": f"cannot start a process: {error}"},
                )
                delay = slot.backoff
                slot.backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, slot.backoff * 2))
                continue
            if reason is not None:
                log.error("worker did not start", extra={"worker": slot.index, "reason": reason})
            else:
                log.info("worker ready", extra={"worker": slot.index, "pid": self._pid(slot)})
            return

    async def _stop_all(self) -> None:
        """SIGTERM to every worker; wait for them to drain; kill what outlives the grace."""
        running = [
            s.process for s in self._slots if s.process is not None and s.process.returncode is None
        ]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        grace = self._config.server.shutdown_timeout + KILL_GRACE
        waits = [asyncio.create_task(process.wait()) for process in running]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=grace)
        for process in running:
            if process.returncode is None:
                log.error("worker did not drain in time; killed", extra={"pid": process.pid})
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        if late:
            await asyncio.gather(*late)

    def drained(self) -> bool:
        """Whether every worker that was serving ended its drain cleanly (one still starting
        when the server stopped had nothing to drain)."""
        return all(
            s.process.returncode == 0 for s in self._slots if s.ready and s.process is not None
        )


def _describe_status(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit code {status}"


def _forget(metrics_dir: str, pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: totals never go down)."""
    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


async def _read_all(fd: int) -> bytes:
    """Everything written to a pipe until its writer closes it, without blocking the loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    os.set_blocking(fd, False)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(fd), "rb", buffering=0)
    )
    try:
        return await reader.read()
    finally:
        transport.close()


async def _prepare_store(config: Config) -> None:
    """Open the store once and close it: migrations run here, in one process."""
    store = await open_store(config.store.url, config.store)
    await store.close()


def supervise(config: Config) -> int:
    """Run ``config.server.worker_count()`` workers on one port until SIGTERM; the exit code.

    Raises ``WorkersFailed`` (workers could not start), ``OSError`` (the port cannot be bound)
    or ``StoreError`` (the store cannot be opened), each before serving anything.
    """
    count = config.server.worker_count()
    holder = reuse_port_socket(config.server.host, config.server.port)
    try:
        port = holder.getsockname()[1]
        config = config.with_overrides({"server": {"port": port}})
        asyncio.run(_prepare_store(config))
        metrics_dir = tempfile.mkdtemp(prefix="completions-proxy-metrics-")
        try:
            log.info(
                "listening",
                extra={
                    "host": config.server.host,
                    "port": port,
                    "upstream": config.upstream.url,
                    "db": config.store.path,
                    "workers": count,
                },
            )
            supervisor = Supervisor(config, count, metrics_dir)
            asyncio.run(supervisor.run())
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        holder.close()
    return 0 if supervisor.drained() else 1


# -- the worker's side -------------------------------------------------------------------------


def _tell(fd: int, message: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, message)
        os.close(fd)


def worker_config(data: bytes) -> Config:
    """The configuration the supervisor gave a worker on its stdin."""
    return validate(orjson.loads(data), source="the supervisor")


def worker_cpu(index: int) -> int:
    """The CPU worker ``index`` runs on with ``server.pin_workers``: round robin over the CPUs
    this process may use, inherited from the supervisor, so a replacement worker gets its
    slot's CPU again."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[index % len(cpus)]


def run_worker(config: Config, index: int, ready_fd: int, life_fd: int) -> int:
    """One worker: serve ``config`` on its own SO_REUSEPORT socket until SIGTERM.

    Says ``ready`` on ``ready_fd`` once it accepts connections, or one line saying why it
    cannot start; shuts down gracefully when ``life_fd`` (the parent's pipe) ends.
    """
    settings = config.server
    if settings.pin_workers:  # before any thread starts, so every thread inherits it
        cpu = worker_cpu(index)
        os.sched_setaffinity(0, {cpu})
        log.info("worker pinned", extra={"worker": index, "cpu": cpu})
    told = False
    try:
        try:
            sock = reuse_port_socket(settings.host, settings.port)
        except OSError as error:
            raise _CannotStart(
                f"cannot listen on {settings.host}:{settings.port}: {error.strerror}"
            ) from None
        app = create_app(config)

        async def started(_: web.Application) -> None:
            nonlocal told
            sock.listen(1024)
            told = True
            _tell(ready_fd, READY)
            loop = asyncio.get_running_loop()
            os.set_blocking(life_fd, False)

            def parent_gone() -> None:
                with contextlib.suppress(BlockingIOError):
                    if os.read(life_fd, 1):
                        return
                loop.remove_reader(life_fd)
                log.error("the supervisor is gone; shutting down", extra={"worker": index})
                os.kill(os.getpid(), signal.SIGTERM)

            loop.add_reader(life_fd, parent_gone)

        app.on_startup.append(started)
        Lifecycle(config, [settings.port], worker=index).attach(app)
        # The same runner as a single process: connection limits, header and body timeouts.
        server.run(app, settings, [sock])
    except _CannotStart as error:
        _tell(ready_fd, f"{error}\n".encode())
        return 1
    except StoreError as error:  # not a database, locked past the busy timeout, ...
        message = f"cannot open the store at {config.store.url}: {error}"
        if told:
            log.error("worker failed: %s", message, extra={"worker": index})
        else:
            _tell(ready_fd, f"{message}\n".encode())
        return 1
    except Exception as error:
        log.exception("worker failed", extra={"worker": index})
        if not told:  # once told, the descriptor is closed and its number may be reused
            _tell(ready_fd, f"worker {index} failed: {type(error).__name__}: {error}\n".encode())
        return 1
    return 0


class _CannotStart(Exception):
    """A worker cannot start for a reason its message says."""
