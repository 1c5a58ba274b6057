"""How an exchange ended: exactly one outcome each, in captures, logs and audit records."""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    COMPLETE = "complete"  # the whole answer reached the client (and the store, when asked)
    UPSTREAM_ERROR = "upstream_error"  # the upstream answered non-2xx; relayed as it came
    UPSTREAM_FAILED = "upstream_failed"  # refused, timed out, or dropped before the end
    CLIENT_GONE = "client_gone"  # the client went away before the end
    UNSTORABLE = "unstorable"  # a 2xx answer that is not a whole chat completion
    STORE_FAILED = "store_failed"  # answered in full, but the commit failed (logged, counted)
    REFUSED = "refused"  # the proxy answered with its own error; the upstream was not called
    REPLAYED = "replayed"  # answered from a recording; the upstream was not called
