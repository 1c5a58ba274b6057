"""Talking to the upstream: one client session, URL joining, header filtering, timeouts.

- The upstream comes from the config only. The client's path is joined under it as a path,
  never parsed as a URL, and redirects are not followed, so no request can steer the proxy
  elsewhere.
- Timeouts are a connect timeout and a read timeout between bytes (``sock_read``), never a
  total: a long stream that keeps flowing is never cut; a stalled one is.
- Compression: the proxy asks the upstream for ``identity`` and decodes anything it gets
  anyway, then drops ``Content-Encoding``/``Content-Length`` on the way back, so the client
  always gets bytes that match their headers and the capture sees plain JSON or SSE.
- Hop-by-hop headers (RFC 9110 §7.6.1, plus those a ``Connection`` header names) never cross.
"""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamConfig

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


def headers_up(client_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers as sent upstream: Authorization and the SDK's headers included."""
    headers = _filtered(client_headers, _DROP_UP)
    headers["Accept-Encoding"] = "identity"
    return headers


def headers_down(upstream_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as relayed to the client."""
    return _filtered(upstream_headers, _DROP_DOWN)


def upstream_url(base: str, tail: str, query_string: str) -> URL:
    """``base`` + ``/`` + the client's path below ``/v1``, keeping its query string verbatim.

    ``tail`` is the already-encoded path (``request.raw_path``) so it goes upstream as the
    client wrote it; the host, port and scheme always come from ``base``.
    """
    path = base + "/" + tail.lstrip("/")
    if query_string:
        path += "?" + query_string
    return URL(path, encoded=True)


def make_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        limit_per_host=config.max_connections,
        enable_cleanup_closed=False,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=None,
        sock_connect=config.connect_timeout,
        sock_read=config.read_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        skip_auto_headers=("User-Agent",),
    )
