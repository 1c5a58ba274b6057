"""The store's own errors: what callers outside a backend catch, whatever the backend."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

Cls = TypeVar("Cls", bound=type)


class StoreError(Exception):
    """The store failed: cannot be opened (not a database, unreachable), locked past its
    timeout, full. The message is meant for a person; the backend's error is its cause."""


class RecordRefused(StoreError):
    """The database refused a value of the record being written (a character or a number its
    types cannot hold): the record's fault, not the store's, which can still write."""


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


def raises_store_errors(
    failures: tuple[type[BaseException], ...], convert: Callable[[BaseException], StoreError]
) -> Callable[[Cls], Cls]:
    """A class decorator for a backend: every public coroutine (and async generator) of the
    class raises ``convert(error)``, caused by ``error``, where one of ``failures`` was
    raised, so nothing outside the backend sees its driver's errors. Anything else is a bug
    and stays itself."""

    def coroutine(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except failures as error:
                raise convert(error) from error

        return wrapper

    def generator(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except failures as error:
                raise convert(error) from error

        return wrapper

    def decorate(cls: Cls) -> Cls:
        for name, fn in list(vars(cls).items()):
            if name.startswith("_"):
                continue
            if inspect.iscoroutinefunction(fn):
                setattr(cls, name, coroutine(fn))
            elif inspect.isasyncgenfunction(fn):
                setattr(cls, name, generator(fn))
        return cls

    return decorate
