"""The SQLite backend: one database file, WAL, one writer thread; the default store.

``store.url`` (or ``--db``) is a file path, ``:memory:``, or ``sqlite:///absolute/path``
(``sqlite://relative/path``); ``store.sqlite`` holds its settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.sqlite.store import SQLiteStore

if TYPE_CHECKING:
    from proxy.config import StoreConfig

__all__ = ["SQLiteStore", "create", "path_of"]


def path_of(url: str) -> str:
    """The file a ``sqlite://`` URL or a plain path names."""
    return url.removeprefix("sqlite://")


def create(url: str, settings: StoreConfig, *, must_exist: bool = False) -> SQLiteStore:
    """A store on the file ``url`` names, set up from ``settings.sqlite``; not yet open."""
    return SQLiteStore(
        path_of(url),
        synchronous=settings.sqlite.synchronous,
        max_bytes=settings.sqlite.max_bytes,
        must_exist=must_exist,
        checkpoints=settings.sqlite.checkpoints,
        search=settings.search,
    )
