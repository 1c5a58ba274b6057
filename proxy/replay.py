"""Replay: answer chat completions from recordings in the store, plain or streamed.

Matching. A request matches a recording when the two are equal as canonical JSON (keys
sorted, integral floats as integers, so ``1.0`` and ``1`` match), leaving out only transport
and bookkeeping fields: ``stream``, ``stream_options``, ``store``, ``metadata`` and ``user``.
Everything that changes the answer (model, messages, tools, temperature, seed, n, ...) must
match. The canonical form is hashed into ``request_key``, kept beside each completion.

Several recordings of one request are played in the order they were recorded; once all have
been played, the last one repeats. The position is kept per proxy process, so a restart
plays from the first again.

Either shape: a recording made plain replays as a stream when the request asks for one
(role chunk, content/refusal/tool-call deltas, finish chunk, the usage chunk when
``stream_options.include_usage``, then ``[DONE]``), and a streamed recording (stored folded
into a chat.completion) replays plain. What the SDK assembles equals what was recorded.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.assemble import ECHOED_FIELDS

if TYPE_CHECKING:  # the store's migrations use request_key: a runtime import would cycle
    from proxy.store import Store

Json = dict[str, Any]

IGNORED_FIELDS = frozenset({"stream", "stream_options", "store", "metadata", "user"})
# Added to stored completions by the proxy; not part of the upstream's answer.
_STORED_ONLY = frozenset({*ECHOED_FIELDS, "request_id", "input_user", "metadata"})
_SAFE_INT = 2**53


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _canonical(v) if type(v) in _REWRITTEN else v for k, v in value.items()}
    if kind is list:
        return [_canonical(v) if type(v) in _REWRITTEN else v for v in value]
    if kind is float and value.is_integer() and abs(value) < _SAFE_INT:
        return int(value)
    return value


_REWRITTEN = frozenset({dict, list, float})  # the only types canonical form can change


def request_key(request: Json) -> str:
    """The hash that identifies what a request asks, whatever its transport options."""
    essential = {k: v for k, v in request.items() if k not in IGNORED_FIELDS}
    canonical = orjson.dumps(_canonical(essential), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]  # 128 bits: a smaller index


def recorded_answer(stored: Json) -> Json:
    """The upstream's answer as it was, from the stored completion."""
    return {k: v for k, v in stored.items() if k not in _STORED_ONLY}


def _tool_call_deltas(calls: list[Json]) -> list[Json]:
    return [
        {
            "index": index,
            "id": call.get("id"),
            "type": call.get("type", "function"),
            "function": {
                "name": (call.get("function") or {}).get("name"),
                "arguments": (call.get("function") or {}).get("arguments", ""),
            },
        }
        for index, call in enumerate(calls)
    ]


def stream_chunks(completion: Json, *, include_usage: bool) -> list[Json]:
    """A chat.completion as the chunks a streaming upstream would have sent for it."""
    base: Json = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    for key in ("system_fingerprint", "service_tier"):
        if completion.get(key) is not None:
            base[key] = completion[key]
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: Json, finish: str | None = None, logprobs: Any = None) -> Json:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return {**base, "choices": [choice]}

    chunks: list[Json] = []
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        # As OpenAI does: the role chunk has content "" before text, null before tool calls.
        opening = "" if isinstance(message.get("content"), str) else None
        chunks.append(chunk(index, {"role": message.get("role", "assistant"), "content": opening}))
        if message.get("content"):
            chunks.append(
                chunk(index, {"content": message["content"]}, None, choice.get("logprobs"))
            )
        elif choice.get("logprobs"):
            chunks.append(chunk(index, {}, None, choice["logprobs"]))
        if message.get("refusal"):
            chunks.append(chunk(index, {"refusal": message["refusal"]}))
        if message.get("tool_calls"):
            chunks.append(chunk(index, {"tool_calls": _tool_call_deltas(message["tool_calls"])}))
        if message.get("function_call"):
            chunks.append(chunk(index, {"function_call": message["function_call"]}))
        if message.get("annotations"):
            chunks.append(chunk(index, {"annotations": message["annotations"]}))
        chunks.append(chunk(index, {}, choice.get("finish_reason") or "stop"))
    if include_usage:
        chunks.append({**base, "choices": [], "usage": completion.get("usage")})
    return chunks


def sse_body(chunks: list[Json]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


class Cursors:
    """Which recording of each request plays next, per proxy process."""

    __slots__ = ("_played",)

    def __init__(self) -> None:
        self._played: dict[tuple[str | None, str], int] = {}

    def pick(self, scope: str | None, key: str, count: int) -> int:
        """The index of the recording to play now: in order, then the last one repeats."""
        position = self._played.get((scope, key), 0)
        self._played[(scope, key)] = position + 1
        return min(position, count - 1)


class Replayer:
    """Answers chat completion requests from the store's recordings."""

    def __init__(self, store: Store, *, shared: bool) -> None:
        self._store = store
        self._shared = shared
        self._cursors = Cursors()

    async def answer(self, body: Json, caller: str | None) -> web.Response | None:
        """The recorded answer for this request, in the shape it asks for; None on a miss."""
        if caller is None and not self._shared:
            return None
        scope = None if self._shared else caller
        key = request_key(body)
        recordings = await self._store.recordings(key, scope)
        if not recordings:
            return None
        chosen = recordings[self._cursors.pick(scope, key, len(recordings))]
        answer = recorded_answer(orjson.loads(chosen))
        headers = {"x-replay": str(answer.get("id"))}
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            chunks = stream_chunks(answer, include_usage=include_usage)
            return web.Response(
                body=sse_body(chunks), content_type="text/event-stream", headers=headers
            )
        return web.Response(
            body=orjson.dumps(answer), content_type="application/json", headers=headers
        )
