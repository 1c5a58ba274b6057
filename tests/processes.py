"""The proxy as a real process: started, restarted on the same port and file, killed, reaped.

Everything here waits on something a test can observe (a process exit, a port, ``/healthz``),
never on a fixed sleep; polling uses a short interval and a deadline. ``stop()`` is the
teardown: it kills and reaps whatever still runs, so no test leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
POLL_INTERVAL = 0.02


class ProxyExited(RuntimeError):
    """The proxy process ended while a test was waiting for it to do something else."""


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def command() -> list[str]:
    """The ``completions-proxy`` command of this environment (``python -m proxy`` if absent)."""
    script = Path(sys.executable).with_name("completions-proxy")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy"]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``completions-proxy ARGS`` to its end; a process that outlives ``timeout`` is killed."""
    return subprocess.run(
        [*command(), *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ProxyProcess:
    """``completions-proxy serve`` on a fixed loopback port; ``start()`` again to restart."""

    def __init__(
        self,
        *,
        db: Path,
        upstream_url: str,
        log_path: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.db = db
        self.upstream_url = upstream_url
        self.log_path = log_path
        self.port = port if port is not None else free_port()
        self.extra_args = list(extra_args)
        self.popen: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def args(self) -> list[str]:
        return [
            *command(),
            "serve",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--upstream",
            self.upstream_url,
            "--db",
            str(self.db),
            *self.extra_args,
        ]

    def start(self) -> None:
        if self.popen is not None and self.popen.returncode is None:
            raise RuntimeError("the previous proxy process has not been reaped")
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts}: {' '.join(self.args())}\n".encode())
            log.flush()
            self.spawned_at = time.monotonic()
            self.popen = subprocess.Popen(
                self.args(),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def wait_healthy(self, timeout: float = 10.0) -> float:
        """Poll ``/healthz`` until it answers 200; returns the seconds from spawn to healthy."""
        deadline = time.monotonic() + timeout
        probe_timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=probe_timeout) as session:
            while True:
                if not self.running:
                    raise ProxyExited(f"the proxy exited before it was healthy\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + "/healthz") as response:
                        await response.read()
                        if response.status == 200:
                            return time.monotonic() - self.spawned_at
                if time.monotonic() > deadline:
                    raise TimeoutError(f"/healthz not 200 within {timeout} s\n{self.log_tail()}")
                await asyncio.sleep(POLL_INTERVAL)

    async def wait_not_listening(self, timeout: float = 10.0) -> None:
        """Until the port refuses connections: the proxy has stopped accepting new ones."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection(HOST, self.port)
            except ConnectionRefusedError:
                return
            except ConnectionResetError:
                pass  # closed with this connection still queued: the next try is refused
            else:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {self.port} still accepts connections after {timeout} s")
            await asyncio.sleep(POLL_INTERVAL)

    def send_signal(self, signum: signal.Signals) -> None:
        if self.popen is None:
            raise RuntimeError("the proxy was never started")
        self.popen.send_signal(signum)

    def kill(self) -> None:
        """``kill -9``."""
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: aiohttp's graceful shutdown."""
        self.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code (negative: killed by that signal); the event loop keeps running."""
        if self.popen is None:
            raise RuntimeError("the proxy was never started")
        return await asyncio.to_thread(self.popen.wait, timeout)

    def stop(self) -> None:
        """Teardown: kill the process if it still runs, and reap it."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no proxy log)"
        return "proxy log (tail):\n" + "\n".join(text.splitlines()[-lines:])
