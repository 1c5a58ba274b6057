"""The upstream client's own cost: CPU time per request of aiohttp's ``ClientSession`` (as the
proxy configured it before) and of ``proxy.upstream_client.UpstreamClient``, each alone in
this process, against the bench's mock upstream started on another CPU.

    python -m tests.bench.client_cost                  # 20,000 requests a turn, 3 turns each
    python -m tests.bench.client_cost --requests 5000 --turns 2 --stream

Each turn sends the same POST (a plain answer, or a 50-chunk stream with ``--stream``) at 32
in flight and reads every answer whole; the clients alternate turn by turn. Prints this
process's CPU time per request and the requests per second of each turn. Not collected by
pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
from multidict import CIMultiDict

from proxy.upstream_client import UpstreamClient
from tests.bench.processes import on_uvloop

IN_FLIGHT = 32
BODY = (
    b'{"model":"gpt-4o-mini","store":true,"messages":[{"role":"user","content":'
    b'"Summarise in two sentences why a logging proxy must forward bytes unchanged."}]}'
)
HEADERS = {
    "Authorization": "Bearer sk-bench-0123456789abcdef",
    "Content-Type": "application/json",
    "Accept-Encoding": "identity",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def mock_upstream() -> Iterator[str]:
    """The bench's mock upstream on CPU 0 (this process moves to CPU 1 when there is one)."""
    port = _free_port()
    command = [sys.executable, "-m", "tests.bench.mock_upstream", "--port", str(port)]
    if (os.cpu_count() or 1) > 1:
        command = ["taskset", "-c", "0", *command]
        os.sched_setaffinity(0, {1})
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)  # a process starting up: no event to wait on
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait()


async def timed(send: Callable[[], Awaitable[int]], requests: int) -> tuple[float, float]:
    """(CPU microseconds per request, requests per second) of ``requests`` sends."""
    for _ in range(200):  # connections opened and code warm before the clock starts
        await send()
    left = requests

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await send()

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    cpu, seconds = time.process_time() - cpu, time.perf_counter() - started
    return cpu / requests * 1e6, requests / seconds


async def session_turn(base: str, body: bytes, requests: int) -> tuple[float, float]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=100),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    )
    url = base + "/chat/completions"

    async def send() -> int:
        async with session.request("POST", url, headers=HEADERS, data=body) as answer:
            size = 0
            while data := await answer.content.readany():
                size += len(data)
            return size

    try:
        return await timed(send, requests)
    finally:
        await session.close()


async def client_turn(base: str, body: bytes, requests: int) -> tuple[float, float]:
    client = UpstreamClient(base)
    target = client.target("/chat/completions")

    async def send() -> int:
        answer = await client.request("POST", target, CIMultiDict(HEADERS), body)
        async with answer:
            size = 0
            while data := await answer.readany():
                size += len(data)
            return size

    try:
        return await timed(send, requests)
    finally:
        await client.close()


async def main_async(args: argparse.Namespace) -> None:
    body = BODY.replace(b'"store":true', b'"store":true,"stream":true') if args.stream else BODY
    turns: dict[str, list[tuple[float, float]]] = {"ClientSession": [], "UpstreamClient": []}
    with mock_upstream() as base:
        for _ in range(args.turns):
            turns["ClientSession"].append(await session_turn(base, body, args.requests))
            turns["UpstreamClient"].append(await client_turn(base, body, args.requests))
    for name, runs in turns.items():
        cpu = statistics.median(c for c, _ in runs)
        rate = statistics.median(r for _, r in runs)
        print(
            f"{name:<15} {cpu:7.1f} us of CPU per request (median; turns"
            f" {[round(c, 1) for c, _ in runs]}), {rate:,.0f} req/s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="timed, per turn")
    parser.add_argument("--turns", type=int, default=3, help="turns of each client")
    parser.add_argument("--stream", action="store_true", help="50-chunk streams, not plain")
    args = parser.parse_args()
    on_uvloop(main_async(args))


if __name__ == "__main__":
    main()
