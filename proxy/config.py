"""The configuration tree: YAML in, pydantic models out, unknown keys rejected.

Secrets never live in the file: a key such as ``callers.secret_env`` names the environment
variable that holds one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL


class ConfigError(Exception):
    """A configuration that cannot be used; the message is meant for a person."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    shutdown_timeout: float = Field(30.0, gt=0)
    # A client must send a whole request head within header_timeout (also the idle time of a
    # kept-alive connection) and a whole body within body_timeout; past max_connections open
    # client connections, new ones get a 503 and are closed.
    header_timeout: float = Field(30.0, gt=0)
    body_timeout: float = Field(60.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    # Processes serving the port; "auto" is one per CPU this process may run on.
    workers: int | Literal["auto"] = 1
    # With several workers, worker i and all its threads run on the i-th CPU this process may
    # use (round robin): its event loop and store writer then hand the GIL to each other on
    # one CPU instead of across two. Off by default: on a machine busy with other work a
    # pinned worker cannot move to an idle CPU. A single process is never pinned.
    pin_workers: bool = False

    @field_validator("workers")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1, or auto")
        return value

    def worker_count(self) -> int:
        """The number of worker processes, with ``auto`` resolved on this machine."""
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return self.workers


class UpstreamConfig(_Section):
    url: str = "https://api.openai.com/v1"
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(600.0, gt=0)
    max_connections: int = Field(100, ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        url = URL(value)
        if not url.raw_host:
            raise ValueError("must name a host")
        if url.raw_user is not None or url.raw_query_string or url.raw_fragment:
            raise ValueError("must hold a scheme, host, port and path only (no user or query)")
        return value.rstrip("/")


class SQLiteSettings(_Section):
    synchronous: Literal["normal", "full"] = "normal"
    max_bytes: int | None = Field(None, ge=65536)
    # false: another process on the same file copies the WAL into it (serve --workers sets
    # this for every worker but the first, so a file has one checkpointer).
    checkpoints: bool = True


class PostgresSettings(_Section):
    pool_min: int = Field(2, ge=0)
    pool_max: int = Field(10, ge=1)
    connect_timeout: float = Field(10.0, gt=0)  # seconds to open a connection
    statement_timeout: float = Field(30.0, gt=0)  # seconds a statement may run

    @model_validator(mode="after")
    def _pool_bounds(self) -> PostgresSettings:
        if self.pool_min > self.pool_max:
            raise ValueError("pool_min must not exceed pool_max")
        return self


# Keys of the store section that moved: each old name is still read, as its new place.
_STORE_MOVED = {
    "path": ("url",),
    "synchronous": ("sqlite", "synchronous"),
    "max_bytes": ("sqlite", "max_bytes"),
}


class StoreConfig(_Section):
    """``url``: a SQLite file path (or ``sqlite:///path``) or a ``postgresql://`` URL."""

    url: str = "./completions.db"
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(256, ge=1)
    # Full-text search over prompts and answers. false: nothing is indexed as it is written
    # and searches are refused; turned back on, the store indexes what was written
    # meanwhile when it opens.
    search: bool = True
    sqlite: SQLiteSettings = SQLiteSettings()
    postgres: PostgresSettings = PostgresSettings()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """``store.path``, ``store.synchronous`` and ``store.max_bytes`` are the old names of
        ``store.url``, ``store.sqlite.synchronous`` and ``store.sqlite.max_bytes``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for old, new in _STORE_MOVED.items():
            if old not in data:
                continue
            value = data.pop(old)
            if value is None:
                continue
            section = data
            if len(new) == 2:
                inner = section.get(new[0])
                section = dict(inner) if isinstance(inner, dict) else {}
                data[new[0]] = section
            if section.get(new[-1]) not in (None, value):
                place = ".".join(new)
                raise ValueError(f"{old} is the old name of store.{place}: give only one")
            section[new[-1]] = value
        return data

    @property
    def path(self) -> str:
        """The old name of ``url``, for code that read it."""
        return self.url


class CallersConfig(_Section):
    secret_env: str = "COMPLETIONS_PROXY_SECRET"  # noqa: S105 - a variable name, not a secret


class AuthConfig(_Section):
    mode: Literal["passthrough", "keys"] = "passthrough"
    upstream_key_env: str = "OPENAI_API_KEY"
    key_cache_seconds: float = Field(2.0, ge=0)
    # Keys mode: "METHOD /path" routes below /v1 forwarded with the team key (``*`` is one
    # path segment, a final ``**`` the rest; METHOD may be ``*``); everything else is a 403.
    forward: list[str] = [
        "GET /models",
        "GET /models/*",
        "POST /embeddings",
        "POST /moderations",
        "POST /completions",
        "POST /audio/speech",
        "POST /audio/transcriptions",
        "POST /audio/translations",
        "POST /images/generations",
    ]
    admin_forward: list[str] = []  # routes only admins' keys may use, on top of ``forward``
    # Client headers that re-target the team key, dropped in keys mode unless listed here.
    forward_headers: list[str] = []

    @field_validator("forward", "admin_forward")
    @classmethod
    def _routes(cls, value: list[str]) -> list[str]:
        for route in value:
            method, _, path = route.partition(" ")
            if not method or not path.startswith("/") or " " in path.strip():
                raise ValueError(f"expected 'METHOD /path', got {route!r}")
        return value


class CaptureConfig(_Section):
    policy: Literal["requested", "all"] = "requested"
    failed_body_bytes: int = Field(65536, ge=0)
    # An answer larger than this (after decompression) is relayed in full but not kept.
    max_answer_bytes: int = Field(32 * 1024 * 1024, ge=1024)


class RedactionConfig(_Section):
    builtin: list[str] | None = None  # None: every ready pattern
    patterns: dict[str, str] = {}


class AuditConfig(_Section):
    delete_purges: bool = True


class RetentionConfig(_Section):
    days: float | None = Field(None, gt=0, allow_inf_nan=False)
    interval_hours: float = Field(1.0, gt=0, allow_inf_nan=False)


class Price(_Section):
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)


class MetricsConfig(_Section):
    enabled: bool = True
    # auto: an admin proxy key with auth.mode keys (callers are people's key names there),
    # open otherwise (callers are token fingerprints); open or admin to choose.
    access: Literal["auto", "open", "admin"] = "auto"
    caller_label: bool = True


class ReplayConfig(_Section):
    mode: Literal["off", "strict", "fallback"] = "off"
    shared: bool = False

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


class ConsoleConfig(_Section):
    enabled: bool = True
    session_hours: float = Field(12.0, gt=0, le=24 * 30)


class Config(_Section):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    store: StoreConfig = StoreConfig()
    callers: CallersConfig = CallersConfig()
    auth: AuthConfig = AuthConfig()
    capture: CaptureConfig = CaptureConfig()
    redaction: RedactionConfig = RedactionConfig()
    audit: AuditConfig = AuditConfig()
    retention: RetentionConfig = RetentionConfig()
    prices: dict[str, Price] = {}
    metrics: MetricsConfig = MetricsConfig()
    replay: ReplayConfig = ReplayConfig()
    logging: LoggingConfig = LoggingConfig()
    console: ConsoleConfig = ConsoleConfig()

    @model_validator(mode="after")
    def _admins_exist(self) -> Config:
        if self.metrics.access == "admin" and self.auth.mode != "keys":
            raise ValueError(
                "metrics.access: admin needs auth.mode: keys (passthrough callers are never"
                " admins); use open, or auto"
            )
        return self

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> Config:
        """A copy with the given section values replaced, validated like the file."""
        data = self.model_dump()
        for section, values in overrides.items():
            data[section].update({k: v for k, v in values.items() if v is not None})
        for section in ("prices",):
            data[section] = {k: v for k, v in data[section].items()}
        return validate(data, source="command line")


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def validate(data: Any, *, source: str) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_config(path: str | Path | None) -> Config:
    """Read a YAML file into a Config; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (the byte at offset {error.start})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    return validate(data, source=str(path))


def without_password(url: str) -> str:
    """A store URL fit to print or log: a ``postgresql://`` URL's password is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def redacted(config: Config) -> dict[str, Any]:
    """The config as a plain mapping, fit to print: names of secret variables, never values."""
    data = config.model_dump()
    upstream_key = config.auth.upstream_key_env
    shown = "set, value hidden" if os.environ.get(upstream_key) else "unset"
    data["auth"]["upstream_key_env"] = f"{upstream_key} ({shown})"
    name = config.callers.secret_env
    state = "set, value hidden" if os.environ.get(name) else "unset: portable fingerprints"
    data["callers"]["secret_env"] = f"{name} ({state})"
    data["store"]["url"] = without_password(config.store.url)
    return data
