"""A real fake upstream: an aiohttp app that answers like OpenAI, or as a test scripts it.

By default ``POST /v1/chat/completions`` answers with a fresh completion that echoes the last
user message, plain or streamed as the request asks. ``upstream.script(Reply(...))`` queues
replies that take precedence: any status, body, SSE pieces (each piece is one network
write), delays, a drop mid-stream, a hang, gzip. Everything received is recorded.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    sse: list[bytes] | None = None  # raw pieces, one write each
    delay: float = 0.0  # before the status line
    piece_delay: float = 0.0  # between SSE pieces
    drop_after: int | None = None  # close the connection after this many pieces
    hang: bool = False  # never answer
    hang_after: int | None = None  # stall (never finish) after this many pieces
    gzip: bool = False


def sse(chunks: list[dict[str, Any]], *, done: bool = True) -> list[bytes]:
    pieces = [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks]
    if done:
        pieces.append(b"data: [DONE]\n\n")
    return pieces


def last_user_text(request: dict[str, Any]) -> str:
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content)
    return ""


def completion(
    request: dict[str, Any], completion_id: str, created: int = 1700000000
) -> dict[str, Any]:
    text = "echo: " + last_user_text(request)
    n = request.get("n") or 1
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": request.get("model", "gpt-test") + "-2024-01-01",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
            for i in range(n)
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        "system_fingerprint": "fp_test",
        "service_tier": "default",
    }


def tool_call_answer(
    completion_id: str,
    name: str,
    arguments: str,
    *,
    call_id: str = "call_1",
    created: int = 1700000000,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A plain chat.completion whose one choice calls one function."""
    answer: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": "gpt-test",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": arguments},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def chunks(
    request: dict[str, Any], completion_id: str, created: int = 1700000000, pieces: int = 3
) -> list[dict[str, Any]]:
    """The same answer as ``completion``, as stream chunks split into ``pieces`` parts."""
    whole = completion(request, completion_id, created)
    text = whole["choices"][0]["message"]["content"]
    size = max(1, -(-len(text) // pieces))
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": whole["model"],
        "system_fingerprint": "fp_test",
    }
    out = []
    for index in range(len(whole["choices"])):
        out.append(
            {
                **base,
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
        out += [
            {
                **base,
                "choices": [{"index": index, "delta": {"content": part}, "finish_reason": None}],
            }
            for part in parts
        ]
        out.append({**base, "choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]})
    if (request.get("stream_options") or {}).get("include_usage"):
        out.append({**base, "choices": [], "usage": whole["usage"]})
    return out


class FakeUpstream:
    """The app plus its script and its record of what arrived."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.replies: deque[Reply] = deque()
        self.ids = (f"chatcmpl-fake{n:06d}" for n in itertools.count(1))
        self.arrived = asyncio.Event()
        self.closed_early = asyncio.Event()  # a client of ours went away mid-answer
        self.closed_at: list[float] = []  # when each early close was seen (perf_counter)
        self.sent_at: list[float] = []  # when each SSE piece was written (perf_counter)
        self.open_streams = 0
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def chat_requests(self) -> list[Received]:
        return [
            r for r in self.received if r.path.endswith("/chat/completions") and r.method == "POST"
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(
            Received(
                request.method, request.path, request.query_string, dict(request.headers), body
            )
        )
        self.arrived.set()
        reply = self.replies.popleft() if self.replies else self.default(request, body)
        try:
            if reply.hang:
                await asyncio.Event().wait()
            if reply.delay:
                await asyncio.sleep(reply.delay)
        except asyncio.CancelledError:  # the proxy closed its connection before our answer
            self.closed_at.append(time.perf_counter())
            self.closed_early.set()
            raise
        if reply.sse is not None:
            return await self.stream(request, reply)
        payload = reply.body if reply.body is not None else orjson.dumps(reply.json)
        headers = dict(reply.headers)
        if reply.gzip:
            payload = gzip.compress(payload)
            headers["Content-Encoding"] = "gzip"
        return web.Response(
            status=reply.status, body=payload, content_type=reply.content_type, headers=headers
        )

    async def stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        response = web.StreamResponse(status=reply.status, headers=reply.headers)
        response.content_type = "text/event-stream"
        if reply.gzip:
            response.enable_compression(web.ContentCoding.gzip)
        await response.prepare(request)
        self.open_streams += 1
        try:
            for count, piece in enumerate(reply.sse or []):
                if reply.drop_after is not None and count == reply.drop_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if reply.hang_after is not None and count == reply.hang_after:
                    await asyncio.Event().wait()
                if reply.piece_delay and count:
                    await asyncio.sleep(reply.piece_delay)
                await response.write(piece)
                self.sent_at.append(time.perf_counter())
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.closed_at.append(time.perf_counter())
            self.closed_early.set()
            raise
        finally:
            self.open_streams -= 1
        return response

    def default(self, request: web.Request, body: bytes) -> Reply:
        if request.method == "POST" and request.path.endswith("/chat/completions"):
            data = orjson.loads(body)
            completion_id = next(self.ids)
            if data.get("stream"):
                return Reply(
                    sse=sse(chunks(data, completion_id)),
                    headers={"x-request-id": f"req-up-{completion_id}"},
                )
            return Reply(
                json=completion(data, completion_id),
                headers={"x-request-id": f"req-up-{completion_id}"},
            )
        if request.path.endswith("/models"):
            return Reply(
                json={
                    "object": "list",
                    "data": [
                        {"id": "gpt-test", "object": "model", "created": 0, "owned_by": "fake"}
                    ],
                }
            )
        return Reply(
            json={"path": request.path, "method": request.method, "query": request.query_string}
        )
