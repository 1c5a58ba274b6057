"""The ``completions-proxy`` command: the only module that prints or exits.

    completions-proxy serve [--host HOST] [--port PORT] [--upstream URL]
                            [--replay off|strict|fallback] [--workers N|auto] [STORE]
    completions-proxy check-config FILE
    completions-proxy export [--format jsonl|finetune] [--model M]
                             [--metadata k=v ...] [--since T] [--until T] [-o FILE] [STORE]
    completions-proxy import FILE [STORE]
    completions-proxy keys create NAME [--role member|admin] | keys list | keys revoke NAME [STORE]
    completions-proxy usage [--since T] [--until T] [--group-by caller,model,day] [--json] [STORE]
    completions-proxy prune [--days N] [--dry-run] [--yes] [STORE]
    completions-proxy health [--config FILE] [--host HOST] [--port PORT] [--pid N] [--timeout S]

STORE is ``--config FILE --db URL_OR_PATH``, the same for every command: the store is
``--db`` if given, else the config's ``store.url`` (default ``./completions.db``), opened with
the config's store settings. ``--db`` is a SQLite file path or a ``postgresql://`` URL.
Commands that change nothing, and those that cannot act on an empty store (``keys revoke``,
``prune``), refuse a store that does not exist rather than create one.

Flags override the config file. A bad config or flag ends with one readable message and
exit code 2; a store that cannot be opened, with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import math
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import orjson
import yaml

from proxy import __version__, server
from proxy.admin_keys import NAME_RULE, check_name
from proxy.app import create_app, prune_cutoff, redactor_of
from proxy.callers import new_key
from proxy.config import Config, ConfigError, load_config, redacted, without_password
from proxy.errors import InvalidRequest
from proxy.lifecycle import Lifecycle
from proxy.logs import configure
from proxy.models import PageQuery, parse_moment
from proxy.recordings import export_to, import_from
from proxy.store import ExportFilter, KeyExists, Store, StoreError, StoreMissing, open_store
from proxy.supervisor import WorkersFailed, run_worker, supervise, worker_config
from proxy.usage import parse_groups, report, table

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

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
    _store_flags(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--upstream", metavar="URL", help="upstream base URL, ending in /v1")
    serve.add_argument(
        "--workers",
        metavar="N",
        help="processes serving the port (default 1; auto: one per CPU)",
    )
    serve.add_argument(
        "--replay",
        choices=("off", "strict", "fallback"),
        help="answer chat completions from recordings: strict never calls the upstream,"
        " fallback forwards and records what is not recorded",
    )

    # Started by the supervisor of ``serve --workers N``, not by people: no help line.
    worker = commands.add_parser("serve-worker")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--ready-fd", type=int, required=True)
    worker.add_argument("--life-fd", type=int, required=True)

    check = commands.add_parser(
        "check-config",
        help="validate a config file as serve would (environment included) and print it",
    )
    check.add_argument("file", metavar="FILE")

    export = commands.add_parser("export", help="write stored completions as JSON lines")
    _store_flags(export)
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
    _store_flags(load)

    keys = commands.add_parser("keys", help="manage proxy keys (auth.mode: keys)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_commands.add_parser("create", help="make a key; it is printed once")
    create.add_argument("name", type=_key_name)
    create.add_argument("--role", choices=("member", "admin"), default="member")
    listing = keys_commands.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("name")
    for sub in (create, listing, revoke):
        _store_flags(sub)

    usage = commands.add_parser("usage", help="tokens and cost per caller, model and day")
    _store_flags(usage, config="config with the store and the price table")
    usage.add_argument("--since", metavar="T", type=_moment, help="created at or after T")
    usage.add_argument("--until", metavar="T", type=_moment, help="created before T")
    usage.add_argument(
        "--group-by", default="caller,model", type=_groups, metavar="caller,model,day"
    )
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")

    health = commands.add_parser(
        "health",
        help="exit 0 when a running proxy's /healthz answers 200 (the image's health check)",
    )
    health.add_argument("--config", metavar="FILE", help="the config serve was given")
    health.add_argument("--host", help="the address serve listens on")
    health.add_argument("--port", type=int, help="the port serve listens on")
    health.add_argument(
        "--pid",
        type=int,
        default=1,
        help="without --config, --host or --port: follow this process's serve command, if it"
        " is one (default 1, a container's main process)",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (3)")

    prune = commands.add_parser("prune", help="apply retention now and give space back")
    _store_flags(prune, config="config with the store and retention.days")
    prune.add_argument("--days", type=_days, help="keep this many days (default: the config's)")
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    prune.add_argument(
        "--yes", action="store_true", help="delete even when that is everything stored, unasked"
    )
    return parser


def _store_flags(parser: argparse.ArgumentParser, config: str = "YAML config file") -> None:
    """The ``--config FILE --db URL_OR_PATH`` pair every command that opens the store takes."""
    parser.add_argument("--config", metavar="FILE", help=config)
    parser.add_argument(
        "--db",
        metavar="URL_OR_PATH",
        help="the store: a SQLite file or a postgresql:// URL"
        " (default: the config's store.url, ./completions.db)",
    )


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


def _key_name(text: str) -> str:
    """A new key's name, by the rule ``POST /admin/keys`` applies, so both make the same keys."""
    try:
        return check_name(text)
    except InvalidRequest:
        raise argparse.ArgumentTypeError(f"{NAME_RULE}; got {text!r}") from None


def _days(text: str) -> float:
    """A number of days above 0, as ``retention.days`` takes: never nan, infinite or negative."""
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not (days > 0 and math.isfinite(days)):
        raise argparse.ArgumentTypeError(f"expected a number of days above 0, got {text!r}")
    return days


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


@contextlib.asynccontextmanager
async def _opened(
    args: argparse.Namespace, config: Config, *, must_exist: bool
) -> AsyncIterator[Store]:
    """The store ``--db`` (else the config) names, open for the block."""
    store = await open_store(_db_of(args, config), config.store, must_exist=must_exist)
    try:
        yield store
    finally:
        await store.close()


async def _export(args: argparse.Namespace, config: Config, out: IO[bytes]) -> int:
    where = ExportFilter(
        model=args.model, metadata=tuple(args.metadata), since=args.since, until=args.until
    )
    bar = _ProgressBar("exported")
    async with _opened(args, config, must_exist=True) as store:
        count = await export_to(store, where, args.format, out, bar if bar.enabled else None)
        out.flush()
    bar.done()
    sys.stderr.write(f"exported {count} completions ({args.format})\n")
    return 0


class _Prefixed(io.RawIOBase):
    """``head`` then the rest of ``rest``: a pipe whose first line was read, read whole."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._head[: len(view)] if self._head else self._rest.read(len(view))
        self._head = self._head[len(data) :]
        view[: len(data)] = data
        return len(data)


def _first_line(source: IO[bytes]) -> tuple[bytes, IO[bytes]]:
    """The first line of ``source``, and the source to read from its start: rewound when it
    can be, else (a pipe) the line handed back before the rest."""
    first = source.readline(1 << 20)
    if source.seekable():
        source.seek(0)
        return first, source
    return first, io.BufferedReader(_Prefixed(first, source), 1 << 20)


def _is_finetune_line(first: bytes) -> bool:
    """Whether an import's first line is a fine-tuning example rather than a record."""
    try:
        line = orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return isinstance(line, dict) and "messages" in line and "response" not in line


async def _import(args: argparse.Namespace, config: Config, source: IO[bytes]) -> int:
    first, source = _first_line(source)
    if _is_finetune_line(first):
        sys.stderr.write(
            f"completions-proxy: {args.file} is in the fine-tuning format (export --format"
            " finetune), which keeps no ids or answers to import; import takes the jsonl"
            " export format (export --format jsonl, the default)\n"
        )
        return 1
    bar = _ProgressBar("read")
    async with _opened(args, config, must_exist=False) as store:
        report = await import_from(store, source, bar if bar.enabled else None)
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
    return str(args.db) if args.db else config.store.url


async def _keys(args: argparse.Namespace, config: Config) -> int:
    async with _opened(args, config, must_exist=args.keys_command != "create") as store:
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
    sys.stdout.write(f"{'name':<24} {'role':<7} {'key id':<14} {'created':<20} revoked\n")
    for row in rows:
        created = _when(row.created_at)
        revoked = _when(row.revoked_at) if row.revoked_at else "-"
        sys.stdout.write(f"{row.name:<24} {row.role:<7} {row.key_id:<14} {created:<20} {revoked}\n")
    return 0


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _usage(args: argparse.Namespace, config: Config) -> int:
    async with _opened(args, config, must_exist=True) as store:
        data = await report(store, args.since, args.until, args.group_by, config.prices)
    if args.json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        sys.stdout.write(table(data, args.group_by))
    return 0


async def _prunable(store: Store, before: int) -> tuple[int, int, bool]:
    """What pruning at ``before`` would delete: completions, audit records of exchanges, and
    whether that is everything stored."""
    older = await store.usage(None, before, [])
    stored = await store.usage(None, None, [])
    completions = older[0].completions if older else 0
    everything = completions == (stored[0].completions if stored else 0)
    exchanges, after = 0, None
    while True:  # oldest first, until the first one to keep
        page = await store.list_exchanges(None, PageQuery(after=after, limit=100))
        for exchange in page.items:
            if exchange.created >= before:
                return completions, exchanges, False
            exchanges += 1
            after = exchange.request_id
        if not page.has_more:
            return completions, exchanges, everything


async def _prune(args: argparse.Namespace, config: Config) -> int:
    days = args.days if args.days is not None else config.retention.days
    if days is None:
        raise ConfigError("prune needs --days or retention.days in the config")
    before = prune_cutoff(days, time.time())
    async with _opened(args, config, must_exist=True) as store:
        completions, exchanges, everything = await _prunable(store, before)
        what = f"{completions} completions and {exchanges} audit records older than {days:g} days"
        if args.dry_run:
            everything_note = (
                " (everything stored)" if everything and completions + exchanges else ""
            )
            sys.stderr.write(f"would prune {what}{everything_note}; nothing was deleted\n")
            return 0
        if everything and completions + exchanges and not args.yes:
            if not sys.stdin.isatty():
                sys.stderr.write(
                    f"completions-proxy: prune would delete everything stored ({what});"
                    " pass --yes to do it without a terminal\n"
                )
                return 1
            sys.stderr.write(f"This deletes everything stored: {what}. Delete? [y/N] ")
            sys.stderr.flush()
            answer = await asyncio.to_thread(sys.stdin.readline)
            if answer.strip().lower() not in ("y", "yes"):
                sys.stderr.write("nothing was deleted\n")
                return 1
        report = await store.prune(before)
    size = ""
    if report.bytes_before is not None and report.bytes_after is not None:
        size = f"; {report.bytes_before:,} -> {report.bytes_after:,} bytes"
    sys.stderr.write(
        f"pruned {report.completions} completions and {report.exchanges} audit records older"
        f" than {days:g} days{size}\n"
    )
    return 0


def _serve_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return config.with_overrides(
        {
            "server": {"host": args.host, "port": args.port, "workers": args.workers},
            "upstream": {"url": args.upstream},
            "store": {"url": args.db},
            "replay": {"mode": args.replay},
        }
    )


def _serve_command_of(pid: int) -> Config | None:
    """The configuration of process ``pid`` when it is ``completions-proxy serve``, else None.

    Its command line is parsed as ``serve`` would parse it, and a relative ``--config`` is
    read from that process's working directory.
    """
    try:
        argv = [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, UnicodeDecodeError):
        return None
    for start, part in enumerate(argv):
        if Path(part).name == "completions-proxy" or argv[start - 1 : start + 1] == ["-m", "proxy"]:
            words = [word for word in argv[start + 1 :] if word]
            break
    else:
        return None
    if not words or words[0] != "serve":
        return None
    try:
        parsed = _parser().parse_args(words)
    except SystemExit:
        return None
    if parsed.config:
        parsed.config = str(Path(cwd, parsed.config))
    return _serve_config(parsed)


def _health(args: argparse.Namespace) -> int:
    config = None
    if args.config is None and args.host is None and args.port is None:
        config = _serve_command_of(args.pid)
    if config is None:
        config = load_config(args.config).with_overrides(
            {"server": {"host": args.host, "port": args.port}}
        )
    host = config.server.host
    if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind is probed on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{config.server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        sys.stderr.write(f"completions-proxy: {url}: {reason}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"completions-proxy: {url} answered {status}\n")
        return 1
    return 0


def _check_serve(config: Config) -> None:
    """What can only be checked with the environment: secrets present, rules compiling."""
    _check_secret(config)
    redactor_of(config)
    if config.auth.mode == "keys" and not os.environ.get(config.auth.upstream_key_env):
        raise ConfigError(
            f"auth.mode is keys, so the upstream key must be in {config.auth.upstream_key_env}"
        )
    if config.server.worker_count() > 1 and config.store.url in (":memory:", "sqlite://:memory:"):
        raise ConfigError(
            "several workers need a store they share: a database file or PostgreSQL,"
            " not :memory: (each worker would have its own)"
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


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, bound now, so that a port in use
    fails before the proxy opens its store or says it is listening."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    sockets: list[socket.socket] = []
    bound: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in bound:
                continue
            bound.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def serve(config: Config) -> int:
    configure(config.logging)
    if config.server.worker_count() > 1:
        return _supervise(config)
    _install_uvloop()
    try:
        sockets = _bind(config.server.host, config.server.port)
    except OSError as error:
        log.error(
            "cannot listen on %s port %d: %s",
            config.server.host,
            config.server.port,
            error.strerror or error,
        )
        return 1
    app = create_app(config)
    Lifecycle(config, [sock.getsockname()[1] for sock in sockets]).attach(app)
    try:
        server.run(app, config.server, sockets)  # limits and timeouts of client connections
    except OSError as error:
        log.error("cannot start: %s", error)
        return 1
    except StoreError as error:  # not a database, locked past the busy timeout, ...
        log.error("cannot open the store at %s: %s", without_password(config.store.url), error)
        return 1
    finally:
        for sock in sockets:
            sock.close()
    return 0


def _supervise(config: Config) -> int:
    try:
        return supervise(config)
    except WorkersFailed as error:
        sys.stderr.write(f"completions-proxy: workers cannot start: {error}\n")
    except OSError as error:
        sys.stderr.write(
            f"completions-proxy: cannot listen on {config.server.host}:{config.server.port}:"
            f" {error.strerror}\n"
        )
    except StoreError as error:  # not a database, locked past the busy timeout, ...
        sys.stderr.write(
            f"completions-proxy: cannot open the store at {config.store.url}: {error}\n"
        )
    return 1


def _serve_worker(args: argparse.Namespace) -> int:
    config = worker_config(sys.stdin.buffer.read())
    configure(config.logging)
    _install_uvloop()
    return run_worker(config, args.index, args.ready_fd, args.life_fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve-worker":
            return _serve_worker(args)
        if args.command == "check-config":
            config = load_config(args.file)
            _check_serve(config)
            sys.stdout.write(yaml.safe_dump(redacted(config), sort_keys=False))
            return 0
        if args.command == "health":
            return _health(args)
        if args.command == "keys":
            return asyncio.run(_keys(args, load_config(args.config)))
        if args.command == "usage":
            return asyncio.run(_usage(args, load_config(args.config)))
        if args.command == "prune":
            return asyncio.run(_prune(args, load_config(args.config)))
        if args.command == "export":
            config = load_config(args.config)
            with _stream(args.output, "wb", sys.stdout.buffer) as out:
                return asyncio.run(_export(args, config, out))
        if args.command == "import":
            config = load_config(args.config)
            with _stream(args.file, "rb", sys.stdin.buffer) as source:
                return asyncio.run(_import(args, config, source))
        config = _serve_config(args)
        _check_serve(config)
    except OSError as error:
        sys.stderr.write(f"completions-proxy: {error.strerror}: {error.filename}\n")
        return 1
    except StoreMissing as error:
        sys.stderr.write(f"completions-proxy: {error}\n")
        return 1
    except StoreError as error:  # not a database, locked past the busy timeout, ...
        sys.stderr.write(f"completions-proxy: the store failed: {error}\n")
        return 1
    except ConfigError as error:
        sys.stderr.write(f"completions-proxy: {error}\n")
        return EXIT_USAGE
    return serve(config)
