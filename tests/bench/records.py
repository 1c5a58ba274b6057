"""The bench's stored completions: one caller, many users and environments, ~3 KB each; and
latency percentiles."""

from __future__ import annotations

import hashlib
import hmac
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson

from proxy.store import CompletionRecord
from tests.bench.processes import TOKEN

# Shaped like the proxy's caller fingerprints (HMAC-SHA256 of the bearer token); the store
# takes any string, so this does not depend on how proxy.callers derives it.
CALLER = "caller_" + hmac.new(b"bench-secret", TOKEN.encode(), hashlib.sha256).hexdigest()[:32]


CREATED_BASE = 1_700_000_000


_ID_SLOT = b"chatcmpl-" + b"@" * 30


ENVS = ("prod", "staging", "dev")


USERS = 1000


_LOREM = (
    "A logging proxy sits between the client and the model provider. It forwards every "
    "byte unchanged, keeps a copy of the answer, and commits it before the last byte leaves. "
)


def env_of(user: int) -> str:
    """Each user works in one environment: a user's filter and another environment's each
    match many completions, and never the same one."""
    return ENVS[user % 3]


def _templates() -> tuple[bytes, bytes]:
    """A stored completion (~1.9 KB, id slot to fill) and its request (~1.0 KB)."""
    completion = {
        "id": _ID_SLOT.decode(),
        "object": "chat.completion",
        "created": CREATED_BASE,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _LOREM * 9, "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 220, "completion_tokens": 380, "total_tokens": 600},
        "system_fingerprint": "fp_bench",
        "service_tier": "default",
        "request_id": "req_bench",
        "seed": None,
        "temperature": 0.2,
        "top_p": None,
        "presence_penalty": None,
        "frequency_penalty": None,
        "tools": None,
        "tool_choice": None,
        "response_format": None,
        "input_user": None,
    }
    request = {
        "model": "gpt-4o-mini",
        "store": True,
        "temperature": 0.2,
        "metadata": {"user": "user-1", "env": "prod"},
        "messages": [
            {"role": "system", "content": _LOREM * 2},
            {"role": "user", "content": _LOREM * 3},
        ],
    }
    return orjson.dumps(completion), orjson.dumps(request)


COMPLETION_TEMPLATE, REQUEST_TEMPLATE = _templates()


def completion_id(i: int, salt: bytes = b"db") -> str:
    digest = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=15, key=salt).hexdigest()
    return "chatcmpl-" + digest


def make_record(i: int, salt: bytes = b"db") -> CompletionRecord:
    cid = completion_id(i, salt)
    return CompletionRecord(
        id=cid,
        caller=CALLER,
        created=CREATED_BASE + i // 20,
        model="gpt-4o-mini",
        metadata={"user": f"user-{i % USERS}", "env": env_of(i % USERS), "session": f"s-{i // 50}"},
        completion=COMPLETION_TEMPLATE.replace(_ID_SLOT, cid.encode()),
        request=REQUEST_TEMPLATE,
        request_id="req_" + cid[9:],
        stream=bool(i % 2),
        outcome="complete",
        duration_ms=412.5,
    )


def record_bytes() -> int:
    record = make_record(0)
    return len(record.completion) + len(record.request) + len(orjson.dumps(record.metadata))


def batches(start: int, stop: int, size: int, salt: bytes = b"db") -> Iterator[list[Any]]:
    for first in range(start, stop, size):
        yield [make_record(i, salt) for i in range(first, min(first + size, stop))]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": statistics.median(ordered),
        "p90": cut[89],
        "p99": cut[98],
        "max": ordered[-1],
        "calls": len(ordered),
    }


async def timed(
    calls: int, call: Callable[[int], Awaitable[None]], budget: float | None = None
) -> dict[str, float]:
    """Latency percentiles over ``calls`` calls, after 100 to warm up; with ``budget``
    (seconds), fewer once it is spent (at least 5, after 2 to warm up), for a case too slow
    to call 2,000 times."""
    deadline = None if budget is None else time.perf_counter() + budget
    warm = min(100, calls) if budget is None else min(2, calls)
    for n in range(warm):  # warm the caches and the thread hop
        await call(n)
    samples = []
    for n in range(calls):
        started = time.perf_counter()
        await call(n)
        samples.append((time.perf_counter() - started) * 1000)
        if deadline is not None and started > deadline and len(samples) >= 5:
            break
    return percentiles(samples)
