"""What may go to the upstream and come back: paths, headers, and the team key in answers.

The connections themselves, with their timeouts, are ``proxy.upstream_client``.

- The upstream comes from the config only. The client's path is joined under it as a path,
  never parsed as a URL, and redirects are not followed, so no request can steer the proxy
  elsewhere.
- Compression: the proxy asks the upstream for ``identity``; gzip or deflate sent anyway is
  decoded (any other coding is a 502, see ``proxy.upstream_client``), and
  ``Content-Encoding``/``Content-Length`` are dropped on the way back, so the client always
  gets bytes that match their headers and the capture sees plain JSON or SSE. A client's
  gzip, deflate, br or zstd request body is decoded as it is read, so it goes upstream plain
  and without that ``Content-Encoding``; any other coding goes as sent.
- Hop-by-hop headers (RFC 9110 §7.6.1, plus those a ``Connection`` header names) never cross.
- A forwarded path is first put in one canonical form (``canonical_path``): percent-encoded
  unreserved characters decoded, repeated slashes collapsed, a trailing slash dropped; a dot
  segment, raw or encoded, or an encoded slash or backslash, is refused. What is checked
  (the proxy's own routes, the keys-mode allow-list) is exactly what goes upstream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# Recomputed or replaced by the proxy on the way up.
_DROP_UP = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "expect"}
# Request codings aiohttp's server decodes as it reads the body (its parser's own set): such a
# body goes upstream plain, so its Content-Encoding header must not.
_DECODED_UP = frozenset({"gzip", "deflate", "br", "zstd"})
# The body is relayed decoded and re-framed by aiohttp on the way down.
_DROP_DOWN = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    if "Connection" in headers:  # names listed in Connection are hop-by-hop too
        listed = {
            token.strip().lower()
            for value in headers.getall("Connection")
            for token in value.split(",")
        }
        drop = drop | listed
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            kept.add(name, value)
    return kept


# Client headers that would re-target the proxy's own upstream key in keys mode.
RETARGETING = frozenset({"openai-organization", "openai-project", "api-key", "x-api-key", "cookie"})


def headers_up(
    client_headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """The client's headers as sent upstream: Authorization and the SDK's headers included,
    less hop-by-hop headers and those in ``drop`` (lower-case names)."""
    headers = _filtered(client_headers, _DROP_UP | drop)
    headers["Accept-Encoding"] = "identity"
    coding = headers.get("Content-Encoding")
    if coding is not None and coding.lower() in _DECODED_UP:
        del headers["Content-Encoding"]
    return headers


def headers_down(upstream_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as relayed to the client."""
    return _filtered(upstream_headers, _DROP_DOWN)


class BadPath(ValueError):
    """A path the proxy refuses to route or forward."""


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def canonical_path(raw_path: str) -> str:
    """The one form of a client's (still percent-encoded) path the proxy routes and forwards.

    Encoded unreserved characters are decoded (``%63hat`` is ``chat``), other escapes are
    upper-cased, empty segments (``//``) and a trailing slash are dropped. A ``.`` or ``..``
    segment, an encoded ``/`` or ``\\``, a raw backslash or a malformed escape raise
    ``BadPath``: each means something different to different servers, so none is guessed at.
    """
    if "\\" in raw_path or re.search(r"%(?![0-9A-Fa-f]{2})", raw_path):
        raise BadPath("the path holds a backslash or a malformed percent escape")
    decoded = _ESCAPE.sub(_decode_unreserved, raw_path)
    segments = [s for s in decoded.split("/") if s]
    for segment in segments:
        if segment in {".", ".."}:
            raise BadPath("the path holds a '.' or '..' segment")
        if "%2F" in segment or "%5C" in segment:
            raise BadPath("the path holds an encoded slash or backslash")
    return "/" + "/".join(segments)


def names_stored_api(path: str) -> bool:
    """Whether a canonical path names the stored-completions API (any case), which only the
    proxy's own handlers answer."""
    lowered = path.lower()
    return lowered == "/v1/chat/completions" or lowered.startswith("/v1/chat/completions/")


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # upper case, or "*"
    segments: tuple[str, ...]  # "*" matches one segment; a final "**" the rest

    @classmethod
    def parse(cls, text: str) -> Route:
        method, _, path = text.strip().partition(" ")
        return cls(method.upper(), tuple(s for s in path.strip().split("/") if s))

    def matches(self, method: str, segments: Sequence[str]) -> bool:
        if self.method not in {"*", method}:
            return False
        pattern = self.segments
        if pattern and pattern[-1] == "**":
            pattern = pattern[:-1]
            if len(segments) < len(pattern):
                return False
            segments = segments[: len(pattern)]
        elif len(segments) != len(pattern):
            return False
        return all(p in {"*", s} for p, s in zip(pattern, segments, strict=True))


class ForwardRules:
    """The keys-mode allow-list: which ``METHOD /path`` below ``/v1`` may use the team key."""

    def __init__(self, members: Iterable[str], admins: Iterable[str]) -> None:
        self._members = tuple(map(Route.parse, members))
        self._admins = self._members + tuple(map(Route.parse, admins))

    def allows(self, method: str, tail: str, *, admin: bool) -> bool:
        """``tail`` is a canonical path below ``/v1`` (``/models/gpt-4o``)."""
        segments = [s for s in tail.split("/") if s]
        routes = self._admins if admin else self._members
        return any(route.matches(method, segments) for route in routes)


class KeyMask:
    """Hides the proxy's own upstream key, and any recognisable part of it, in text the
    upstream sends back (error bodies often echo a key, whole or as ``sk-...****abcd``)."""

    WINDOW = 8  # any 8 consecutive characters of the key are recognisable
    REPLACEMENT = b"[redacted]"

    def __init__(self, key: str) -> None:
        raw = key.encode()
        width = min(self.WINDOW, len(raw))
        parts = {raw[i : i + width] for i in range(len(raw) - width + 1)}
        alternatives = [re.escape(raw), *sorted(map(re.escape, parts), key=len, reverse=True)]
        # A masked key: word characters around a run of asterisks, as providers print them.
        alternatives.append(rb"[A-Za-z0-9_\-]*\*{4,}[A-Za-z0-9_\-]*")
        self._pattern = re.compile(b"|".join(alternatives))

    def apply(self, body: bytes) -> bytes:
        return self._pattern.sub(self.REPLACEMENT, body)
