"""Structured logs: one JSON object per line, access records included.

Every field is encoded by orjson, so CR, LF, ANSI escapes or U+2028 in any input end up
escaped inside a JSON string: no input can split a line or forge another one. Bearer tokens
never reach a log; callers appear as their fingerprint.

Every record, the libraries' included (aiohttp logs raw header lines it cannot parse), goes
through ``SecretFilter`` before it is written: anything shaped like a bearer token or an API
key is replaced in the message, its extra fields and its traceback. ``RepeatFilter`` writes
an identical warning or error once per ``window`` seconds; the next one written says how
many were left out (``repeated``), so a flood of one failure cannot flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from dataclasses import dataclass, fields
from typing import Any

import orjson

from proxy.config import LoggingConfig
from proxy.outcome import Outcome, OutcomeSet

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = head(record.created, record.levelname.lower(), record.name, record.getMessage())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_text:  # already formatted (and cleaned by SecretFilter)
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json_line(entry)


# Bearer tokens, OpenAI-style keys (sk-...), the proxy's own keys (cpk_...), and the value of
# any header line naming a key or authorization.
_SECRET = re.compile(
    r"(?i)(bearer\s+)[^\s'\"\\,;]+"
    r"|\b(?:sk|cpk)[-_][A-Za-z0-9_\-]{6,}"
    r"|((?:authorization|api[-_]key|x-api-key|cookie)\s*[:=]\s*)[^\r\n'\"\\]+"
)
# Substring checks before the regular expression: a case-insensitive alternation is slow in
# ``re``, and almost no line holds any of these.
_HINTS = ("bearer", "sk-", "sk_", "cpk_", "authorization", "api-key", "api_key", "cookie")
REDACTED = "[redacted]"


def scrub(text: str) -> str:
    """``text`` with every token-shaped part replaced."""
    lowered = text.lower()
    if not any(hint in lowered for hint in _HINTS):  # most lines: nothing to do
        return text
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2) or "") + REDACTED, text)


class SecretFilter(logging.Filter):
    """Cleans every record of token-shaped text: message, extra fields and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned is not message or record.args:
            record.msg, record.args = cleaned, None
        for key, value in record.__dict__.items():
            if key not in _STANDARD and isinstance(value, str | bytes):
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                if (clean := scrub(text)) != text:
                    record.__dict__[key] = clean
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


_FORMATTER = logging.Formatter()
_PER_REQUEST = frozenset({"request_id", "repeated"})


class RepeatFilter(logging.Filter):
    """One line per identical warning or error (same logger, level, message template,
    exception type and extra fields but the request id) per ``window`` seconds; the next one
    written carries ``repeated``. A line naming what it is about (a completion's id, say) is
    never identical to another, so nothing that must be logged one by one is folded."""

    def __init__(self, window: float = 10.0, remembered: int = 1024) -> None:
        super().__init__()
        self.window = window
        self.remembered = remembered
        self._seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [first written, left out]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = record.exc_info[0] if record.exc_info else None
        extra = tuple(
            (k, str(v))
            for k, v in record.__dict__.items()
            if k not in _STANDARD and k not in _PER_REQUEST
        )
        key = (record.name, record.levelno, str(record.msg), kind, extra)
        seen = self._seen.get(key)
        if seen is not None and record.created - seen[0] < self.window:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.repeated = int(seen[1])
        if len(self._seen) >= self.remembered:
            self._seen.clear()  # bounded memory; at worst one more line per kind
        self._seen[key] = [record.created, 0]
        return True


def head(created: float, level: str, logger: str, message: str) -> dict[str, Any]:
    """The fields every JSON log line starts with, in their order."""
    return {"time": round(created, 6), "level": level, "logger": logger, "message": message}


def json_line(entry: dict[str, Any]) -> str:
    """One log line. orjson escapes control characters; U+2028/U+2029 are valid raw JSON but
    split lines in many readers, so they are escaped too."""
    line = orjson.dumps(entry, default=str).decode()
    return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _json_handler(logger: logging.Logger) -> logging.StreamHandler[Any] | None:
    """The one handler a record of ``logger`` reaches, when that is a plain JSON stream handler
    (the proxy's own setup, see ``configure``) and nothing on the way filters; else None."""
    root = logging.getLogger()
    if logger.handlers or logger.filters or not logger.propagate or root.filters:
        return None
    if len(root.handlers) != 1:
        return None
    handler = root.handlers[0]
    if (
        type(handler) is not logging.StreamHandler
        or type(handler.formatter) is not JSONFormatter
        or any(type(f) not in _OWN_FILTERS for f in handler.filters)
        or handler.level > logging.INFO
    ):
        return None
    return handler


class TextFormatter(logging.Formatter):
    """Human-readable lines; control characters in messages are escaped to keep one per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {
            k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
        }
        if extra:
            line += " " + orjson.dumps(extra, default=str).decode()
        return line.encode("unicode_escape").decode("ascii")


def configure(config: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretFilter())
    handler.addFilter(RepeatFilter())
    if config.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # None of these are ever printed; not gathering them makes every log record cheaper
    # (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiohttp's own access log prints raw request lines; ours is structured (AccessRecord).
    logging.getLogger("aiohttp.access").disabled = True
    # aiosqlite's debug lines carry every SQL parameter, prompts included.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


@dataclass(slots=True)
class AccessRecord:
    """What the access log says of one request; handlers fill in what they learn.

    ``outcome`` is set once: a second assignment raises ``OutcomeSet``.
    """

    request_id: str
    method: str
    path: str
    started: float
    status: int = 0
    caller: str | None = None
    model: str | None = None
    stream: bool | None = None
    _outcome: Outcome | None = None
    completion_id: str | None = None
    upstream_request_id: str | None = None
    upstream_ms: float | None = None
    proxy_ms: float | None = None

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    @outcome.setter
    def outcome(self, value: Outcome) -> None:
        if self._outcome is not None:
            raise OutcomeSet(self._outcome, value)
        self._outcome = value

    def emit(self, logger: logging.Logger) -> None:
        """Write this record's line now (``AccessLog`` writes the lines of a server)."""
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = _json_handler(logger)
        if handler is None:
            self.handle(logger)
            return
        line = self.line(logger.name, scrub(self.path), scrub(self.model or ""))
        with handler.lock or contextlib.nullcontext():
            handler.stream.write(line + handler.terminator)
            handler.flush()

    def _fields(self) -> dict[str, Any]:
        # Plain getattr, not dataclasses.asdict: this runs once per request.
        fields = {name: value for name in _LOGGED if (value := getattr(self, name)) is not None}
        fields["duration_ms"] = round((time.perf_counter() - self.started) * 1000, 3)
        return fields

    def line(self, logger: str, path: str, model: str) -> str:
        """The line JSONFormatter would make, with ``path`` and ``model`` already scrubbed.
        What SecretFilter would do: of an access record, only the path and the model are the
        client's own text."""
        entry = head(time.time(), "info", logger, "request") | self._fields()
        entry["path"] = path
        if self.model:
            entry["model"] = model
        return json_line(entry)

    def handle(self, logger: logging.Logger) -> None:
        """Pass the record through ``logging`` (for any setup other than the proxy's own).

        Made and handled directly: ``logger.info`` would walk the stack to find its caller
        (``findCaller``), which was most of the cost of logging a request."""
        logger.handle(
            logger.makeRecord(
                logger.name, logging.INFO, "", 0, "request", (), None, extra=self._fields()
            )
        )


class AccessLog:
    """The access lines of one server, written once per pass of the event loop.

    With the proxy's own handler (``configure``, nothing filtering on the way) a record's
    line is made at once and kept; the first line of a pass schedules one write of all of
    them (``loop.call_soon``), so under load one write carries many requests' lines instead
    of one system call each, and no line waits longer than that pass. ``flush`` writes what
    is kept (the app calls it on shutdown). Paths and models repeat, so their scrubbed form
    is remembered (a bounded map). Any other logging setup gets each record through
    ``logging`` as it comes.
    """

    REMEMBERED = 1024

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._lines: list[str] = []
        self._scrubbed: dict[str, str] = {}

    def write(self, record: AccessRecord) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        if _json_handler(logger) is None:
            record.handle(logger)
            return
        line = record.line(logger.name, self._scrub(record.path), self._scrub(record.model))
        if not self._lines:
            asyncio.get_running_loop().call_soon(self.flush)
        self._lines.append(line)

    def _scrub(self, text: str | None) -> str:
        if not text:
            return ""
        clean = self._scrubbed.get(text)
        if clean is None:
            if len(self._scrubbed) >= self.REMEMBERED:
                self._scrubbed.clear()
            clean = self._scrubbed[text] = scrub(text)
        return clean

    def flush(self) -> None:
        lines, self._lines = self._lines, []
        handler = _json_handler(self._logger)
        if not lines or handler is None:
            return
        terminator = handler.terminator
        with handler.lock or contextlib.nullcontext():
            handler.stream.write(terminator.join(lines) + terminator)
            handler.flush()


_OWN_FILTERS = (SecretFilter, RepeatFilter)

_LOGGED = tuple(f.name.lstrip("_") for f in fields(AccessRecord) if f.name != "started")
