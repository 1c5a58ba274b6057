"""What full-text search reads of a completion, what a user's search means, and the short
preview of a request a log row shows; pure, and the same for every backend.

The searchable text is built from the stored request and completion, which are already
redacted (see ``proxy.redaction``), so a redacted secret is never in an index: the input
messages' text (string content and text parts), their tool calls' names and arguments, and
each choice's content, refusal and tool calls.

SQLite's index holds no copy of the text: it takes a row out by being given the same text
and tags again, made from the stored row. So ``searchable`` and ``filter_tags`` must give
the same output for the same row forever; a change to either needs a migration that indexes
every completion again (as ``m016_search_contentless`` does).

A search is words, each matched as a whole token (case- and accent-insensitive), all of
which must appear; punctuation inside a word makes it a phrase (``don't`` → ``"don t"``).
No operators: what a person types is never parsed as query syntax.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

PREVIEW_CHARS = 160
SEARCH_MAX_CHARS = 500
_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"\w")  # a word with no letter or digit matches nothing: left out


def _content_text(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
    return []


def _calls_text(calls: Any) -> list[str]:
    out: list[str] = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            out += [
                v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str)
            ]
    return out


def _message_text(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return []
    texts = _content_text(message.get("content")) + _calls_text(message.get("tool_calls"))
    refusal = message.get("refusal")
    if isinstance(refusal, str):
        texts.append(refusal)
    return texts


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


Parsed = tuple[Any, Any]


def searchable(request: bytes, completion: bytes, parsed: Parsed | None = None) -> str:
    """The text a completion is found by: its messages, answer and tool-call arguments.
    ``parsed`` is the request and completion already parsed, where the caller has them (an
    import's parser does), so they are not parsed twice."""
    texts: list[str] = []
    sent, answer = parsed if parsed is not None else (_loads(request), _loads(completion))
    if isinstance(sent, dict) and isinstance(sent.get("messages"), list):
        for message in sent["messages"]:
            texts += _message_text(message)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, dict):
            texts += _message_text(choice.get("message"))
    return "\n".join(text for text in texts if text)


def search_terms(search: str) -> list[str]:
    """The words of a search, as typed (the backend quotes them for its own syntax)."""
    return [t for t in _WORD.findall(search[:SEARCH_MAX_CHARS]) if _TOKEN.search(t)]


def _tag(kind: str, value: str) -> str:
    return kind + hashlib.blake2b(value.encode(), digest_size=10).hexdigest()


def filter_tags(
    caller: str | None, model: str | None, metadata: Iterable[tuple[str, str]] = ()
) -> list[str]:
    """A completion's caller, model and metadata pairs as index tokens (letters and digits
    only, whatever the values hold). A search with filters then intersects them inside the
    index, instead of testing every match of a common word against the filters."""
    tags = [] if caller is None else [_tag("o", caller)]
    if model is not None:
        tags.append(_tag("m", model))
    tags += [_tag("k", f"{key}\x00{value}") for key, value in metadata]
    return tags


def stored_tags(caller: str, model: str, metadata: bytes) -> str:
    """``filter_tags`` of a stored row (its metadata as the store encodes it), as one text."""
    return " ".join(filter_tags(caller, model, orjson.loads(metadata).items()))


def fts5_query(search: str, tags: Sequence[str] = ()) -> str | None:
    """A search as an FTS5 MATCH expression: every word a quoted string, all required, in
    the text column; every tag required in the tags column."""
    terms = search_terms(search)
    if not terms:
        return None
    words = " ".join('"' + term.replace('"', '""') + '"' for term in terms)
    match = f"body : ({words})"
    return match if not tags else f"{match} AND tags : ({' '.join(tags)})"


def preview(content: Any) -> str:
    """A message's content (a string, or the JSON of its parts) as one short line."""
    texts = _content_text(content)
    if isinstance(content, str) and content.startswith("["):  # parts, as the store reads them
        with contextlib.suppress(orjson.JSONDecodeError):
            texts = _content_text(orjson.loads(content)) or texts
    text = " ".join(" ".join(texts).split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "\u2026"
