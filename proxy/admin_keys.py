"""Proxy keys over HTTP, for admins: the endpoints the console uses and the CLI could.

- ``GET /admin/keys``: every key (never a secret), ``{"object": "list", "data": [...]}``.
- ``POST /admin/keys`` with ``{"name": str, "role": "member" | "admin"}``: a new key; the
  answer holds its ``key`` once, and only there.
- ``POST /admin/keys/{name}/revoke``: the key stops working within ``auth.key_cache_seconds``.

Each change lands in the audit trail (the store writes it in the same transaction). Bad input
is a 400 in OpenAI's error shape and changes nothing; a taken name is a 400 too (a 409 would
be retried by the SDKs, and retrying cannot help).
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

from proxy.callers import Caller, new_key
from proxy.errors import Forbidden, InvalidRequest, NotFound
from proxy.handlers import required_caller
from proxy.keys import STORE
from proxy.store import KeyExists, KeyRecord, Store

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
NAME_RULE = (
    "a key name is 1-64 characters: letters, digits and . _ @ -, starting with a letter or digit"
)
ROLES = ("member", "admin")


async def admin_caller(request: web.Request) -> Caller:
    caller = await required_caller(request)
    if caller.role != "admin":
        raise Forbidden("This endpoint is for admins (a proxy key with the admin role).")
    return caller


def key_json(record: KeyRecord) -> dict[str, Any]:
    return {
        "object": "proxy_key",
        "name": record.name,
        "key_id": record.key_id,
        "role": record.role,
        "created_at": record.created_at,
        "revoked_at": record.revoked_at,
    }


def check_name(name: Any) -> str:
    """A new key's name, by the one rule the API, the console and ``keys create`` apply."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(f"{NAME_RULE}.", param="name")
    return name


def check_new_key(name: Any, role: Any) -> tuple[str, str]:
    name = check_name(name)
    if role not in ROLES:
        raise InvalidRequest("role must be 'member' or 'admin'.", param="role")
    return name, role


async def create(store: Store, name: str, role: str, actor: str) -> tuple[str, KeyRecord]:
    """A new key: (the key, shown once; its record). Raises InvalidRequest on a taken name."""
    key, key_id, key_hash = new_key()
    try:
        await store.create_key(name, role, key_id, key_hash, actor=actor)
    except KeyExists:
        raise InvalidRequest(f"A key named {name!r} exists already.", param="name") from None
    record = next(k for k in await store.list_keys() if k.key_id == key_id)
    return key, record


async def revoke(store: Store, name: str, actor: str) -> None:
    if not await store.revoke_key(name, actor=actor):
        raise NotFound(f"No live key named {name!r}.", param="name")


async def list_keys(request: web.Request) -> web.Response:
    await admin_caller(request)
    data = [key_json(k) for k in await request.app[STORE].list_keys()]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )


async def create_key(request: web.Request) -> web.Response:
    admin = await admin_caller(request)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"The request body is not valid JSON: {error.msg}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object with name and role.")
    unknown = sorted(set(body) - {"name", "role"})
    if unknown:
        raise InvalidRequest(f"Unknown parameter: {unknown[0]}.", param=unknown[0])
    name, role = check_new_key(body.get("name"), body.get("role", "member"))
    key, record = await create(request.app[STORE], name, role, admin.name)
    return web.Response(
        body=orjson.dumps({**key_json(record), "key": key}), content_type="application/json"
    )


async def revoke_key(request: web.Request) -> web.Response:
    admin = await admin_caller(request)
    name = request.match_info["name"]
    store = request.app[STORE]
    await revoke(store, name, admin.name)
    record = next(k for k in await store.list_keys() if k.name == name)
    return web.Response(body=orjson.dumps(key_json(record)), content_type="application/json")
