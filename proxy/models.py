"""Validation at the edges: metadata, list queries and the update body.

Every rejection is an ``InvalidRequest`` naming the offending ``param``, so a bad input
becomes a 400 in OpenAI's shape and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, overload

import orjson
from multidict import MultiMapping

from proxy.errors import InvalidRequest

METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
LIMIT_DEFAULT = 20
LIMIT_MAX = 100
INT64_MAX = 2**63 - 1
SEARCH_MAX = 500

Order = Literal["asc", "desc"]
Json = dict[str, Any]


def no_nul(text: str, param: str) -> str:
    """``text``, unless it holds U+0000: PostgreSQL's text cannot, so such a value could never
    be stored or matched there, and it is refused on every backend alike."""
    if "\x00" in text:
        raise InvalidRequest(f"{param} may not contain the NUL character (U+0000).", param=param)
    return text


@overload
def single(query: MultiMapping[str], name: str) -> str | None: ...
@overload
def single(query: MultiMapping[str], name: str, default: str) -> str: ...
def single(query: MultiMapping[str], name: str, default: str | None = None) -> str | None:
    """The value of the query parameter ``name``, or ``default``; a parameter given more than
    once is a 400, since which value was meant cannot be told (the SDKs never repeat one)."""
    values = query.getall(name, ())
    if len(values) > 1:
        raise InvalidRequest(f"{name} is given more than once; give it once.", param=name)
    return values[0] if values else default


def caller_param(query: MultiMapping[str]) -> str | None:
    """An admin's ``caller=NAME`` filter, if given (see ``no_nul``)."""
    owner = single(query, "caller")
    return None if owner is None else no_nul(owner, "caller")


def check_metadata(value: Any) -> dict[str, str]:
    """OpenAI's metadata rules: at most 16 string pairs, keys ≤ 64 and values ≤ 512 chars;
    no NUL characters (see ``no_nul``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(
            "metadata must be an object of string keys and values.", param="metadata"
        )
    if len(value) > METADATA_MAX_PAIRS:
        raise InvalidRequest(
            f"metadata may hold at most {METADATA_MAX_PAIRS} pairs; got {len(value)}.",
            param="metadata",
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidRequest(f"metadata value of {key!r} must be a string.", param="metadata")
        if len(key) > METADATA_MAX_KEY:
            raise InvalidRequest(
                f"metadata keys may be at most {METADATA_MAX_KEY} characters.", param="metadata"
            )
        if len(item) > METADATA_MAX_VALUE:
            raise InvalidRequest(
                f"metadata values may be at most {METADATA_MAX_VALUE} characters.",
                param="metadata",
            )
        no_nul(key, "metadata")
        no_nul(item, "metadata")
    return dict(value)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the proxy reads of a create request; the bytes themselves go upstream untouched."""

    body: Json
    store: bool
    model: str
    metadata: dict[str, str]


def peek_chat_request(raw: bytes) -> ChatRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"The request body is not valid JSON: {error.msg}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise InvalidRequest("store must be a boolean.", param="store")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean.", param="stream")
    model = body.get("model")
    if store and not isinstance(model, str):
        raise InvalidRequest("model must be a string.", param="model")
    metadata = check_metadata(body.get("metadata"))
    return ChatRequest(body=body, store=bool(store), model=model or "", metadata=metadata)


def is_digits(text: str) -> bool:
    """Plain ASCII digits only: ``str.isdigit`` also takes ``²`` and other scripts' digits,
    and ``int`` also takes ``_``, spaces and a sign."""
    return text.isascii() and text.isdigit()


def parse_moment(text: str) -> int:
    """Unix seconds, or an ISO 8601 date or date-time (UTC unless it says otherwise).

    Raises ValueError (also for seconds past 64 bits); the command line and the admin
    endpoints word their own message.
    """
    if is_digits(text):
        seconds = int(text)
        if seconds > INT64_MAX:
            raise ValueError("out of range")
        return seconds
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _limit(query: MultiMapping[str]) -> int:
    raw = single(query, "limit")
    if raw is None:
        return LIMIT_DEFAULT
    if not is_digits(raw) or len(raw) > 4:
        raise InvalidRequest(f"limit must be an integer from 1 to {LIMIT_MAX}.", param="limit")
    limit = int(raw)
    if not 1 <= limit <= LIMIT_MAX:
        raise InvalidRequest(f"limit must be between 1 and {LIMIT_MAX}.", param="limit")
    return limit


def _order(query: MultiMapping[str]) -> Order:
    raw = single(query, "order", "asc")
    if raw == "asc":
        return "asc"
    if raw == "desc":
        return "desc"
    raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")


@dataclass(frozen=True, slots=True)
class PageQuery:
    after: str | None = None
    limit: int = LIMIT_DEFAULT
    order: Order = "asc"


@dataclass(frozen=True, slots=True)
class ListQuery:
    page: PageQuery = PageQuery()
    model: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    owner: str | None = None  # an admin's ``caller=`` filter (an extension of OpenAI's list)
    since: int | None = None  # created >= since (the console's time range)
    until: int | None = None  # created < until
    # Full-text search over prompts and answers (``search=``, an extension of OpenAI's
    # list). With a search, pages run newest-stored first or last by storage order.
    search: str | None = None


def parse_page_query(query: MultiMapping[str]) -> PageQuery:
    after = single(query, "after")
    if after == "":
        after = None
    if after is not None:
        no_nul(after, "after")
    return PageQuery(after=after, limit=_limit(query), order=_order(query))


def parse_list_query(query: MultiMapping[str]) -> ListQuery:
    """``model``, ``metadata[KEY]=VALUE`` pairs (AND-ed, each key at most once), and the page.

    A key given twice, or a nested ``metadata[a][b]``, is a 400: OpenAI's metadata values
    are single strings, so neither can mean anything.
    """
    pairs: dict[str, str] = {}
    for name, value in query.items():
        if not name.startswith("metadata"):
            continue
        if not (name.startswith("metadata[") and name.endswith("]")):
            raise InvalidRequest(
                f"{name!r} is not a metadata filter; write metadata[KEY]=VALUE.",
                param="metadata",
            )
        key = name[len("metadata[") : -1]
        if not key or "][" in key:
            raise InvalidRequest(
                "metadata filters are metadata[KEY]=VALUE with a non-empty KEY.", param="metadata"
            )
        no_nul(key, "metadata")
        no_nul(value, "metadata")
        if key in pairs:
            raise InvalidRequest(
                f"metadata[{key}] is given more than once; filter each key once.",
                param="metadata",
            )
        pairs[key] = value
    model = single(query, "model") or None
    if model is not None:
        no_nul(model, "model")
    search = single(query, "search") or None
    if search is not None and len(search) > SEARCH_MAX:
        raise InvalidRequest(f"search may be at most {SEARCH_MAX} characters.", param="search")
    return ListQuery(
        page=parse_page_query(query),
        model=model,
        metadata=tuple(pairs.items()),
        search=search.strip() or None if search else None,
    )


def parse_update_body(raw: bytes) -> dict[str, str]:
    """The update body: ``{"metadata": {...} | null}``; it replaces the whole map."""
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"The request body is not valid JSON: {error.msg}.") from None
    if not isinstance(body, Mapping):
        raise InvalidRequest("The request body must be a JSON object with metadata.")
    if "metadata" not in body:
        raise InvalidRequest("metadata is required.", param="metadata")
    unknown = sorted(set(body) - {"metadata"})
    if unknown:
        raise InvalidRequest(f"Unknown parameter: {unknown[0]}.", param=unknown[0])
    return check_metadata(body["metadata"])
