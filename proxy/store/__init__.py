"""Where completions live: the backend-neutral contract and the one way to open a store.

The neutral part (the ``Store`` protocol, its records and errors) is here; each backend is a
subpackage that owns everything specific to it (schema, migrations, tuning, fast paths):

- ``proxy.store.sqlite``: one file; the default, needs no server.
- ``proxy.store.postgres``: a PostgreSQL database several proxy instances can share;
  imported only when a ``postgresql://`` URL is opened, so its driver is loaded only then.

A backend package offers ``create(url, settings, *, must_exist) -> Store`` (not yet open).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from proxy.store.errors import (
    KeyExists,
    RecordRefused,
    SearchOff,
    StoreError,
    StoreMissing,
    UnknownCursor,
)
from proxy.store.protocol import Store
from proxy.store.records import (
    AuditEntry,
    CompletionRecord,
    ExchangeRecord,
    ExportFilter,
    Importable,
    KeyRecord,
    LogEntry,
    Page,
    Prepared,
    PruneReport,
    StoredCompletion,
    UsageRow,
    Writable,
)

if TYPE_CHECKING:
    from proxy.config import StoreConfig

__all__ = [
    "AuditEntry",
    "CompletionRecord",
    "ExchangeRecord",
    "ExportFilter",
    "KeyExists",
    "KeyRecord",
    "LogEntry",
    "Importable",
    "Page",
    "Prepared",
    "PruneReport",
    "RecordRefused",
    "SearchOff",
    "Store",
    "StoreError",
    "StoreMissing",
    "StoredCompletion",
    "UnknownCursor",
    "UsageRow",
    "Writable",
    "backend_of",
    "make_store",
    "open_store",
]

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def backend_of(url: str) -> str:
    """The backend a ``--db`` / ``store.url`` value names: ``postgres`` for a
    ``postgresql://`` (or ``postgres://``) URL, else ``sqlite`` (a path, ``:memory:``, or a
    ``sqlite://`` URL)."""
    return "postgres" if url.startswith(_POSTGRES_SCHEMES) else "sqlite"


def make_store(url: str, settings: StoreConfig, *, must_exist: bool = False) -> Store:
    """The store ``url`` names, configured by ``settings``, not yet open. With
    ``must_exist`` (commands that only read) opening it raises ``StoreMissing`` rather
    than creating a new, empty store."""
    backend = backend_of(url)
    try:
        module = importlib.import_module(f"proxy.store.{backend}")
    except ImportError as error:  # the backend's driver is not installed
        raise StoreError(f"the {backend} store cannot be loaded: {error}") from error
    store: Store = module.create(url, settings, must_exist=must_exist)
    return store


async def open_store(url: str, settings: StoreConfig, *, must_exist: bool = False) -> Store:
    """``make_store``, opened: connected and its schema brought up to date. Raises
    ``StoreError`` (``StoreMissing`` with ``must_exist``) when it cannot be opened."""
    store = make_store(url, settings, must_exist=must_exist)
    await store.open()
    return store
