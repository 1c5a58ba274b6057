"""The ``completions-proxy`` command: the only module that prints or exits.

    completions-proxy serve [--config FILE] [--host HOST] [--port PORT] [--upstream URL] [--db PATH]
    completions-proxy check-config FILE

Flags override the config file. A bad config or flag ends with one readable message and
exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

import yaml
from aiohttp import web

from proxy import __version__
from proxy.app import create_app
from proxy.config import Config, ConfigError, load_config, redacted
from proxy.logs import configure

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
    return parser


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
        config = _serve_config(args)
        _check_secret(config)
    except ConfigError as error:
        sys.stderr.write(f"completions-proxy: {error}\n")
        return EXIT_USAGE
    return serve(config)
