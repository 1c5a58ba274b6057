"""Who is calling: a caller's name and role, from the bearer token.

Two modes (``auth.mode``):

- ``passthrough`` (default): clients send their own upstream key, which goes upstream as it
  came. The caller is an irreversible fingerprint of the token; every caller is a member.
  With ``callers.secret_env`` set it is keyed (HMAC-SHA256 under that secret): callers match
  only between databases served with the same secret, and a stolen database does not tell
  whose key made a record. Without it the fingerprint is portable (SHA-256 of the token
  under a fixed label): the same key is the same caller in every database, so recordings
  exported from one and imported into another replay for the key that made them, and no
  secret is stored. A database made by an earlier version keeps the secret it generated
  then, so its callers keep their records.
- ``keys``: clients send a proxy key (``cpk_<key id>_<secret>``, made by ``completions-proxy
  keys create``). The store keeps only a SHA-256 of the secret part, compared in constant
  time. The caller is the key's name and its role (member or admin); the proxy sends the
  upstream key it holds, so the client's key never reaches the upstream. A revoked key stops
  working within ``auth.key_cache_seconds``.

Tokens are never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.errors import Unauthorized

if TYPE_CHECKING:
    from proxy.store import KeyRecord, Store

Role = Literal["member", "admin"]
KEY_PREFIX = "cpk_"
# Domain separation for portable fingerprints: no other hash of a token equals one.
_PORTABLE_LABEL = b"completions-proxy portable caller v1\0"


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    role: Role = "member"

    @property
    def scope(self) -> str | None:
        """Whose records this caller sees: its own, or (an admin) everyone's."""
        return None if self.role == "admin" else self.name


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


def new_key() -> tuple[str, str, bytes]:
    """A fresh proxy key: (the key to hand out once, its id, the hash to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}{key_id}_{secret}", key_id, hash_secret(secret)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_key(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed proxy key, else None."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


class Callers:
    """Resolves requests to callers; one per application."""

    def __init__(
        self,
        secret: bytes | None,
        *,
        store: Store | None = None,
        keys: bool = False,
        cache_seconds: float = 2.0,
    ) -> None:
        if secret is not None and len(secret) < 16:
            raise ValueError("the caller secret must be at least 16 bytes")
        if keys and store is None:
            raise ValueError("proxy keys need a store")
        self._secret = secret
        self._store = store
        self.keys = keys
        self._cache_seconds = cache_seconds
        self._fingerprints: dict[str, str] = {}
        self._keys: dict[str, tuple[float, tuple[KeyRecord, bytes] | None]] = {}

    def fingerprint(self, token: str) -> str:
        cached = self._fingerprints.get(token)
        if cached is not None:
            return cached
        if self._secret is None:
            digest = hashlib.sha256(_PORTABLE_LABEL + token.encode()).hexdigest()
        else:
            digest = hmac.new(self._secret, token.encode(), hashlib.sha256).hexdigest()
        caller = "caller_" + digest[:32]
        if len(self._fingerprints) >= 4096:
            self._fingerprints.clear()  # bounded; recomputing costs a microsecond
        self._fingerprints[token] = caller
        return caller

    async def resolve(self, request: web.Request) -> Caller | None:
        """The caller behind a request; None without a bearer token.

        In keys mode a token that is not a live proxy key raises ``Unauthorized``.
        """
        token = bearer_token(request.headers)
        if token is None:
            return None
        return await self.resolve_token(token)

    async def resolve_token(self, token: str) -> Caller:
        """The caller a token names (the console's sign-in passes the token it was given).

        A token whose bytes are not UTF-8 (aiohttp keeps them as surrogate escapes) names no
        caller and no key: a 401, rather than a failure to hash it."""
        try:
            token.encode()
        except UnicodeEncodeError:
            raise Unauthorized("The bearer token is not valid UTF-8.") from None
        if not self.keys:
            return Caller(self.fingerprint(token))
        return await self._by_key(token)

    async def by_key_id(self, key_id: str) -> Caller | None:
        """The caller of a live key, through the same cache as ``resolve``; None when the key
        is unknown or revoked. A console session re-checks its key this way on each request."""
        found = await self._lookup(key_id)
        if found is None or found[0].revoked_at is not None:
            return None
        role: Role = "admin" if found[0].role == "admin" else "member"
        return Caller(found[0].name, role)

    async def _by_key(self, token: str) -> Caller:
        parts = split_key(token)
        if parts is None:
            raise Unauthorized("Invalid proxy key.")
        key_id, secret = parts
        found = await self._lookup(key_id)
        if found is None:
            raise Unauthorized("Invalid proxy key.")
        record, stored_hash = found
        if not hmac.compare_digest(hash_secret(secret), stored_hash):
            raise Unauthorized("Invalid proxy key.")
        if record.revoked_at is not None:
            raise Unauthorized("This proxy key was revoked.")
        role: Role = "admin" if record.role == "admin" else "member"
        return Caller(record.name, role)

    async def _lookup(self, key_id: str) -> tuple[KeyRecord, bytes] | None:
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        assert self._store is not None
        found = await self._store.find_key(key_id)
        if len(self._keys) >= 4096:
            self._keys.clear()
        self._keys[key_id] = (now, found)
        return found
