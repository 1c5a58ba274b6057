"""Portable recordings: export the store as JSON lines, import them back.

Formats:
- ``jsonl``: one full record per line: ``id``, ``caller`` (the fingerprint), ``created``,
  ``model``, ``metadata``, ``request`` (the client's request), ``response`` (the stored
  chat.completion, without metadata), ``request_id``, ``stream``, ``outcome``, ``stored_at``,
  ``duration_ms``, ``prompt_tokens``, ``cached_tokens``, ``completion_tokens`` (what usage
  and cost are summed from). ``import`` reads exactly this, so export → import → export gives
  the same records; a file without the token counts gets them from ``response.usage``.
- ``finetune``: OpenAI's chat fine-tuning format: ``messages`` = the request's messages plus
  the assistant's reply (first choice), with ``tools`` when the request had them. Records
  without a reply are skipped; the ``developer`` role is written as ``system``.

Both directions stream: memory stays constant whatever the size of the store or file.
Import is idempotent by (caller, id); a file with any bad line imports nothing (what was
already committed is taken back, see ``Store.import_records``), and every bad line is
reported with its number.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxy.errors import InvalidRequest
from proxy.identity import request_key
from proxy.models import check_metadata
from proxy.store import CompletionRecord, ExportFilter, Prepared, Store

Format = Literal["jsonl", "finetune"]
Progress = Callable[[int], None]

_FINETUNE_ROLES = {"developer": "system"}


def _embedded(raw: bytes) -> orjson.Fragment | Any:
    """Stored JSON spliced in as is, unless its own line breaks would split the JSONL line."""
    if b"\n" in raw or b"\r" in raw:
        return orjson.loads(raw)
    return orjson.Fragment(raw)


def export_line(record: CompletionRecord) -> bytes:
    return orjson.dumps(
        {
            "id": record.id,
            "caller": record.caller,
            "created": record.created,
            "model": record.model,
            "metadata": record.metadata,
            "request": _embedded(record.request),
            "response": orjson.Fragment(record.completion),
            "request_id": record.request_id,
            "stream": record.stream,
            "outcome": record.outcome,
            "stored_at": record.stored_at,
            "duration_ms": record.duration_ms,
            "prompt_tokens": record.prompt_tokens,
            "cached_tokens": record.cached_tokens,
            "completion_tokens": record.completion_tokens,
        }
    )


def finetune_line(record: CompletionRecord) -> bytes | None:
    """One fine-tuning example, or None when the record has no assistant reply."""
    request = orjson.loads(record.request)
    response = orjson.loads(record.completion)
    choices = response.get("choices") or []
    messages = request.get("messages")
    if not choices or not isinstance(messages, list):
        return None
    reply = choices[0].get("message") or {}
    assistant: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
    if reply.get("tool_calls"):
        assistant["tool_calls"] = [
            {"id": c.get("id"), "type": c.get("type", "function"), "function": c.get("function")}
            for c in reply["tool_calls"]
        ]
    if assistant["content"] is None and "tool_calls" not in assistant:
        return None
    example: dict[str, Any] = {
        "messages": [
            {**m, "role": _FINETUNE_ROLES.get(str(m.get("role")), m.get("role"))}
            for m in messages
            if isinstance(m, dict)
        ]
        + [assistant]
    }
    if request.get("tools"):
        example["tools"] = request["tools"]
    if request.get("parallel_tool_calls") is not None:
        example["parallel_tool_calls"] = request["parallel_tool_calls"]
    return orjson.dumps(example)


async def export_to(
    store: Store, where: ExportFilter, fmt: Format, out: IO[bytes], progress: Progress | None
) -> int:
    """Write every matching record to ``out``; return how many lines were written."""
    render = export_line if fmt == "jsonl" else finetune_line
    written = 0
    async for batch in store.export(where):
        lines = [line for line in map(render, batch) if line is not None]
        if lines:
            out.write(b"\n".join(lines) + b"\n")
        written += len(lines)
        if progress is not None:
            progress(written)
    return written


class ExportedCompletion(BaseModel):
    """One ``jsonl`` line, as ``export`` writes it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    caller: str = Field(min_length=1)
    created: int
    model: str
    metadata: dict[str, str] = Field(default_factory=dict)
    request: dict[str, Any]
    response: dict[str, Any]
    request_id: str | None = None
    stream: bool = False
    outcome: str = "complete"
    stored_at: float | None = None
    duration_ms: float | None = None
    # Absent from files written before they were exported: then read from response.usage.
    prompt_tokens: int | None = Field(None, ge=0)
    cached_tokens: int | None = Field(None, ge=0)
    completion_tokens: int | None = Field(None, ge=0)

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str]) -> dict[str, str]:
        try:
            return check_metadata(value)
        except InvalidRequest as error:
            raise ValueError(error.message) from None

    def _tokens(self, name: str, given: int | None) -> int:
        if given is not None:
            return given
        usage = self.response.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        if name == "cached_tokens":
            details = usage.get("prompt_tokens_details")
            usage = details if isinstance(details, dict) else {}
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def record(self, now: float) -> CompletionRecord:
        """The record to import; stored ``now`` if the line does not say when it was."""
        completion = {k: v for k, v in self.response.items() if k != "metadata"}
        return CompletionRecord(
            id=self.id,
            caller=self.caller,
            created=self.created,
            model=self.model,
            metadata=self.metadata,
            completion=orjson.dumps(completion),
            request=orjson.dumps(self.request),
            request_id=self.request_id,
            stream=self.stream,
            outcome=self.outcome,
            duration_ms=self.duration_ms,
            request_key=request_key(self.request),
            stored_at=self.stored_at if self.stored_at is not None else now,
            prompt_tokens=self._tokens("prompt_tokens", self.prompt_tokens),
            cached_tokens=self._tokens("cached_tokens", self.cached_tokens),
            completion_tokens=self._tokens("completion_tokens", self.completion_tokens),
            parsed=(self.request, completion),
        )


@dataclass
class ImportReport:
    lines: int = 0
    inserted: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    error_count: int = 0
    stopped: bool = False  # the command was interrupted: write nothing, read no further

    @property
    def skipped(self) -> int:
        return self.lines - self.inserted


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


RUN_BYTES = 1 << 20  # the file is parsed and inserted in runs of whole lines of about this


def _runs(source: IO[bytes], size: int = RUN_BYTES) -> Iterator[tuple[int, bytes]]:
    """The file in runs of whole lines of about ``size`` bytes (a longer line is a run of
    its own), each with the number of its first line. Read in blocks, not line by line: this
    process only cuts the runs and counts their lines, the workers split them."""
    number = 1
    rest = b""
    while block := source.read(size):
        block = rest + block if rest else block
        cut = block.rfind(b"\n") + 1
        run, rest = block[:cut], block[cut:]
        if run:
            yield number, run
            number += run.count(b"\n")
    if rest:
        yield number, rest


ParsedRun = tuple[list[Prepared], list[tuple[int, str]], int]
Derive = Callable[[CompletionRecord], Any]


def parse_run(first: int, run: bytes, derive: Derive) -> ParsedRun:
    """The records of a run of ``jsonl`` lines, prepared by the store's ``derive`` (in the
    worker, so the store's writer only inserts), the first 100 bad lines with their
    numbers, and how many were bad."""
    rows: list[Prepared] = []
    errors: list[tuple[int, str]] = []
    bad = 0
    now = time.time()
    for number, line in enumerate(run.split(b"\n"), first):
        if not line.strip():
            continue
        try:
            parsed = ExportedCompletion.model_validate_json(line)
            record = parsed.record(now)
        except ValidationError as error:
            bad += 1
            if len(errors) < 100:
                errors.append((number, _describe(error)))
            continue
        rows.append(Prepared(record, derive(record)))
    return rows, errors, bad


def _accept(parsed: ParsedRun, report: ImportReport) -> list[Prepared]:
    rows, errors, bad = parsed
    report.error_count += bad
    report.errors += errors[: 100 - len(report.errors)]
    report.lines += len(rows)
    return rows


def _batches(
    source: IO[bytes], report: ImportReport, progress: Progress | None, derive: Derive
) -> Iterator[list[Prepared]]:
    """Parsed and prepared batches, in file order. A file of more than one run of lines is
    parsed by two worker processes, up to three runs ahead, while this process inserts:
    parsing and the store's ``derive`` (the larger cost) use whatever CPU the store's
    writer leaves. Memory stays flat: at most four runs are held at once, whatever the size
    of the file."""
    runs = _runs(source)
    first = next(runs, None)
    if first is None:
        return
    second = next(runs, None)
    if second is None:  # a small file: not worth a process
        yield _accept(parse_run(*first, derive), report)
        if progress is not None:
            progress(report.lines)
        return
    # spawn, not fork: this process has threads (SQLite's), which fork does not copy.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        ahead = collections.deque([pool.submit(parse_run, *second, derive)])
        parsed = parse_run(*first, derive)  # here, while the worker starts
        while not report.stopped:
            while len(ahead) < 3 and (run := next(runs, None)) is not None:
                ahead.append(pool.submit(parse_run, *run, derive))
            yield _accept(parsed, report)
            if progress is not None:
                progress(report.lines)
            if not ahead:
                return
            parsed = ahead.popleft().result()


async def import_from(store: Store, source: IO[bytes], progress: Progress | None) -> ImportReport:
    """Load a ``jsonl`` export. A file with a bad line writes nothing; neither does an
    interrupted import (what it had written is taken back)."""
    report = ImportReport()
    batches = _batches(source, report, progress, store.derive)
    try:
        report.inserted = await store.import_records(
            batches, accept=lambda: report.error_count == 0 and not report.stopped
        )
    except asyncio.CancelledError:
        report.stopped = True  # seen by the writer's thread at its next batch
        raise
    return report
