"""The OpenAPI document of the API the proxy answers itself, served at ``/openapi.json``.

It describes the stored-completions operations exactly as the proxy implements them
(limits, defaults, error shape), so schemathesis can fuzz the proxy against it. ``create``
is listed for completeness; its answer is the upstream's (a chat.completion as the upstream
sends it, without the stored object's ``metadata``, or an event stream). The ``/admin/*``
endpoints (admins' proxy keys only) are described too.
"""

from __future__ import annotations

from typing import Any

from proxy import __version__
from proxy.models import (
    LIMIT_DEFAULT,
    LIMIT_MAX,
    METADATA_MAX_KEY,
    METADATA_MAX_PAIRS,
    METADATA_MAX_VALUE,
)

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Json, description: str) -> Json:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> Json:
    texts = {
        400: "Invalid request",
        401: "No bearer token",
        403: "Admins only",
        404: "No such completion for this caller",
        413: "Body over the size limit",
        502: "Upstream unreachable",
        503: "Store cannot write",
        504: "Upstream timed out",
    }
    return {str(s): _json(_ref("Error"), texts[s]) for s in statuses}


_METADATA: Json = {
    "type": "object",
    "maxProperties": METADATA_MAX_PAIRS,
    "propertyNames": {"type": "string", "maxLength": METADATA_MAX_KEY},
    "additionalProperties": {"type": "string", "maxLength": METADATA_MAX_VALUE},
}

_COMPLETION_ID: Json = {
    "name": "completion_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[^/]+$"},
}


def _page_parameters() -> list[Json]:
    return [
        {"name": "after", "in": "query", "schema": {"type": "string"}},
        {
            "name": "limit",
            "in": "query",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": LIMIT_MAX,
                "default": LIMIT_DEFAULT,
            },
        },
        {
            "name": "order",
            "in": "query",
            "schema": {"type": "string", "enum": ["asc", "desc"], "default": "asc"},
        },
    ]


def _schemas() -> Json:
    nullable_string = {"type": ["string", "null"]}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": nullable_string,
                        "code": nullable_string,
                    },
                }
            },
        },
        "Metadata": _METADATA,
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "metadata"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": ["string", "null"]},
                "choices": {"type": "array", "items": {"type": "object"}},
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                "request_id": nullable_string,
                "input_user": nullable_string,
            },
        },
        "UpstreamChatCompletion": {
            "type": "object",
            "description": "The upstream's answer, relayed byte for byte.",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": {"type": "string"},
                "choices": {"type": "array", "items": {"type": "object"}},
                "usage": {"type": "object"},
                "system_fingerprint": {"type": "string"},
                "service_tier": {"type": "string"},
            },
        },
        "ChatCompletionList": _list_of(_ref("ChatCompletion")),
        "Usage": {
            "type": "object",
            "required": ["object", "group_by", "data"],
            "properties": {
                "object": {"const": "usage"},
                "group_by": {"type": "array", "items": {"type": "string"}},
                "data": {"type": "array", "items": {"type": "object"}},
            },
        },
        "ExchangeList": _list_of({"type": "object"}),
        "AuditLog": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Message": {
            "type": "object",
            "required": ["id", "role", "content", "name", "content_parts"],
            "properties": {
                "id": {"type": "string"},
                "role": {"type": ["string", "null"]},
                "content": {},
                "name": {},
                "content_parts": {"type": ["array", "null"]},
            },
        },
        "MessageList": _list_of(_ref("Message")),
        "Deleted": {
            "type": "object",
            "required": ["object", "id", "deleted"],
            "properties": {
                "object": {"const": "chat.completion.deleted"},
                "id": {"type": "string"},
                "deleted": {"const": True},
            },
        },
        "UpdateBody": {
            "type": "object",
            "required": ["metadata"],
            "additionalProperties": False,
            "properties": {"metadata": {"oneOf": [_METADATA, {"type": "null"}]}},
        },
    }


def _list_of(item: Json) -> Json:
    return {
        "type": "object",
        "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": item},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
    }


def _moment(name: str, description: str) -> Json:
    return {
        "name": name,
        "in": "query",
        "description": description + ": unix seconds or an ISO 8601 date (UTC by default).",
        "schema": {"type": "string"},
    }


def _admin_paths() -> Json:
    """The proxy's own endpoints for admins: usage, failed exchanges, the audit log."""
    admin_errors = _errors(400, 401, 403)
    return {
        "/admin/usage": {
            "get": {
                "operationId": "getUsage",
                "description": "Tokens and cost, grouped (admins only).",
                "parameters": [
                    _moment("since", "Created at or after"),
                    _moment("until", "Created before"),
                    {
                        "name": "group_by",
                        "in": "query",
                        "description": "Comma-separated: caller, model, day.",
                        "schema": {"type": "string", "default": "caller,model"},
                    },
                ],
                "responses": {"200": _json(_ref("Usage"), "Usage rows"), **admin_errors},
            }
        },
        "/admin/exchanges": {
            "get": {
                "operationId": "listExchanges",
                "description": "Exchanges that stored no completion, with their outcome"
                " (admins only).",
                "parameters": [
                    {"name": "caller", "in": "query", "schema": {"type": "string"}},
                    *_page_parameters(),
                ],
                "responses": {"200": _json(_ref("ExchangeList"), "A page"), **admin_errors},
            }
        },
        "/admin/audit": {
            "get": {
                "operationId": "listAudit",
                "description": "The append-only audit log (admins only).",
                "parameters": [
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {"200": _json(_ref("AuditLog"), "Entries"), **admin_errors},
            }
        },
    }


def document() -> Json:
    completion = "/v1/chat/completions/{completion_id}"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "completions-proxy stored chat completions",
            "version": __version__,
            "description": "OpenAI's stored-completions API, answered from the proxy's store.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "operationId": "createChatCompletion",
                    "description": "Forwarded to the upstream; captured when store is true.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "The upstream's answer, as it sent it",
                            "content": {
                                "application/json": {"schema": _ref("UpstreamChatCompletion")},
                                "text/event-stream": {"schema": {"type": "string"}},
                            },
                        },
                        **_errors(400, 401, 413, 502, 503, 504),
                    },
                },
                "get": {
                    "operationId": "listChatCompletions",
                    "parameters": [
                        {"name": "model", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "caller",
                            "in": "query",
                            "description": "Extension, admins only: one caller's completions.",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "search",
                            "in": "query",
                            "description": "Extension: full-text search over the messages,"
                            " the answer and tool-call arguments; every word must appear."
                            " Results follow storage order. A 400 (code search_off) when the"
                            " proxy runs with store.search: false.",
                            "schema": {"type": "string", "maxLength": 500},
                        },
                        {
                            "name": "metadata",
                            "in": "query",
                            "style": "deepObject",
                            "explode": True,
                            "schema": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                        *_page_parameters(),
                    ],
                    "responses": {
                        "200": _json(_ref("ChatCompletionList"), "A page of stored completions"),
                        **_errors(400, 401, 403),
                    },
                },
            },
            completion: {
                "parameters": [_COMPLETION_ID],
                "get": {
                    "operationId": "getChatCompletion",
                    "responses": {
                        "200": _json(_ref("ChatCompletion"), "The stored completion"),
                        **_errors(400, 401, 404),
                    },
                },
                "post": {
                    "operationId": "updateChatCompletion",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("UpdateBody")}},
                    },
                    "responses": {
                        "200": _json(_ref("ChatCompletion"), "The updated completion"),
                        **_errors(400, 401, 404, 413),
                    },
                },
                "delete": {
                    "operationId": "deleteChatCompletion",
                    "responses": {
                        "200": _json(_ref("Deleted"), "Deleted"),
                        **_errors(400, 401, 404),
                    },
                },
            },
            **_admin_paths(),
            completion + "/messages": {
                "parameters": [_COMPLETION_ID],
                "get": {
                    "operationId": "getChatCompletionMessages",
                    "parameters": _page_parameters(),
                    "responses": {
                        "200": _json(_ref("MessageList"), "The request's input messages"),
                        **_errors(400, 401, 404),
                    },
                },
            },
        },
    }
