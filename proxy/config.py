"""The configuration tree: YAML in, pydantic models out, unknown keys rejected.

Secrets never live in the file: a key such as ``callers.secret_env`` names the environment
variable that holds one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(Exception):
    """A configuration that cannot be used; the message is meant for a person."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    shutdown_timeout: float = Field(30.0, gt=0)


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
        return value.rstrip("/")


class StoreConfig(_Section):
    path: str = "./completions.db"
    synchronous: Literal["normal", "full"] = "normal"
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(256, ge=1)
    max_bytes: int | None = Field(None, ge=65536)


class CallersConfig(_Section):
    secret_env: str = "COMPLETIONS_PROXY_SECRET"  # noqa: S105 - a variable name, not a secret


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


class Config(_Section):
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    store: StoreConfig = StoreConfig()
    callers: CallersConfig = CallersConfig()
    replay: ReplayConfig = ReplayConfig()
    logging: LoggingConfig = LoggingConfig()

    def with_overrides(self, overrides: dict[str, dict[str, Any]]) -> Config:
        """A copy with the given section values replaced, validated like the file."""
        data = self.model_dump()
        for section, values in overrides.items():
            data[section].update({k: v for k, v in values.items() if v is not None})
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    return validate(data, source=str(path))


def redacted(config: Config) -> dict[str, Any]:
    """The config as a plain mapping, fit to print: names of secret variables, never values."""
    data = config.model_dump()
    name = config.callers.secret_env
    state = "set, value hidden" if os.environ.get(name) else "unset: a generated key in the db"
    data["callers"]["secret_env"] = f"{name} ({state})"
    return data
