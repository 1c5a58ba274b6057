"""Who is calling: the bearer token reduced to a keyed, irreversible fingerprint.

The token itself is never stored or logged. The fingerprint is HMAC-SHA256 under a secret
that comes from the environment variable ``callers.secret_env`` names, or, when that is
unset, from a random secret the store generates once and keeps (so fingerprints survive a
restart). Without the secret a fingerprint cannot be tested against a guessed token.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web
from multidict import CIMultiDictProxy

ANONYMOUS = "anonymous"


def bearer_token(headers: CIMultiDictProxy[str]) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    value = headers.get("Authorization")
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class CallerIdentity:
    """Turns bearer tokens into caller fingerprints; one per application."""

    __slots__ = ("_cache", "_secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the caller secret must be at least 16 bytes")
        self._secret = secret
        self._cache: dict[str, str] = {}

    def fingerprint(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        digest = hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()
        caller = "caller_" + digest[:32]
        if len(self._cache) >= 4096:
            self._cache.clear()  # bounded; recomputing costs a microsecond
        self._cache[token] = caller
        return caller

    def of(self, request: web.Request) -> str | None:
        """The caller behind a request, or None when it carries no bearer token."""
        token = bearer_token(request.headers)
        return None if token is None else self.fingerprint(token)
