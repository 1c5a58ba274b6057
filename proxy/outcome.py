"""How an exchange ended: exactly one outcome each, in captures, logs and audit records.

An outcome is set once per exchange. ``OutcomeSet`` is what a second assignment raises: two
parts of the request path disagreeing about how an exchange ended is a bug, not a choice.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    COMPLETE = "complete"  # the whole answer reached the client (and the store, when asked)
    UPSTREAM_ERROR = "upstream_error"  # the upstream answered non-2xx; relayed as it came
    UPSTREAM_FAILED = "upstream_failed"  # refused, timed out, or dropped before the end
    CLIENT_GONE = "client_gone"  # the client went away before the end
    UNSTORABLE = "unstorable"  # a 2xx answer that is not a whole chat completion
    TOO_LARGE = "too_large"  # relayed in full, but past capture.max_answer_bytes: not kept
    STORE_FAILED = "store_failed"  # answered in full, but the commit failed (logged, counted)
    REFUSED = "refused"  # the proxy answered with its own error; the upstream was not called
    REPLAYED = "replayed"  # answered from a recording; the upstream was not called


class OutcomeSet(RuntimeError):
    """An exchange's outcome was set a second time."""

    def __init__(self, first: Outcome, second: Outcome) -> None:
        super().__init__(f"outcome already {first}; refusing {second}")
        self.first = first
        self.second = second
