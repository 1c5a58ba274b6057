"""The ``completions-proxy`` command: the only module that prints or exits.

    completions-proxy serve [--config FILE] [--host HOST] [--port PORT] [--upstream URL] [--db PATH]
    completions-proxy check-config FILE
    completions-proxy export [--db PATH] [--format jsonl|finetune] [--model M]
                             [--metadata k=v ...] [--since T] [--until T] [-o FILE]
    completions-proxy import FILE [--db PATH]
    completions-proxy keys create NAME [--role member|admin] | keys list | keys revoke NAME
    completions-proxy usage [--since T] [--until T] [--group-by caller,model,day] [--json]
    completions-proxy prune [--days N]

Flags override the config file. A bad config or flag ends with one readable message and
exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO

import orjson
import yaml

from proxy import __version__, server
from proxy.app import create_app, redactor_of
from proxy.callers import new_key
from proxy.config import Config, ConfigError, load_config, redacted
from proxy.logs import configure
from proxy.models import parse_moment
from proxy.recordings import export_to, import_from
from proxy.store import ExportFilter, KeyExists, SQLiteStore
from proxy.usage import parse_groups, report, table

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

    keys = commands.add_parser("keys", help="manage proxy keys (auth.mode: keys)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_commands.add_parser("create", help="make a key; it is printed once")
    create.add_argument("name")
    create.add_argument("--role", choices=("member", "admin"), default="member")
    listing = keys_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("name")
    for sub in (create, listing, revoke):
        sub.add_argument("--db", metavar="PATH", default="./completions.db")

    usage = commands.add_parser("usage", help="tokens and cost per caller, model and day")
    usage.add_argument("--config", metavar="FILE", help="config with the price table")
    usage.add_argument("--db", metavar="PATH", help="database (default: the config's)")
    usage.add_argument("--since", metavar="T", type=_moment, help="created at or after T")
    usage.add_argument("--until", metavar="T", type=_moment, help="created before T")
    usage.add_argument(
        "--group-by", default="caller,model", type=_groups, metavar="caller,model,day"
    )
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")

    prune = commands.add_parser("prune", help="apply retention now and give space back")
    prune.add_argument("--config", metavar="FILE", help="config with retention.days")
    prune.add_argument("--db", metavar="PATH", help="database (default: the config's)")
    prune.add_argument("--days", type=float, help="keep this many days (default: the config's)")
    return parser


def _groups(text: str) -> list[str]:
    try:
        return parse_groups(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _moment(text: str) -> int:
    """Unix seconds, or an ISO 8601 date or date-time (UTC unless it says otherwise)."""
    try:
        return parse_moment(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected unix seconds or an ISO 8601 date, got {text!r}"
        ) from None


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


def _db_of(args: argparse.Namespace, config: Config) -> str:
    return str(args.db) if args.db else config.store.path


async def _keys(args: argparse.Namespace) -> int:
    store = SQLiteStore(args.db)
    await store.open()
    try:
        if args.keys_command == "create":
            key, key_id, key_hash = new_key()
            try:
                await store.create_key(args.name, args.role, key_id, key_hash)
            except KeyExists:
                sys.stderr.write(f"completions-proxy: a key named {args.name!r} exists\n")
                return 1
            sys.stdout.write(key + "\n")
            sys.stderr.write(
                f"created {args.role} key {args.name!r}: it is shown this once; only its hash"
                " is kept\n"
            )
            return 0
        if args.keys_command == "revoke":
            if not await store.revoke_key(args.name):
                sys.stderr.write(f"completions-proxy: no live key named {args.name!r}\n")
                return 1
            sys.stderr.write(f"revoked {args.name!r}\n")
            return 0
        rows = await store.list_keys()
    finally:
        await store.close()
    sys.stdout.write(f"{'name':<24} {'role':<7} {'key id':<14} {'created':<20} revoked\n")
    for row in rows:
        created = _when(row.created_at)
        revoked = _when(row.revoked_at) if row.revoked_at else "-"
        sys.stdout.write(f"{row.name:<24} {row.role:<7} {row.key_id:<14} {created:<20} {revoked}\n")
    return 0


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _usage(args: argparse.Namespace, config: Config) -> int:
    store = SQLiteStore(_db_of(args, config))
    await store.open()
    try:
        data = await report(store, args.since, args.until, args.group_by, config.prices)
    finally:
        await store.close()
    if args.json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        sys.stdout.write(table(data, args.group_by))
    return 0


async def _prune(args: argparse.Namespace, config: Config) -> int:
    days = args.days if args.days is not None else config.retention.days
    if days is None:
        raise ConfigError("prune needs --days or retention.days in the config")
    store = SQLiteStore(_db_of(args, config))
    await store.open()
    try:
        report = await store.prune(int(time.time() - days * 86400))
    finally:
        await store.close()
    sys.stderr.write(
        f"pruned {report.completions} completions and {report.exchanges} audit records older"
        f" than {days:g} days; {report.bytes_before:,} -> {report.bytes_after:,} bytes\n"
    )
    return 0


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


def _check_serve(config: Config) -> None:
    """What can only be checked with the environment: secrets present, rules compiling."""
    _check_secret(config)
    redactor_of(config)
    if config.auth.mode == "keys" and not os.environ.get(config.auth.upstream_key_env):
        raise ConfigError(
            f"auth.mode is keys, so the upstream key must be in {config.auth.upstream_key_env}"
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
        server.run(app, config.server)  # limits and timeouts of client connections
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    except sqlite3.Error as error:  # not a database, locked past the busy timeout, ...
        log.error("cannot open the store at %s: %s", config.store.path, error)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            _check_secret(config)
            redactor_of(config)
            sys.stdout.write(yaml.safe_dump(redacted(config), sort_keys=False))
            return 0
        if args.command == "keys":
            return asyncio.run(_keys(args))
        if args.command == "usage":
            return asyncio.run(_usage(args, load_config(args.config)))
        if args.command == "prune":
            return asyncio.run(_prune(args, load_config(args.config)))
        if args.command == "export":
            with _stream(args.output, "wb", sys.stdout.buffer) as out:
                return asyncio.run(_export(args, out))
        if args.command == "import":
            with _stream(args.file, "rb", sys.stdin.buffer) as source:
                return asyncio.run(_import(args, source))
        config = _serve_config(args)
        _check_serve(config)
    except OSError as error:
        sys.stderr.write(f"completions-proxy: {error.strerror}: {error.filename}\n")
        return 1
    except sqlite3.Error as error:  # not a database, locked past the busy timeout, ...
        sys.stderr.write(f"completions-proxy: the store failed: {error}\n")
        return 1
    except ConfigError as error:
        sys.stderr.write(f"completions-proxy: {error}\n")
        return EXIT_USAGE
    return serve(config)
