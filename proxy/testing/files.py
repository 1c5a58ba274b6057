"""Recording files: one JSONL file per test, next to the test module, one exchange a line.

``<test dir>/recordings/<module>/<test>.jsonl``; a test in a class is ``Class.test``, a
parametrized one keeps its id (``test[gpt-4o]``). Each line is ``{"request": ...,
"response": ...}`` with sorted keys: the request as the client sent it (after redaction) and
the upstream's chat.completion (a streamed answer folded into one), and ``key``, the request
key (``proxy.identity``) of the request as sent. Lines are ordered by key, and the recordings
of one request in the order they were made: requests a test makes concurrently never swap
lines from one recording to the next.
Nothing else: no caller, no timings, so re-recording an unchanged test changes only what the
upstream answered differently.

The key is what replay matches on when the stored request was redacted (it no longer hashes
to the key of what the test sends); a request without redaction markers is matched on its
own key, so editing a request by hand needs no key to be updated.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from proxy.identity import key_version, request_key
from proxy.outcome import Outcome
from proxy.replay import recorded_answer
from proxy.store import CompletionRecord

Json = dict[str, Any]

DIRECTORY = "recordings"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\[\]-]")
_LONGEST = 120


class RecordingFileError(Exception):
    """A recording file that cannot be read: its path, line and what is wrong."""


_REDACTED = b"[REDACTED:"


@dataclass(frozen=True, slots=True)
class Exchange:
    request: Json
    response: Json
    key: str | None = None  # the request key of the request as sent, before redaction

    def replay_key(self) -> str:
        """What replay matches this exchange on."""
        if self.key is not None and _REDACTED in orjson.dumps(self.request):
            return self.key
        return request_key(self.request)


def file_name(test: str) -> str:
    """A file name for a test name, safe on every file system, unique for long ids."""
    name = _UNSAFE.sub("_", test)
    if len(name) > _LONGEST:
        digest = hashlib.sha256(test.encode()).hexdigest()[:12]
        name = f"{name[: _LONGEST - 13]}-{digest}"
    return name + ".jsonl"


def recording_path(module: Path, test: str) -> Path:
    """Where the recordings of ``test`` (its name within the module) live."""
    return module.parent / DIRECTORY / module.stem / file_name(test)


def read(path: Path) -> list[Exchange]:
    """The exchanges of a recording file, in order; none when there is no file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    exchanges = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise RecordingFileError(f"{path}:{number}: not JSON ({error})") from None
        request = item.get("request") if isinstance(item, dict) else None
        response = item.get("response") if isinstance(item, dict) else None
        if not isinstance(request, dict) or not isinstance(response, dict):
            raise RecordingFileError(
                f"{path}:{number}: expected an object with a request and a response"
            )
        if not isinstance(response.get("id"), str):
            raise RecordingFileError(f"{path}:{number}: the response has no id")
        key = item.get("key")
        if key is not None:
            try:
                key_version(key)
            except (ValueError, AttributeError):
                raise RecordingFileError(f"{path}:{number}: not a request key: {key!r}") from None
        exchanges.append(Exchange(request, response, key))
    return exchanges


def line(exchange: Exchange) -> bytes:
    item: Json = {"request": exchange.request, "response": exchange.response}
    if exchange.key is not None:
        item["key"] = exchange.key
    return orjson.dumps(item, option=orjson.OPT_SORT_KEYS)


def write(path: Path, exchanges: Iterable[Exchange]) -> None:
    """Replace the file with these exchanges (atomically), in key order; none removes it."""
    lines = [line(e) for e in sorted(exchanges, key=Exchange.replay_key)]
    if not lines:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(b"\n".join(lines) + b"\n")
    os.replace(temporary, path)


def to_record(exchange: Exchange, number: int) -> CompletionRecord:
    """An exchange as the store keeps it; each line is its own caller, so ids never clash."""
    created = exchange.response.get("created")
    return CompletionRecord(
        id=exchange.response["id"],
        caller=f"recording-{number}",
        created=created if isinstance(created, int) else 0,
        model=str(exchange.request.get("model", "")),
        metadata={},
        completion=orjson.dumps(exchange.response),
        request=orjson.dumps(exchange.request),
        request_id=None,
        stream=exchange.request.get("stream") is True,
        outcome=Outcome.COMPLETE,
        request_key=exchange.replay_key(),
    )


def from_record(record: CompletionRecord) -> Exchange:
    return Exchange(
        orjson.loads(record.request),
        recorded_answer(orjson.loads(record.completion)),
        record.request_key,
    )
