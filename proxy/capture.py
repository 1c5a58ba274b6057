"""The capture of one exchange and its outcome.

Invariants (the relay keeps them; tests check them):
1. The client receives exactly the upstream's bytes; the proxy never re-encodes a body.
2. Every exchange ends in exactly one outcome.
3. A completion the client fully received is committed first: the plain body, or the read
   that carries ``data: [DONE]``, leaves only after the commit.
4. Parsing and assembly are pure functions (``assemble``, ``sse``), run once the answer is
   complete, never per chunk on the hot loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.assemble import (
    AssemblyError,
    completion_from_body,
    completion_from_stream,
    is_finished,
    stored_completion,
)
from proxy.identity import request_key
from proxy.models import ChatRequest
from proxy.outcome import Outcome
from proxy.redaction import Redactor
from proxy.store import CompletionRecord, ExchangeRecord

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def usage_of(completion: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens of a chat.completion's ``usage``; zeros if none."""
    usage = completion.get("usage")
    if not isinstance(usage, dict):
        return 0, 0, 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    numbers = (usage.get("prompt_tokens"), cached, usage.get("completion_tokens"))
    prompt, cached_tokens, output = (n if isinstance(n, int) else 0 for n in numbers)
    return prompt, cached_tokens, output


@dataclass(slots=True)
class Capture:
    """An exchange being recorded: the request as sent and the answer's bytes as relayed.

    ``storable`` turns false when the upstream answers anything but 200: the bytes are still
    kept, for the audit record of a failed exchange, but nothing is stored as a completion.
    ``kept`` turns false when the answer grew past the capture limit (``drop``).
    """

    request: ChatRequest
    raw: bytes
    caller: str
    redactor: Redactor
    request_id: str = ""
    started: float = field(default_factory=time.perf_counter)
    response: bytearray = field(default_factory=bytearray)
    streamed: bool = False
    storable: bool = True
    upstream_request_id: str | None = None
    kept: bool = True

    def drop(self) -> None:
        """Stop capturing and give the captured bytes back: the answer is too large to keep."""
        self.kept = False
        self.response = bytearray()

    def _redacted_request(self) -> tuple[bytes, Any]:
        """The request as stored, and what it decodes to."""
        body, replaced = self.redactor.document(self.raw, self.request.body)
        return (orjson.dumps(body) if replaced else self.raw), body

    def _audited_request(self) -> bytes:
        """The request for an audit record, which must be written even when the request is
        past what the JSON encoder takes: then the redaction rules apply to its text."""
        try:
            return self._redacted_request()[0]
        except (orjson.JSONEncodeError, RecursionError):
            return self.redactor.text(self.raw.decode("utf-8", "replace"))[0].encode()

    def record(self) -> CompletionRecord:
        """Assemble the stored completion; raises ``AssemblyError`` when there is none to store.

        A stream must have finished (every choice has a ``finish_reason``), so a cut-off
        answer is never stored as a success. Redaction applies to what is stored only.
        """
        body = bytes(self.response)
        if self.streamed:
            completion = completion_from_stream(body)
            if not is_finished(completion):
                raise AssemblyError("the stream ended before every choice finished")
        else:
            completion = completion_from_body(body)
        stored = stored_completion(completion, self.request.body, self.upstream_request_id)
        encoded = orjson.dumps(stored)
        masked, replaced = self.redactor.document(encoded, stored)
        if replaced:
            encoded = orjson.dumps(masked)
        request, sent = self._redacted_request()
        created = completion.get("created")
        prompt, cached, output = usage_of(completion)
        for name, number in (
            ("created", created),
            ("prompt_tokens", prompt),
            ("cached_tokens", cached),
            ("completion_tokens", output),
        ):
            if isinstance(number, int) and not INT64_MIN <= number <= INT64_MAX:
                raise AssemblyError(f"{name} is outside the 64-bit range a store holds")
        return CompletionRecord(
            id=completion["id"],
            caller=self.caller,
            created=created if isinstance(created, int) else int(time.time()),
            model=self.request.model,
            metadata=self.request.metadata,
            completion=encoded,
            request=request,
            request_id=self.upstream_request_id,
            stream=self.streamed,
            outcome=Outcome.COMPLETE,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
            request_key=request_key(self.request.body),
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=output,
            parsed=(sent, masked),
        )

    def exchange(self, outcome: Outcome, status: int | None, keep_bytes: int) -> ExchangeRecord:
        """The audit record of an exchange that stored no completion."""
        response = bytes(self.response[:keep_bytes]) if self.response else None
        if response is not None and self.redactor.enabled:
            response = self.redactor.text(response.decode("utf-8", "replace"))[0].encode()
        return ExchangeRecord(
            request_id=self.request_id,
            caller=self.caller,
            created=int(time.time()),
            model=self.request.model,
            stream=self.streamed,
            outcome=outcome,
            status=status,
            request=self._audited_request(),
            response=response,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
        )
