"""Full-text search on PostgreSQL: the document a completion is found by, and a search as a
``tsquery``; pure functions.

The text is ``proxy.store.text.searchable`` (the same for every backend). Words are cut here,
not by PostgreSQL's text parser: runs of letters and digits (as SQLite's ``unicode61``
tokenizer cuts them), lower-cased, accents folded (NFKD, combining marks dropped). The
document goes to PostgreSQL as a ``tsvector`` in its binary wire format (each word with its
positions; see ``TSVECTOR_CODEC``), and a search as a ``tsquery`` literal: every word of the
search must appear, and a word with punctuation inside (``don't``) is a phrase of its parts
(``'don' <-> 't'``). What a person types is never query syntax.

Cutting words in Python costs a fraction of ``to_tsvector``, whose parser took about 0.9 ms
per bench completion on the server; the binary form spares the server the parse of a
``tsvector`` literal too (about 35 us per bench completion, a sixth of a batch's insert).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from proxy.store.text import Parsed, search_terms, searchable

_TOKEN = re.compile(r"[^\W_]+")
MAX_POSITION = 16383  # PostgreSQL's largest tsvector position
MAX_POSITIONS = 256  # positions kept per word (PostgreSQL keeps no more)
MAX_WORD_BYTES = 2046  # PostgreSQL's longest lexeme
MAX_WORDS = 100_000  # words of one document read at most (a tsvector must stay under 1 MB)
# Each number up to MAX_POSITION as a big-endian uint16 (the wire format's positions and
# counts), made once: converting numbers in the loop cost more than the rest of it.
_UINT16 = tuple(n.to_bytes(2, "big") for n in range(MAX_POSITION + 1))
_POSITIONS = _UINT16[1:]
# What ends a word in the wire format, by its number of positions: the NUL, then the count.
_HEADS = tuple(b"\0" + count for count in _UINT16[: MAX_POSITIONS + 1])
# ASCII letters and digits lower-cased, every other byte a space: the words of ASCII text.
_ASCII_WORDS = bytes(
    ord(chr(c).lower()) if chr(c).isascii() and chr(c).isalnum() else 32 for c in range(256)
)
# How asyncpg sends a ``tsvector`` parameter: the bytes ``vector`` made, as they are (binary
# format). Every connection of the store registers it (``Connection.set_type_codec``).
TSVECTOR_CODEC: dict[str, Any] = {
    "schema": "pg_catalog",
    "encoder": bytes,
    "decoder": bytes,
    "format": "binary",
}


def fold(text: str) -> str:
    """``text`` lower-cased, without accents."""
    if text.isascii():  # most text, at the cost of one scan in C
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> list[bytes]:
    """The words of ``text``, each UTF-8 encoded."""
    if text.isascii():  # most text: one table lookup per byte, then a split, both in C
        return text.encode().translate(_ASCII_WORDS).split()
    return [word.encode() for word in _TOKEN.findall(fold(text))]


def vector(text: str, tags: Sequence[str] = ()) -> bytes:
    """``text`` as a ``tsvector`` in PostgreSQL's binary format (``tsvectorrecv``): the
    number of words (int32), then each word once, NUL-terminated, with its number of
    positions and the positions (uint16 each, ascending). The server sorts the words.
    ``tags`` are words without positions (a word of the text already found as it is).

    The loop is the write path's largest cost in Python, so it does the least per word:
    words are bytes from the start, each entry is kept as its word, its count's place and
    its positions' bytes, ready to join, and the caps on positions per word and on word
    length are applied once per word."""
    found = words(text)
    entries: dict[bytes, list[bytes]] = {}
    get = entries.get
    for word, at in zip(found, _POSITIONS, strict=False):  # the first MAX_POSITION words
        entry = get(word)
        if entry is None:
            entries[word] = [word, b"", at]  # b"": its count, once known
        else:
            entry.append(at)
    if len(found) > MAX_POSITION:  # past the last position: all at the last one
        last = _POSITIONS[-1]
        for word in found[MAX_POSITION:MAX_WORDS]:
            entry = get(word)
            if entry is None:
                entries[word] = [word, b"", last]
            elif entry[-1] != last:
                entry.append(last)
    out = [b""]  # the count, once known
    extend = out.extend
    kept = 0
    for word, entry in entries.items():
        if len(word) <= MAX_WORD_BYTES:
            if len(entry) > MAX_POSITIONS + 2:
                del entry[MAX_POSITIONS + 2 :]
            entry[1] = _HEADS[len(entry) - 2]
            extend(entry)
            kept += 1
    for tag in tags:
        encoded = tag.encode()
        if encoded not in entries:
            entries[encoded] = []
            out.append(encoded + b"\0\0\0")
            kept += 1
    out[0] = kept.to_bytes(4, "big")
    return b"".join(out)


def document(
    request: bytes, completion: bytes, tags: Sequence[str] = (), parsed: Parsed | None = None
) -> bytes:
    """What a completion's ``search`` column is made from (a binary tsvector): its words
    with their positions, and its filter tags (``text.filter_tags``: caller, model and
    metadata pairs, letters and digits only) as words without positions, so a search with
    filters is one intersection inside the index. ``parsed`` as for ``searchable``."""
    return vector(searchable(request, completion, parsed), tags)


def tag_words(tags: Sequence[str]) -> list[str]:
    """Tags as the words of a tsvector or tsquery literal."""
    return [f"'{tag}'" for tag in tags]


def query(search: str, tags: Sequence[str] = ()) -> str | None:
    """A search as a tsquery literal (every word required, and every tag), or None when it
    has no word."""
    phrases = []
    for term in search_terms(search):
        parts = [w.decode() for w in words(term) if len(w) <= MAX_WORD_BYTES]
        if parts:
            phrases.append("(" + " <-> ".join(f"'{part}'" for part in parts) + ")")
    return " & ".join(phrases + tag_words(tags)) if phrases else None
