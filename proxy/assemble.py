"""From captured bytes to the stored chat.completion, and back out to API shapes; pure.

Nothing here does I/O or keeps state, so every rule of the wire contract (docs/api.md) about
folding a stream, echoing request fields and listing input messages is unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from proxy.sse import DONE, event_data

# Request fields a stored completion echoes, as OpenAI's stored objects do (null when not sent).
ECHOED_FIELDS = (
    "seed",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "tool_choice",
    "response_format",
)

Json = dict[str, Any]

# Top-level fields of a stream's chunks that the folded completion takes from the last chunk
# that carries one.
_LAST_WINS = ("usage", "system_fingerprint", "service_tier")


class AssemblyError(ValueError):
    """The captured answer is not a chat completion that can be stored."""


def chunks_of(stream: bytes) -> list[Json]:
    """The JSON objects of an SSE stream, ``[DONE]`` and non-JSON events left out."""
    payloads = [data for data in map(bytes.strip, event_data(stream)) if data and data != DONE]
    try:
        parsed = [orjson.loads(data) for data in payloads]
    except orjson.JSONDecodeError:  # rare: some event is not JSON; parse them one by one
        parsed = [value for data in payloads if (value := _json_or_none(data)) is not None]
    return [chunk for chunk in parsed if isinstance(chunk, dict)]


def _json_or_none(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _merge_tool_call(calls: dict[int, Json], delta: Json) -> None:
    index = delta.get("index", len(calls))
    call = calls.get(index)
    if call is None:
        call = calls[index] = {
            "id": None,
            "type": None,
            "function": {"name": "", "arguments": ""},
        }
    if delta.get("id"):
        call["id"] = call["id"] or delta["id"]
    if delta.get("type") and not call["type"]:
        call["type"] = delta["type"]
    function = delta.get("function") or {}
    if function.get("name") and not call["function"]["name"]:
        call["function"]["name"] = function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]


def _merge_logprobs(target: Json, delta: Json) -> None:
    for key in ("content", "refusal"):
        items = delta.get(key)
        if items:
            existing = target.get(key)
            target[key] = (existing or []) + list(items)
        else:
            target.setdefault(key, None)


def fold_chunks(chunks: Iterable[Json]) -> Json:
    """Fold ``chat.completion.chunk`` objects into one ``chat.completion``.

    Per choice ``index``: strings concatenate (content, refusal, tool-call arguments), tool calls
    merge by their ``index`` (id, type and name from the first delta that has them),
    ``finish_reason`` comes from the chunk that sets it, logprobs lists extend. ``usage``,
    ``system_fingerprint`` and ``service_tier`` come from the last chunk that has them. Chunks
    whose ``object`` is not ``chat.completion.chunk`` (filter events of some providers) are skipped.
    A chunk whose fields have the wrong JSON types raises ``AssemblyError``, like any other
    answer that cannot be stored.
    """
    try:
        return _fold(chunks)
    except (AttributeError, TypeError) as error:
        raise AssemblyError(f"a chunk is malformed: {error}") from None


def _fold(chunks: Iterable[Json]) -> Json:
    kept = [chunk for chunk in chunks if chunk.get("object") == "chat.completion.chunk"]
    if not kept:
        raise AssemblyError("the stream carried no chat.completion.chunk")
    first = kept[0]
    head: Json = {
        "id": first.get("id"),
        "object": "chat.completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [],
    }
    for key in _LAST_WINS:  # from the last chunk that has one: mostly found at once
        value = next((v for c in reversed(kept) if (v := c.get(key)) is not None), None)
        if value is not None:  # left out, not null: the schema types them as object/string
            head[key] = value
    choices: dict[int, Json] = {}
    tool_calls: dict[int, dict[int, Json]] = {}
    texts: dict[tuple[int, str], list[str]] = {}
    for chunk in kept:
        for part in chunk.get("choices") or ():
            index = part.get("index", 0)
            delta = part.get("delta") or {}
            if len(delta) == 1 and index in choices and "content" in delta:
                # Most chunks: one more piece of a choice's content, nothing else.
                piece = delta["content"]
                if piece is not None:
                    texts[index, "content"].append(piece)
            else:
                _fold_delta(choices, texts, tool_calls, index, delta)
            if part.get("finish_reason") is not None:
                choices[index]["finish_reason"] = part["finish_reason"]
            if part.get("logprobs"):
                choice = choices[index]
                if choice["logprobs"] is None:
                    choice["logprobs"] = {}
                _merge_logprobs(choice["logprobs"], part["logprobs"])
    for (index, key), pieces in texts.items():
        if pieces:  # a choice's content stays null when no delta carried any
            choices[index]["message"][key] = "".join(pieces)
    for index, calls in tool_calls.items():
        for call in calls.values():
            call["type"] = call["type"] or "function"
        choices[index]["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
    head["choices"] = [choices[i] for i in sorted(choices)]
    return head


def _fold_delta(
    choices: dict[int, Json],
    texts: dict[tuple[int, str], list[str]],
    tool_calls: dict[int, dict[int, Json]],
    index: int,
    delta: Json,
) -> None:
    """Everything a delta may carry into its choice (created on its first delta)."""
    choice = choices.get(index)
    if choice is None:
        choice = choices[index] = {
            "index": index,
            "message": {"role": "assistant", "content": None, "refusal": None},
            "finish_reason": None,
            "logprobs": None,
        }
        texts[index, "content"] = []
    message = choice["message"]
    if delta.get("role"):
        message["role"] = delta["role"]
    for key in ("content", "refusal"):
        piece = delta.get(key)
        if piece is not None:  # joined once at the end: += per chunk is quadratic
            texts.setdefault((index, key), []).append(piece)
    for call in delta.get("tool_calls") or ():
        _merge_tool_call(tool_calls.setdefault(index, {}), call)
    legacy = delta.get("function_call")
    if legacy:
        merged = message.setdefault("function_call", {"name": "", "arguments": ""})
        merged["name"] = merged["name"] or legacy.get("name") or ""
        merged["arguments"] += legacy.get("arguments") or ""
    if delta.get("annotations"):
        message.setdefault("annotations", []).extend(delta["annotations"])


def is_finished(completion: Json) -> bool:
    """Every choice has a finish_reason: the answer ended rather than being cut off."""
    choices = completion.get("choices") or []
    return bool(choices) and all(c.get("finish_reason") for c in choices)


def completion_from_body(body: bytes) -> Json:
    """A plain (non-streamed) upstream answer, checked to be a chat completion."""
    try:
        completion = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise AssemblyError("the upstream answer is not JSON") from None
    if not isinstance(completion, dict) or not isinstance(completion.get("id"), str):
        raise AssemblyError("the upstream answer is not a chat completion")
    if not completion["id"]:
        raise AssemblyError("the upstream answer has an empty id; it could not be retrieved")
    return completion


def completion_from_stream(stream: bytes) -> Json:
    completion = fold_chunks(chunks_of(stream))
    if not isinstance(completion.get("id"), str) or not completion["id"]:
        raise AssemblyError("the stream's chunks carry no id")
    return completion


def stored_completion(completion: Json, request: Json, request_id: str | None) -> Json:
    """The completion as the store keeps it: the upstream's answer plus the echoed request.

    ``metadata`` is kept apart (it changes on update) and spliced in on read.
    ``service_tier`` is the tier the upstream reports, else the one requested.
    """
    stored = {k: v for k, v in completion.items() if k != "metadata"}
    stored["object"] = "chat.completion"
    stored["request_id"] = request_id
    for key in ECHOED_FIELDS:
        stored[key] = request.get(key)
    if stored.get("service_tier") is None:
        if request.get("service_tier") is not None:
            stored["service_tier"] = request["service_tier"]
        else:
            stored.pop("service_tier", None)
    stored["input_user"] = request.get("user")
    return stored


def with_metadata(stored: bytes, metadata: bytes) -> bytes:
    """Splice the metadata object into a stored completion's JSON without re-encoding it."""
    return b"".join((stored[:-1], b',"metadata":', metadata, b"}"))


def _text_of(parts: list[Any]) -> str:
    return "\n".join(
        p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def input_messages(request: Json, completion_id: str) -> list[Json]:
    """The request's input messages as the messages endpoint lists them, in request order.

    Array content gives ``content`` = its text parts joined by a newline, and the parts
    themselves in ``content_parts``; string content gives ``content_parts: null``.
    """
    messages = request.get("messages")
    if not isinstance(messages, list):  # an imported or leniently accepted request: no list
        return []
    items: list[Json] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = content if isinstance(content, list) else None
        item: Json = {
            "id": f"{completion_id}-{index}",
            "role": message.get("role"),
            "content": _text_of(parts) if parts is not None else content,
            "name": message.get("name"),
            "content_parts": parts,
        }
        for key in ("tool_calls", "tool_call_id", "function_call", "refusal", "audio"):
            if key in message:
                item[key] = message[key]
        items.append(item)
    return items


def list_body(items: list[tuple[str, bytes]], has_more: bool) -> bytes:
    """An OpenAI list page from (id, JSON) items; ``first_id``/``last_id`` are null when empty."""
    first = orjson.dumps(items[0][0]) if items else b"null"
    last = orjson.dumps(items[-1][0]) if items else b"null"
    return b"".join(
        (
            b'{"object":"list","data":[',
            b",".join(body for _, body in items),
            b'],"first_id":',
            first,
            b',"last_id":',
            last,
            b',"has_more":',
            b"true" if has_more else b"false",
            b"}",
        )
    )
