"""Prometheus metrics of one proxy application, kept in a registry that application owns.

Each ``Metrics`` builds its own ``CollectorRegistry`` instead of using prometheus_client's
global default one, so two apps in one process (tests do this all the time) never share or
collide on series. ``render()`` produces the exposition text for a ``/metrics`` handler.

Recording is on the request path, so the label children each call needs are looked up once
per label set and cached in plain dicts keyed by the label tuple: after the first request of
a kind, a call is a dict lookup and an ``inc``/``observe`` per series.

With ``caller_label=False`` the per-caller series (completions stored, tokens, cost) carry
only the model: totals stay, who made them does not appear in the exposition at all.
"""

from __future__ import annotations

import os
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
_TokenChildren = tuple[Counter, Counter, Counter]


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

        # Label children by label values; .labels() validates and locks on every call.
        self._models = _Bounded(200)
        self._callers = _Bounded(1000)
        self._request_children: dict[_RequestKey, Counter] = {}
        self._upstream_children: dict[str, Histogram] = {}
        self._overhead_children: dict[str, Histogram] = {}
        self._stored_children: dict[tuple[str, str], Counter] = {}
        self._token_children: dict[tuple[str, str], _TokenChildren] = {}
        self._cost_children: dict[tuple[str, str], Counter] = {}

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
        stream_label = _stream_label(stream)
        key = (route, status, self._models(model or ""), stream_label, outcome or "")
        child = self._request_children.get(key)
        if child is None:
            child = self._requests.labels(route, str(status), key[2], stream_label, key[4])
            self._request_children[key] = child
        child.inc()

        if upstream_seconds is not None:
            upstream = self._upstream_children.get(route)
            if upstream is None:
                upstream = self._upstream_children[route] = self._upstream.labels(route)
            upstream.observe(upstream_seconds)

        if proxy_seconds is not None:
            overhead = self._overhead_children.get(route)
            if overhead is None:
                overhead = self._overhead_children[route] = self._overhead.labels(route)
            overhead.observe(proxy_seconds)

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
        labels: tuple[str, ...] = (self._callers(caller), model) if self._caller_label else (model,)
        key = (labels[0], model)
        stored = self._stored_children.get(key)
        if stored is None:
            stored = self._stored_children[key] = self._stored.labels(*labels)
        stored.inc()

        tokens = self._token_children.get(key)
        if tokens is None:
            prompt, cached, completion = (
                self._tokens.labels(*labels, kind) for kind in TOKEN_KINDS
            )
            tokens = self._token_children[key] = (prompt, cached, completion)
        # Usage comes from the upstream; a negative count would make Counter.inc raise after
        # the commit, and a metric must never fail the write path, so it is ignored.
        for counter, amount in zip(
            tokens, (prompt_tokens, cached_tokens, completion_tokens), strict=True
        ):
            if amount > 0:
                counter.inc(amount)

        if cost is not None:
            # A known cost of zero still gets its series, so "free" differs from "unknown".
            cost_child = self._cost_children.get(key)
            if cost_child is None:
                cost_child = self._cost_children[key] = self._cost.labels(*labels)
            if cost > 0:
                cost_child.inc(cost)

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
            self._queue.set(self._queue_depth())

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (prometheus_client.CONTENT_TYPE_LATEST)."""
        if not self._multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.sample_queue()
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
