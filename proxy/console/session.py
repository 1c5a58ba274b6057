"""Console sessions and CSRF tokens: signed values, pure functions of a key and the clock.

A session cookie holds who signed in, never the token they signed in with::

    base64url(JSON {"sid", "caller", "role", "key_id", "exp"}) "." base64url(HMAC-SHA256)

``key_id`` is the proxy key's public id (keys mode), so each request re-checks the key
through the caller cache and a revoked key's session ends within that cache's window; in
passthrough mode it is null and the caller is the token's fingerprint. The CSRF token of a
form is an HMAC of the session id, so it is valid only with the session it was made for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import orjson

COOKIE = "cp_session"
PRE_COOKIE = "cp_signin"  # binds the sign-in form to the browser that loaded it


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    caller: str
    role: str
    key_id: str | None
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: str, value: str) -> str:
    return _b64(hmac.new(key, f"{purpose}:{value}".encode(), hashlib.sha256).digest())


def new_session(caller: str, role: str, key_id: str | None, now: float, hours: float) -> Session:
    return Session(secrets.token_urlsafe(16), caller, role, key_id, int(now + hours * 3600))


def sign(key: bytes, session: Session) -> str:
    payload = _b64(
        orjson.dumps(
            {
                "sid": session.sid,
                "caller": session.caller,
                "role": session.role,
                "key_id": session.key_id,
                "exp": session.expires,
            }
        )
    )
    return f"{payload}.{_mac(key, 'session', payload)}"


def unsign(key: bytes, value: str, now: float) -> Session | None:
    """The session a cookie value holds; None when forged, malformed or expired."""
    payload, dot, mac = value.partition(".")
    if not dot or not hmac.compare_digest(mac, _mac(key, "session", payload)):
        return None
    try:
        data = orjson.loads(_unb64(payload))
        session = Session(
            str(data["sid"]),
            str(data["caller"]),
            str(data["role"]),
            None if data["key_id"] is None else str(data["key_id"]),
            int(data["exp"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires > now else None


def csrf_token(key: bytes, sid: str) -> str:
    """The token forms carry for this session (or this sign-in nonce)."""
    return _mac(key, "csrf", sid)


def csrf_ok(key: bytes, sid: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(csrf_token(key, sid), given)
