"""Prometheus metrics of one proxy application, kept in a registry that application owns.

Each ``Metrics`` builds its own ``CollectorRegistry`` instead of using prometheus_client's
global default one, so two apps in one process (tests do this all the time) never share or
collide on series. ``render()`` produces the exposition text for a ``/metrics`` handler.

Recording is on the request path, and a prometheus_client series takes a lock and runs
Python checks on every ``inc`` and ``observe``. So a request only adds to plain tallies of
this object (a dict entry per label set; for a histogram, the count of its bucket, found by
``bisect``, and its sum), and ``flush`` adds the tallies to the series in one go: before each
render, so a scrape sees every request finished before it, and, with several workers, once a
second (``sample_queue``) and at shutdown, so a scrape of one worker reads the others' values
as of their last second.

With ``caller_label=False`` the per-caller series (completions stored, tokens, cost) carry
only the model: totals stay, who made them does not appear in the exposition at all.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

PREFIX = "completions_proxy_"

# Time to the upstream's response headers: a cached or tiny completion answers in tens of
# milliseconds, a long reasoning call can take minutes before its first byte.
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

# The proxy's own share of a request (routing, capture, queueing the write): it should stay
# well under a millisecond, and anything near 100 ms is a problem worth seeing.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

TOKEN_KINDS = ("prompt", "cached", "completion")

_RequestKey = tuple[str, int, str, str, str]


class _Tally:
    """Observations of one histogram series not yet flushed: a count per bucket (the last
    one +Inf) and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0

    def add(self, bounds: tuple[float, ...], value: float) -> None:
        # The first bucket whose bound is >= value, as Histogram.observe picks it.
        self.counts[bisect_left(bounds, value)] += 1
        self.total += value

    def flush(self, child: Histogram) -> None:
        # prometheus_client has no public way to add many observations at once; a
        # histogram series keeps one value per bucket (not cumulative) and its sum.
        for bucket, count in zip(child._buckets, self.counts, strict=True):
            if count:
                bucket.inc(count)
        child._sum.inc(self.total)


class _Stored:
    """Stored completions of one (caller, model) not yet flushed."""

    __slots__ = ("completions", "cost", "costed", "tokens")

    def __init__(self) -> None:
        self.completions = 0
        self.tokens = [0, 0, 0]  # prompt, cached, completion
        self.cost = 0.0
        self.costed = False  # a known cost came, zero included


def _stream_label(stream: bool | None) -> str:
    if stream is None:
        return ""
    return "true" if stream else "false"


class _Bounded:
    """Label values as they come, until ``cap`` distinct ones; then ``other``.

    Models and callers come from clients: without a bound, made-up model names or a stream
    of fresh tokens would grow the registry without end.
    """

    __slots__ = ("_cap", "_seen")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._cap:
            return "other"
        self._seen.add(value)
        return value


class Metrics:
    """Prometheus metrics of one proxy application, in its own registry."""

    def __init__(self, queue_depth: Callable[[], int], *, caller_label: bool = True) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._caller_label = caller_label
        # Requests finished since start, all routes and statuses: a shutdown reports the
        # difference as the requests it drained.
        self.finished = 0
        owner = ["caller"] if caller_label else []

        self._requests = Counter(
            PREFIX + "requests_total",
            "Finished requests.",
            ["route", "status", "model", "stream", "outcome"],
            registry=registry,
        )
        self._upstream = Histogram(
            PREFIX + "upstream_seconds",
            "Time from sending a request upstream to the upstream's response headers.",
            ["route"],
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        self._overhead = Histogram(
            PREFIX + "overhead_seconds",
            "Time the proxy itself spent on a request, upstream time excluded.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        queue = Gauge(
            PREFIX + "store_queue_depth",
            "Completions waiting to be written to the store.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # Several workers (see supervisor): each keeps its values in files of this directory,
        # and a scrape of any of them reads every worker's files.
        self._multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._queue = queue
        self._queue_depth = queue_depth
        if not self._multiprocess:
            # Read at scrape time, so the writer needs no hook to keep a gauge up to date.
            queue.set_function(queue_depth)
        self._write_failures = Counter(
            PREFIX + "store_write_failures_total",
            "Failed writes of completions to the store.",
            registry=registry,
        )
        self._stored = Counter(
            PREFIX + "completions_stored_total",
            "Completions committed to the store.",
            [*owner, "model"],
            registry=registry,
        )
        self._tokens = Counter(
            PREFIX + "tokens_total",
            "Tokens of stored completions, by kind (prompt, cached, completion).",
            [*owner, "model", "kind"],
            registry=registry,
        )
        self._cost = Counter(
            PREFIX + "cost_usd_total",
            "Cost in US dollars of stored completions whose cost is known.",
            [*owner, "model"],
            registry=registry,
        )

        self._models = _Bounded(200)
        self._callers = _Bounded(1000)
        # What requests added since the last flush, by label values.
        self._requests_due: dict[_RequestKey, int] = {}
        self._upstream_due: dict[str, _Tally] = {}
        self._overhead_due: dict[str, _Tally] = {}
        self._stored_due: dict[tuple[str, ...], _Stored] = {}

    def request(
        self,
        *,
        route: str,
        status: int,
        model: str | None,
        stream: bool | None,
        outcome: str | None,
        upstream_seconds: float | None,
        proxy_seconds: float | None,
    ) -> None:
        """One finished request. route is a low-cardinality name like "create", "list",
        "retrieve", "update", "delete", "messages", "forward", "admin", "other"."""
        self.finished += 1
        key = (route, status, self._models(model or ""), _stream_label(stream), outcome or "")
        self._requests_due[key] = self._requests_due.get(key, 0) + 1
        if upstream_seconds is not None:
            tally = self._upstream_due.get(route)
            if tally is None:
                tally = self._upstream_due[route] = _Tally(len(UPSTREAM_BUCKETS))
            tally.add(UPSTREAM_BUCKETS, upstream_seconds)
        if proxy_seconds is not None:
            tally = self._overhead_due.get(route)
            if tally is None:
                tally = self._overhead_due[route] = _Tally(len(OVERHEAD_BUCKETS))
            tally.add(OVERHEAD_BUCKETS, proxy_seconds)

    def stored(
        self,
        *,
        caller: str,
        model: str,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        cost: float | None,
    ) -> None:
        """One completion committed to the store."""
        model = self._models(model)
        labels = (self._callers(caller), model) if self._caller_label else (model,)
        due = self._stored_due.get(labels)
        if due is None:
            due = self._stored_due[labels] = _Stored()
        due.completions += 1
        tokens = due.tokens
        # Usage comes from the upstream; a negative count would make Counter.inc raise, and
        # a metric must never fail the write path, so it is ignored.
        if prompt_tokens > 0:
            tokens[0] += prompt_tokens
        if cached_tokens > 0:
            tokens[1] += cached_tokens
        if completion_tokens > 0:
            tokens[2] += completion_tokens
        if cost is not None:
            # A known cost of zero still gets its series, so "free" differs from "unknown".
            due.costed = True
            if cost > 0:
                due.cost += cost

    def flush(self) -> None:
        """Add what was recorded since the last flush to the series."""
        requests, self._requests_due = self._requests_due, {}
        for (route, status, model, stream, outcome), count in requests.items():
            self._requests.labels(route, str(status), model, stream, outcome).inc(count)
        upstream, self._upstream_due = self._upstream_due, {}
        overhead, self._overhead_due = self._overhead_due, {}
        for histogram, tallies in ((self._upstream, upstream), (self._overhead, overhead)):
            for route, tally in tallies.items():
                tally.flush(histogram.labels(route))
        stored, self._stored_due = self._stored_due, {}
        for labels, due in stored.items():
            self._stored.labels(*labels).inc(due.completions)
            for kind, amount in zip(TOKEN_KINDS, due.tokens, strict=True):
                self._tokens.labels(*labels, kind).inc(amount)
            if due.costed:
                self._cost.labels(*labels).inc(due.cost)

    def write_failed(self) -> None:
        """One write of completions to the store failed."""
        self._write_failures.inc()

    @property
    def multiprocess(self) -> bool:
        """True when several workers share these metrics through files."""
        return self._multiprocess

    def sample_queue(self) -> None:
        """Copy the writer's queue depth into the gauge (several workers: each does so
        periodically, since a scrape reaches only one of them)."""
        if self._multiprocess:
            self.flush()
            self._queue.set(self._queue_depth())

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (prometheus_client.CONTENT_TYPE_LATEST)."""
        if not self._multiprocess:
            self.flush()
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.sample_queue()  # flushes too
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
