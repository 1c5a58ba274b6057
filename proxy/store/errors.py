"""The store's own errors: what callers outside a backend catch, whatever the backend."""

from __future__ import annotations


class StoreError(Exception):
    """The store failed: cannot be opened (not a database, unreachable), locked past its
    timeout, full. The message is meant for a person; the backend's error is its cause."""


class StoreMissing(StoreError):
    """A command that only reads was pointed at a store that does not exist."""


class UnknownCursor(LookupError):
    """``after`` names an id this caller never had."""


class KeyExists(ValueError):
    """A proxy key with this name exists already."""


class SearchOff(Exception):
    """A search was asked of a store opened with search off (``store.search: false``)."""

    def __init__(self) -> None:
        super().__init__(
            "Full-text search is off on this proxy (store.search: false): completions are"
            " not indexed for search. List without search, or turn store.search on."
        )
