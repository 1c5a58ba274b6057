"""A stored completion as a conversation a person reads, and the snippets that re-run it; pure.

Input messages come from the request as the client sent it; the answer's choices from the
stored completion. Tool-call arguments are shown as indented JSON when they parse, else as
the text they are. Nothing here escapes: the templates do, always.
"""

from __future__ import annotations

import json
import pprint
import shlex
from dataclasses import dataclass, field
from typing import Any

import orjson

Json = dict[str, Any]

# Request fields that are not "parameters": shown elsewhere on the page.
_NOT_PARAMETERS = frozenset({"messages", "tools", "metadata"})


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # indented JSON when it parses, else as sent


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    text: str
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    parts: list[str] = field(default_factory=list)  # non-text content parts, described
    finish_reason: str | None = None
    index: int | None = None  # the choice index of an answer


def _indented(text: str) -> str:
    try:
        return orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return text


def _tool_calls(value: Any) -> list[ToolCall]:
    calls = []
    for call in value if isinstance(value, list) else []:
        if not isinstance(call, dict):
            continue
        found = call.get("function")
        function: Json = found if isinstance(found, dict) else {}
        arguments = function.get("arguments")
        calls.append(
            ToolCall(
                id=str(call.get("id") or ""),
                name=str(function.get("name") or call.get("type") or ""),
                arguments=_indented(arguments)
                if isinstance(arguments, str)
                else orjson.dumps(arguments, option=orjson.OPT_INDENT_2).decode(),
            )
        )
    return calls


def _content(value: Any) -> tuple[str, list[str]]:
    """(the text, descriptions of other parts) of a message's content."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return value, []
    texts, others = [], []
    for part in value if isinstance(value, list) else [value]:
        if isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict):
            kind = str(part.get("type", "part"))
            detail = part.get(kind)
            url = detail.get("url") if isinstance(detail, dict) else None
            if isinstance(url, str) and url.startswith("data:"):
                url = url.split(",", 1)[0] + ",…"
            others.append(f"{kind}: {url}" if url else kind)
        else:
            texts.append(str(part))
    return "\n".join(texts), others


def _message(data: Any, **extra: Any) -> Message:
    if not isinstance(data, dict):
        return Message(role="?", text=str(data), **extra)
    text, parts = _content(data.get("content"))
    refusal = data.get("refusal")
    return Message(
        role=str(data.get("role") or "?"),
        text=text,
        name=data.get("name") if isinstance(data.get("name"), str) else None,
        refusal=refusal if isinstance(refusal, str) and refusal else None,
        tool_calls=_tool_calls(data.get("tool_calls")),
        tool_call_id=data.get("tool_call_id")
        if isinstance(data.get("tool_call_id"), str)
        else None,
        parts=parts,
        **extra,
    )


def input_messages(request: Json) -> list[Message]:
    messages = request.get("messages")
    return [_message(m) for m in messages] if isinstance(messages, list) else []


def answers(completion: Json) -> list[Message]:
    """One message per choice, in choice order."""
    choices = completion.get("choices")
    out = []
    for position, choice in enumerate(choices if isinstance(choices, list) else []):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", position)
        out.append(
            _message(
                choice.get("message") or {},
                finish_reason=choice.get("finish_reason"),
                index=index if isinstance(index, int) else position,
            )
        )
    return out


def parameters(request: Json) -> list[tuple[str, str]]:
    """The request's other fields as (name, JSON text), in the order sent."""
    return [
        (name, value if isinstance(value, str) else orjson.dumps(value).decode())
        for name, value in request.items()
        if name not in _NOT_PARAMETERS
    ]


def curl_snippet(request: Json, base_url: str) -> str:
    body = json.dumps(request, indent=2, ensure_ascii=False)
    return (
        f"curl {shlex.quote(base_url + '/chat/completions')} \\\n"
        '  -H "Authorization: Bearer $OPENAI_API_KEY" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d {shlex.quote(body)}"
    )


def python_snippet(request: Json, base_url: str) -> str:
    literal = pprint.pformat(request, indent=1, width=88, sort_dicts=False)
    lines = [
        "from openai import OpenAI",
        "",
        f"client = OpenAI(base_url={base_url!r})  # the key from OPENAI_API_KEY",
        f"request = {literal}",
        "completion = client.chat.completions.create(**request)",
    ]
    if request.get("stream") is True:
        lines += [
            "for chunk in completion:",
            "    if chunk.choices and chunk.choices[0].delta.content:",
            '        print(chunk.choices[0].delta.content, end="")',
        ]
    else:
        lines.append("print(completion.choices[0].message.content)")
    return "\n".join(lines)
