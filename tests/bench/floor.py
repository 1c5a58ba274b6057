"""The floor: a bare aiohttp passthrough, the least an aiohttp proxy can do per request.

    python -m tests.bench.floor --port PORT --upstream http://127.0.0.1:UPORT/v1 [--processes N]

Every ``/v1/*`` request goes to the upstream with the same method, path, body and
end-to-end headers; the answer comes back read by read, one write per read, bytes
untouched (``auto_decompress=False``). Nothing is parsed, captured or stored. Same event
loop (uvloop when installed) and connection limit (100) as the proxy's defaults.

``--processes N`` serves the port from N processes, each with its own ``SO_REUSEPORT``
socket, as ``completions-proxy serve --workers N`` does: this process and N - 1 children it
starts and stops with itself. It is the baseline for the proxy's workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _end_to_end(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP}


def make_app(upstream_url: str) -> web.Application:
    base = upstream_url.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
            auto_decompress=False,
        )
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        url = base + request.raw_path[len("/v1") :]
        async with app[SESSION].request(
            request.method, url, headers=_end_to_end(request.headers), data=body or None
        ) as upstream:
            headers = _end_to_end(upstream.headers)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            try:
                await response.prepare(request)
                while data := await upstream.content.readany():
                    await response.write(data)
                await response.write_eof()
            except ConnectionResetError:  # the client went away (wrk ends a timed run)
                upstream.close()
            return response

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream base URL ending in /v1")
    parser.add_argument("--processes", type=int, default=1, help="processes serving the port")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - optional, as in the proxy

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    children = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.bench.floor", "--host", args.host),
                *("--port", str(args.port), "--upstream", args.upstream, "--reuse-port"),
            ]
        )
        for _ in range(args.processes - 1)
    ]
    try:
        web.run_app(
            make_app(args.upstream),
            host=args.host,
            port=args.port,
            access_log=None,
            print=None,
            reuse_port=args.reuse_port or args.processes > 1,
        )
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(2)  # SIGINT: aiohttp's clean shutdown
        for child in children:
            child.wait()


if __name__ == "__main__":
    main()
