"""Full-text search on PostgreSQL: the document a completion is found by, and a search as a
``tsquery``; pure functions.

The text is ``proxy.store.text.searchable`` (the same for every backend), folded: accents
taken off (NFKD, combining marks dropped) so a search is accent-insensitive without a
server extension. Stored as ``to_tsvector('simple', ...)``: lower-cased whole tokens, no
stemming, as SQLite's FTS5 ``unicode61`` tokenizer does. Each word of a search must appear;
a word with punctuation inside is a phrase (``phraseto_tsquery``), never query syntax.
"""

from __future__ import annotations

import unicodedata

from proxy.store.text import search_terms, searchable


def fold(text: str) -> str:
    """``text`` without accents (and NUL, which PostgreSQL text cannot hold)."""
    decomposed = unicodedata.normalize("NFKD", text.replace("\x00", " "))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def document(request: bytes, completion: bytes) -> str:
    """What ``to_tsvector`` is given for a completion."""
    return fold(searchable(request, completion))


def terms(search: str) -> list[str]:
    """The words of a search, folded; each becomes one ``phraseto_tsquery``."""
    return [fold(term) for term in search_terms(search)]
