"""The request key: what replay matches a request on, versioned so old recordings keep playing.

A request's key is a hash of its canonical JSON (keys sorted, integral floats as integers, so
``1.0`` and ``1`` match), leaving out only transport and bookkeeping fields: ``stream``,
``stream_options``, ``store``, ``metadata`` and ``user``. Everything that changes the answer
(model, messages, tools, temperature, seed, n, ...) is in it.

Versions. A stored key says which version made it: ``v1:<32 hex>``. Keys stored before keys
carried a version are the same hash without the prefix (version 0). Capture, import and the
migrations write keys of ``CURRENT``; replay looks a request up under the key of every
version it knows (``lookup_keys``), so a change of the key is a new version added here, and
recordings made under an older one still replay, never silently miss.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

Json = dict[str, Any]

CURRENT = 1
IGNORED_FIELDS = frozenset({"stream", "stream_options", "store", "metadata", "user"})
_SAFE_INT = 2**53
_INTEGRAL_FLOAT = b".0"


def canonical(value: Any) -> Any:
    """The value with every integral float (below 2**53) as an int, else unchanged."""
    kind = type(value)
    if kind is dict:
        return {k: canonical(v) if type(v) in _REWRITTEN else v for k, v in value.items()}
    if kind is list:
        return [canonical(v) if type(v) in _REWRITTEN else v for v in value]
    if kind is float and value.is_integer() and abs(value) < _SAFE_INT:
        return int(value)
    return value


_REWRITTEN = frozenset({dict, list, float})  # the only types canonical form can change


def essential(request: Json) -> Json:
    """The part of a request that decides its answer, in canonical form."""
    result: Json = canonical(_kept(request))
    return result


def _kept(request: Json) -> Json:
    return {k: v for k, v in request.items() if k not in IGNORED_FIELDS}


def _digest_v1(request: Json) -> str:
    kept = _kept(request)
    encoded = orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)
    # orjson writes every float that canonical form would change (integral, below 2**53)
    # with a ".0" ending, so JSON without ".0" anywhere is canonical already; the walk
    # through every message is then skipped. A ".0" inside a string only costs the walk.
    if _INTEGRAL_FLOAT in encoded:
        encoded = orjson.dumps(canonical(kept), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(encoded).hexdigest()[:32]  # 128 bits: a smaller index


def request_key(request: Json) -> str:
    """The key of the current version, as capture, import and migrations store it."""
    return f"v{CURRENT}:" + _digest_v1(request)


def lookup_keys(request: Json) -> tuple[str, ...]:
    """Every key a recording of this request may be stored under, oldest version first.

    Version 0 (no prefix) and version 1 share their hash: it is computed once.
    """
    digest = _digest_v1(request)
    return (digest, "v1:" + digest)


def key_version(key: str) -> int:
    """Which version made a stored key (0: written before keys carried their version)."""
    head, sep, _ = key.partition(":")
    if not sep:
        return 0
    if head[:1] != "v" or not head[1:].isdigit():
        raise ValueError(f"not a request key: {key!r}")
    return int(head[1:])
