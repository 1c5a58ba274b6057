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

import orjson

from proxy.assemble import (
    AssemblyError,
    completion_from_body,
    completion_from_stream,
    is_finished,
    stored_completion,
)
from proxy.models import ChatRequest
from proxy.outcome import Outcome
from proxy.replay import request_key
from proxy.store import CompletionRecord


@dataclass(slots=True)
class Capture:
    """A ``store: true`` exchange: the request as sent and the answer's bytes as relayed."""

    request: ChatRequest
    raw: bytes
    caller: str
    started: float = field(default_factory=time.perf_counter)
    response: bytearray = field(default_factory=bytearray)
    streamed: bool = False
    upstream_request_id: str | None = None

    def record(self) -> CompletionRecord:
        """Assemble the stored completion; raises ``AssemblyError`` when there is none to store.

        A stream must have finished (every choice has a ``finish_reason``), so a cut-off
        answer is never stored as a success.
        """
        body = bytes(self.response)
        if self.streamed:
            completion = completion_from_stream(body)
            if not is_finished(completion):
                raise AssemblyError("the stream ended before every choice finished")
        else:
            completion = completion_from_body(body)
        stored = stored_completion(completion, self.request.body, self.upstream_request_id)
        created = completion.get("created")
        return CompletionRecord(
            id=completion["id"],
            caller=self.caller,
            created=created if isinstance(created, int) else int(time.time()),
            model=self.request.model,
            metadata=self.request.metadata,
            completion=orjson.dumps(stored),
            request=self.raw,
            request_id=self.upstream_request_id,
            stream=self.streamed,
            outcome=Outcome.COMPLETE,
            duration_ms=round((time.perf_counter() - self.started) * 1000, 3),
            request_key=request_key(self.request.body),
        )
