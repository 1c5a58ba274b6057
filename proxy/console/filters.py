"""The log's view as query parameters and back: the URL holds the whole view; pure.

``q`` (full-text search, at most ``SEARCH_MAX`` characters as in the API), ``model``,
``caller`` (admins), ``meta`` (``KEY=VALUE``, repeatable), ``since`` / ``until`` (dates or
date-times, UTC; an ``until`` date includes that whole day), ``outcome``, and the page's
cursor: ``after`` (older than this id) or ``before`` (newer).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from urllib.parse import urlencode

from multidict import MultiMapping

from proxy.errors import InvalidRequest
from proxy.models import SEARCH_MAX, check_metadata, parse_moment

PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class LogView:
    q: str = ""
    model: str = ""
    caller: str = ""
    meta: tuple[tuple[str, str], ...] = ()
    since: str = ""
    until: str = ""
    outcome: str = ""
    after: str = ""
    before: str = ""

    @property
    def filtered(self) -> bool:
        return any(
            (self.q, self.model, self.caller, self.meta, self.since, self.until, self.outcome)
        )

    def params(self) -> list[tuple[str, str]]:
        pairs = [
            ("q", self.q),
            ("model", self.model),
            ("caller", self.caller),
            *(("meta", f"{k}={v}") for k, v in self.meta),
            ("since", self.since),
            ("until", self.until),
            ("outcome", self.outcome),
            ("after", self.after),
            ("before", self.before),
        ]
        return [(name, value) for name, value in pairs if value]

    def page_url(self, *, after: str = "", before: str = "") -> str:
        query = urlencode(replace(self, after=after, before=before).params())
        return "/ui/log" + (f"?{query}" if query else "")

    @staticmethod
    def input_type(value: str) -> str:
        """``date`` for a bare date or none; ``text`` keeps a time or Unix seconds, which a
        date input would empty and the next Apply would drop."""
        return "date" if not value or is_day(value) else "text"

    def since_seconds(self) -> int | None:
        return _moment(self.since, "since", end_of_day=False)

    def until_seconds(self) -> int | None:
        return _moment(self.until, "until", end_of_day=True)


def _moment(text: str, name: str, *, end_of_day: bool) -> int | None:
    if not text:
        return None
    try:
        seconds = parse_moment(text)
    except ValueError:
        raise InvalidRequest(
            f"{name} must be a date (2025-01-31) or a date and time (2025-01-31T12:00).",
            param=name,
        ) from None
    if end_of_day and is_day(text):  # up to the end of that day
        seconds += 86400
    return seconds


def is_day(text: str) -> bool:
    """A bare date as a date input writes it (2025-01-31): not a time, not Unix seconds."""
    try:
        return dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def parse_view(query: MultiMapping[str], *, admin: bool) -> LogView:
    pairs: dict[str, str] = {}
    for item in query.getall("meta", []):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest("A metadata filter is KEY=VALUE.", param="meta")
        pairs[key.strip()] = value.strip()
    check_metadata(pairs)
    q = query.get("q", "")
    if len(q) > SEARCH_MAX:  # as the API's list refuses it, rather than search part of it
        raise InvalidRequest(f"A search may be at most {SEARCH_MAX} characters.", param="q")
    view = LogView(
        q=q.strip(),
        model=query.get("model", "").strip(),
        caller=query.get("caller", "").strip() if admin else "",
        meta=tuple(pairs.items()),
        since=query.get("since", "").strip(),
        until=query.get("until", "").strip(),
        outcome=query.get("outcome", "").strip(),
        after=query.get("after", "").strip(),
        before=query.get("before", "").strip(),
    )
    view.since_seconds()
    view.until_seconds()
    return view


def day_range(
    since: str, until: str, today: dt.date, default_days: int = 30
) -> tuple[dt.date, dt.date]:
    """The usage page's days, first and last included; 30 days to today by default."""
    try:
        last = dt.date.fromisoformat(until) if until else today
        first = dt.date.fromisoformat(since) if since else last - dt.timedelta(default_days - 1)
    except (ValueError, OverflowError):  # OverflowError: 30 days back from near year 1
        raise InvalidRequest("Dates are YYYY-MM-DD.", param="since") from None
    if last == dt.date.max:  # the range ends at the midnight after the last day
        raise InvalidRequest("The last day must be before 9999-12-31.", param="until")
    if first > last:
        raise InvalidRequest("The first day is after the last.", param="since")
    if (last - first).days > 366:
        raise InvalidRequest("Choose at most a year.", param="since")
    return first, last
