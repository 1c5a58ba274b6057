"""Replay: answer chat completions from recordings in the store, plain or streamed.

Matching. A request matches a recording when their request keys are equal (see
``proxy.identity``: canonical JSON without transport and bookkeeping fields, versioned).
Recordings stored under the key of any version ``identity`` knows replay.

Several recordings of one request are played in the order they were recorded; once all have
been played, the last one repeats. The position is kept per proxy process, so a restart
plays from the first again.

Either shape: a recording made plain replays as a stream when the request asks for one
(role chunk, content/refusal/tool-call deltas, finish chunk, the usage chunk when
``stream_options.include_usage``, then ``[DONE]``), and a streamed recording (stored folded
into a chat.completion) replays plain. What the SDK assembles equals what was recorded.

Scope. A caller replays its own recordings unless ``replay.shared``; a strict miss that has
recordings under other callers says so, and how to share them.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy.assemble import ECHOED_FIELDS
from proxy.errors import InvalidRequest
from proxy.identity import lookup_keys
from proxy.store import Store

Json = dict[str, Any]

# Added to stored completions by the proxy; not part of the upstream's answer.
_STORED_ONLY = frozenset({*ECHOED_FIELDS, "request_id", "input_user", "metadata"})


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

    async def _recordings(self, keys: tuple[str, ...], scope: str | None) -> list[bytes]:
        """Recordings under every known version's key: older versions were recorded first."""
        found: list[bytes] = []
        for key in keys:
            found += await self._store.recordings(key, scope)
        return found

    async def answer(self, body: Json, caller: str | None) -> web.Response | None:
        """The recorded answer for this request, in the shape it asks for; None on a miss."""
        if caller is None and not self._shared:
            return None
        scope = None if self._shared else caller
        keys = lookup_keys(body)
        recordings = await self._recordings(keys, scope)
        if not recordings:
            return None
        chosen = recordings[self._cursors.pick(scope, keys[-1], len(recordings))]
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

    async def miss(self, body: Json, caller: str | None) -> InvalidRequest:
        """The error of a strict miss; it says when other callers have this request recorded."""
        message = (
            "No recording matches this request, and replay is strict: the upstream is never called."
        )
        if not self._shared:
            others = len(await self._recordings(lookup_keys(body), None))
            if others:
                whose = "this caller" if caller is not None else "a request without a key"
                message += (
                    f" {others} recording(s) of this request exist under other callers, none"
                    f" for {whose} (another key, or a database whose callers.secret_env"
                    " differs). To replay recordings whatever key made them, set"
                    " replay.shared: true in the config."
                )
        return InvalidRequest(message, code="replay_miss")
