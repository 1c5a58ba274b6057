"""The ``completions-proxy`` command: the only module that prints or exits.

    completions-proxy serve [--config FILE] [--host HOST] [--port PORT] [--upstream URL] [--db PATH]
    completions-proxy check-config FILE
    completions-proxy export [--db PATH] [--format jsonl|finetune] [--model M]
                             [--metadata k=v ...] [--since T] [--until T] [-o FILE]
    completions-proxy import FILE [--db PATH]

Flags override the config file. A bad config or flag ends with one readable message and
exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO

import yaml
from aiohttp import web

from proxy import __version__
from proxy.app import create_app
from proxy.config import Config, ConfigError, load_config, redacted
from proxy.logs import configure
from proxy.recordings import export_to, import_from
from proxy.store import ExportFilter, SQLiteStore

log = logging.getLogger("proxy")

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="completions-proxy",
        description="OpenAI-compatible logging proxy that captures and serves chat completions.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", metavar="FILE", help="YAML config file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--upstream", metavar="URL", help="upstream base URL, ending in /v1")
    serve.add_argument("--db", metavar="PATH", help="SQLite database file")
    serve.add_argument(
        "--replay",
        choices=("off", "strict", "fallback"),
        help="answer chat completions from recordings: strict never calls the upstream,"
        " fallback forwards and records what is not recorded",
    )

    check = commands.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("file", metavar="FILE")

    export = commands.add_parser("export", help="write stored completions as JSON lines")
    export.add_argument("--db", metavar="PATH", default="./completions.db")
    export.add_argument("--format", choices=("jsonl", "finetune"), default="jsonl")
    export.add_argument("--model", help="only completions asked of this model")
    export.add_argument(
        "--metadata",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        type=_pair,
        help="only completions with this metadata pair (repeatable, AND-ed)",
    )
    export.add_argument("--since", metavar="T", type=_moment, help="created at or after T")
    export.add_argument("--until", metavar="T", type=_moment, help="created before T")
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default stdout)")

    load = commands.add_parser("import", help="load a jsonl export (idempotent by id)")
    load.add_argument("file", metavar="FILE", help="a jsonl export, or - for stdin")
    load.add_argument("--db", metavar="PATH", default="./completions.db")
    return parser


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _moment(text: str) -> int:
    """Unix seconds, or an ISO 8601 date or date-time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected unix seconds or an ISO 8601 date, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


class _ProgressBar:
    """A one-line counter on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, verb: str) -> None:
        self._verb = verb
        self._started = time.monotonic()
        self._shown = 0.0
        self.enabled = sys.stderr.isatty()

    def __call__(self, count: int) -> None:
        now = time.monotonic()
        if now - self._shown < 0.2:
            return
        self._shown = now
        rate = count / max(now - self._started, 1e-9)
        sys.stderr.write(f"\r{self._verb} {count:,} rows ({rate:,.0f} rows/s)")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._shown:
            sys.stderr.write("\n")


async def _export(args: argparse.Namespace, out: IO[bytes]) -> int:
    store = SQLiteStore(args.db)
    await store.open()
    where = ExportFilter(
        model=args.model, metadata=tuple(args.metadata), since=args.since, until=args.until
    )
    bar = _ProgressBar("exported")
    try:
        count = await export_to(store, where, args.format, out, bar if bar.enabled else None)
        out.flush()
    finally:
        await store.close()
    bar.done()
    sys.stderr.write(f"exported {count} completions ({args.format})\n")
    return 0


async def _import(args: argparse.Namespace, source: IO[bytes]) -> int:
    store = SQLiteStore(args.db)
    await store.open()
    bar = _ProgressBar("read")
    try:
        report = await import_from(store, source, bar if bar.enabled else None)
    finally:
        await store.close()
    bar.done()
    if report.error_count:
        for number, message in report.errors:
            sys.stderr.write(f"{args.file}:{number}: {message}\n")
        if report.error_count > len(report.errors):
            sys.stderr.write(f"... and {report.error_count - len(report.errors)} more\n")
        sys.stderr.write(
            f"completions-proxy: {report.error_count} bad line(s); nothing was imported\n"
        )
        return 1
    sys.stderr.write(
        f"imported {report.inserted} new completions"
        f" ({report.skipped} already present) from {args.file}\n"
    )
    return 0


def _stream(
    path: str | None, mode: str, standard: IO[bytes]
) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A file to read or write, or the standard stream for None or ``-``."""
    if path is None or path == "-":
        return contextlib.nullcontext(standard)
    return open(path, mode)


def _serve_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return config.with_overrides(
        {
            "server": {"host": args.host, "port": args.port},
            "upstream": {"url": args.upstream},
            "store": {"path": args.db},
            "replay": {"mode": args.replay},
        }
    )


def _check_secret(config: Config) -> None:
    secret = os.environ.get(config.callers.secret_env)
    if secret is not None and len(secret.encode()) < 16:
        raise ConfigError(
            f"the environment variable {config.callers.secret_env} must hold at least 16 bytes"
        )


def _install_uvloop() -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(config: Config) -> int:
    configure(config.logging)
    _install_uvloop()
    app = create_app(config)
    log.info(
        "listening",
        extra={
            "host": config.server.host,
            "port": config.server.port,
            "upstream": config.upstream.url,
            "db": config.store.path,
        },
    )
    try:
        web.run_app(
            app,
            host=config.server.host,
            port=config.server.port,
            access_log=None,
            print=None,
            shutdown_timeout=config.server.shutdown_timeout,
            handler_cancellation=True,
        )
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            _check_secret(config)
            sys.stdout.write(yaml.safe_dump(redacted(config), sort_keys=False))
            return 0
        if args.command == "export":
            with _stream(args.output, "wb", sys.stdout.buffer) as out:
                return asyncio.run(_export(args, out))
        if args.command == "import":
            with _stream(args.file, "rb", sys.stdin.buffer) as source:
                return asyncio.run(_import(args, source))
        config = _serve_config(args)
        _check_secret(config)
    except OSError as error:
        sys.stderr.write(f"completions-proxy: {error.strerror}: {error.filename}\n")
        return 1
    except ConfigError as error:
        sys.stderr.write(f"completions-proxy: {error}\n")
        return EXIT_USAGE
    return serve(config)
