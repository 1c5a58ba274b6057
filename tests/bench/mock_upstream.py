"""A mock OpenAI upstream for the benchmark: plain completions and 50-chunk SSE streams.

    python -m tests.bench.mock_upstream --port PORT

``POST /v1/chat/completions`` answers with a chat completion, or, when the body says
``"stream": true``, with 50 ``chat.completion.chunk`` events (each written on its own) and
``data: [DONE]``. Bodies are pre-encoded templates; only the id (a per-process prefix plus a
counter, so every answer has its own) is substituted, so the mock spends as little as it
can per request. ``GET /healthz`` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os

import orjson
from aiohttp import web

STREAM_CHUNKS = 50
_ID = b"chatcmpl-@@@@@@@@@@@@@@@@@@@@@@@@"  # same length as the ids substituted for it
_CREATED = 1_700_000_000
_MODEL = "gpt-4o-mini-2024-07-18"
_WORDS = (
    "The quick brown fox jumps over the lazy dog while the proxy relays every byte "
    "and the store keeps a faithful copy of the answer for later retrieval. "
) * 5
# 48 content pieces between the role chunk and the finish chunk: 50 chunks in all.
_PIECES = [_WORDS[i * 16 : (i + 1) * 16] for i in range(STREAM_CHUNKS - 2)]
_TEXT = "".join(_PIECES)


def _plain_template() -> bytes:
    return orjson.dumps(
        {
            "id": _ID.decode(),
            "object": "chat.completion",
            "created": _CREATED,
            "model": _MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _TEXT, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 41, "completion_tokens": 160, "total_tokens": 201},
            "system_fingerprint": "fp_bench",
            "service_tier": "default",
        }
    )


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    chunk = {
        "id": _ID.decode(),
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": _MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _stream_template() -> list[bytes]:
    pieces = [_chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    pieces += [_chunk({"content": piece}, None) for piece in _PIECES]
    pieces.append(_chunk({}, "stop"))
    assert len(pieces) == STREAM_CHUNKS
    return pieces


class MockUpstream:
    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()  # distinct ids across restarts of the mock
        self._counter = itertools.count(1)
        self._plain = _plain_template()
        self._stream = _stream_template()

    def _next_id(self) -> bytes:
        completion_id = f"chatcmpl-{self._prefix}{next(self._counter):016d}".encode()
        assert len(completion_id) == len(_ID)
        return completion_id

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        completion_id = self._next_id()
        headers = {"x-request-id": "req_" + completion_id[9:].decode()}
        if body.get("stream") is not True:
            return web.Response(
                body=self._plain.replace(_ID, completion_id),
                content_type="application/json",
                headers=headers,
            )
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        await response.prepare(request)
        for piece in self._stream:
            await response.write(piece.replace(_ID, completion_id))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")


def make_app() -> web.Application:
    mock = MockUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", mock.chat)
    app.router.add_get("/healthz", mock.healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop  # noqa: PLC0415 - optional, as in the proxy

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
