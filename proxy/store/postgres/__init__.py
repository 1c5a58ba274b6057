"""The PostgreSQL backend: one database shared by several proxy instances.

``store.url`` (or ``--db``) is a ``postgresql://user:password@host:port/database`` URL (libpq
style; ``postgres://`` too). Query parameters other than the driver's own are server settings
for every connection, e.g. ``?search_path=team_a`` keeps the tables in schema ``team_a``.
``store.postgres`` holds the pool size and the timeouts. docs/storage-postgres.md describes
the schema, the locks and what retention guarantees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.postgres.store import PostgresStore

if TYPE_CHECKING:
    from proxy.config import StoreConfig

__all__ = ["PostgresStore", "create"]


def create(url: str, settings: StoreConfig, *, must_exist: bool = False) -> PostgresStore:
    """A store on the database ``url`` names, set up from ``settings.postgres``; not open."""
    pg = settings.postgres
    return PostgresStore(
        url,
        pool_min=pg.pool_min,
        pool_max=pg.pool_max,
        connect_timeout=pg.connect_timeout,
        statement_timeout=pg.statement_timeout,
        must_exist=must_exist,
        search=settings.search,
    )
