"""Full-text search on PostgreSQL: the document a completion is found by, and a search as a
``tsquery``; pure functions.

The text is ``proxy.store.text.searchable`` (the same for every backend). Words are cut here,
not by PostgreSQL's text parser: runs of letters and digits (as SQLite's ``unicode61``
tokenizer cuts them), lower-cased, accents folded (NFKD, combining marks dropped). The
document goes to PostgreSQL as a ``tsvector`` literal with each word's positions, and a
search as a ``tsquery`` literal: every word of the search must appear, and a word with
punctuation inside (``don't``) is a phrase of its parts (``'don' <-> 't'``). What a person
types is never query syntax. Cutting words in Python costs a fraction of ``to_tsvector``,
whose parser took about 0.9 ms per bench completion on the server, one writer's whole budget.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from proxy.store.text import search_terms, searchable

_TOKEN = re.compile(r"[^\W_]+")
MAX_POSITION = 16383  # PostgreSQL's largest tsvector position
MAX_POSITIONS = 256  # positions kept per word (PostgreSQL keeps no more)
MAX_WORD_BYTES = 2046  # PostgreSQL's longest lexeme
MAX_WORDS = 100_000  # words of one document read at most (a tsvector must stay under 1 MB)


def fold(text: str) -> str:
    """``text`` lower-cased, without accents."""
    if text.isascii():  # most text, at the cost of one scan in C
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    return _TOKEN.findall(fold(text))


def vector(text: str) -> str:
    """``text`` as a tsvector literal: each word once, with its positions. Words are letters
    and digits only, so they never need escaping inside the literal's quotes."""
    positions: dict[str, list[int]] = {}
    for position, word in enumerate(words(text)[:MAX_WORDS], 1):
        at = min(position, MAX_POSITION)
        seen = positions.get(word)
        if seen is None:
            if len(word) * 4 > MAX_WORD_BYTES and len(word.encode()) > MAX_WORD_BYTES:
                continue
            positions[word] = [at]
        elif len(seen) < MAX_POSITIONS and seen[-1] != at:
            seen.append(at)
    return " ".join(f"'{word}':{','.join(map(str, at))}" for word, at in positions.items())


def document(request: bytes, completion: bytes, tags: Sequence[str] = ()) -> str:
    """What a completion's ``search`` column is made from (a tsvector literal): its words
    with their positions, and its filter tags (``text.filter_tags``: caller, model and
    metadata pairs, letters and digits only) as words without positions, so a search with
    filters is one intersection inside the index."""
    return " ".join([vector(searchable(request, completion)), *tag_words(tags)]).strip()


def tag_words(tags: Sequence[str]) -> list[str]:
    return [f"'{tag}'" for tag in tags]


def query(search: str, tags: Sequence[str] = ()) -> str | None:
    """A search as a tsquery literal (every word required, and every tag), or None when it
    has no word."""
    phrases = []
    for term in search_terms(search):
        parts = [w for w in words(term) if len(w.encode()) <= MAX_WORD_BYTES]
        if parts:
            phrases.append("(" + " <-> ".join(f"'{part}'" for part in parts) + ")")
    return " & ".join(phrases + tag_words(tags)) if phrases else None
