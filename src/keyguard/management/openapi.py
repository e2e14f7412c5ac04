"""The OpenAPI 3.1 document of the management API, built from its route table."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from keyguard.audit import ACTIONS, DEFAULT_AUDIT_LIMIT, MAX_AUDIT_LIMIT
from keyguard.management.bodies import MAX_GRACE_SECONDS
from keyguard.management.problems import PROBLEM_MEDIA_TYPE
from keyguard.management.routes import DEFAULT_USAGE_HOURS, OPERATIONS
from keyguard.manager import MAX_KEYS_PER_KIND_LIMIT
from keyguard.models import (
    KEY_NAME_PATTERN,
    MAX_META_BYTES,
    MAX_META_DEPTH,
    MAX_NAME_LENGTH,
    MAX_RATE_LIMITS,
    RATE_LIMIT_UNITS,
    KeyKind,
)
from keyguard.stores._paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from keyguard.usage import MAX_USAGE_HOURS

__all__ = ["openapi_document"]

_ERROR_CODES = {
    401: ["unauthorized"],
    403: ["forbidden"],
    404: ["api_not_found", "key_not_found"],
    409: [
        "api_not_exposed",
        "key_limit_reached",
        "duplicate_name",
        "key_immutable",
        "api_has_keys",
    ],
    413: ["request_too_large"],
    415: ["unsupported_media_type"],
    422: ["invalid_request"],
    503: ["store_unavailable"],
    500: ["internal_error"],
}

_API_NAME = {
    "type": "string",
    "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
    "description": "An API name.",
}

_RATE_LIMITS_REF = {"$ref": "#/components/schemas/RateLimits"}
_META_DESCRIPTION = (
    f"A JSON object the operator attaches (a customer id, a plan name): at most "
    f"{MAX_META_BYTES} bytes as compact UTF-8 JSON and {MAX_META_DEPTH} levels of nesting, "
    "replaced as a whole when changed, "
    "given to the app as request.state.keyguard.meta."
)


def _nullable_time(description: str) -> dict[str, Any]:
    return {"type": ["string", "null"], "format": "date-time", "description": description}


# The fields of a key as every answer shows them (R9, SPEC §8): never a secret, never a hash.
_KEY_PROPERTIES: dict[str, Any] = {
    "client_id": {"type": "string"},
    "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH},
    "kind": {"type": "string", "enum": [kind.value for kind in KeyKind]},
    "has_secret": {"type": "boolean"},
    "created_at": {"type": "string", "format": "date-time"},
    "enabled": {"type": "boolean", "description": "A disabled key admits no request."},
    "expires_at": _nullable_time(
        "From this instant on the key admits no request; null: never expires."
    ),
    "meta": {"type": "object", "description": _META_DESCRIPTION},
    "last_used_at": _nullable_time(
        "When the key last admitted a request (approximate: written in batches); null: never."
    ),
    "previous_secret_expires_at": _nullable_time(
        "Until when the secret replaced by the last roll still verifies; null: it does not."
    ),
    "rate_limits": {
        "oneOf": [_RATE_LIMITS_REF, {"type": "null"}],
        "description": "The key's own rate limits, replacing the API's; null: the API's.",
    },
}

# The key name as a request gives it (the answers show it trimmed).
_NAME_INPUT = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME_LENGTH,
    "pattern": KEY_NAME_PATTERN,
    "description": (
        "1-100 characters after trimming, no control characters; stored "
        "trimmed; unique within the API, ignoring case."
    ),
}
_EXPIRES_AT_INPUT = _nullable_time(
    "An RFC 3339 time with a zone (stored in UTC, to the microsecond); a time in the past "
    "expires the key at once; null: never expires."
)
_META_INPUT = {"type": "object", "description": _META_DESCRIPTION}
_RATE_LIMITS_INPUT = {
    "oneOf": [_RATE_LIMITS_REF, {"type": "null"}],
    "description": "The key's own rate limits ([] for unlimited); null: inherit the API's.",
}

_SCHEMAS: dict[str, Any] = {
    "Api": {
        "type": "object",
        "required": ["name", "exposed", "max_keys_per_kind", "rate_limits", "keys"],
        "additionalProperties": False,
        "properties": {
            "name": _API_NAME,
            "exposed": {"type": "boolean", "description": "Whether keys can be used and issued."},
            "max_keys_per_kind": {"type": "integer", "minimum": 0},
            "rate_limits": {
                **_RATE_LIMITS_REF,
                "description": "Apply to each key of the API without its own; [] unlimited.",
            },
            "keys": {
                "type": "object",
                "description": "How many keys of each kind the API holds.",
                "required": ["internal", "external"],
                "additionalProperties": False,
                "properties": {
                    "internal": {"type": "integer", "minimum": 0},
                    "external": {"type": "integer", "minimum": 0},
                },
            },
        },
    },
    "ApiList": {
        "type": "object",
        "required": ["apis"],
        "additionalProperties": False,
        "properties": {"apis": {"type": "array", "items": {"$ref": "#/components/schemas/Api"}}},
    },
    "ApiUpdate": {
        "type": "object",
        "additionalProperties": False,
        "description": "The fields to change; an empty object only creates the API if needed.",
        "properties": {
            "exposed": {"type": "boolean"},
            "max_keys_per_kind": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_KEYS_PER_KIND_LIMIT,
                "description": "Lowering it below the current count deletes no key.",
            },
            "rate_limits": {
                **_RATE_LIMITS_REF,
                "description": "Replaces the API's rate limits; [] for none (unlimited).",
            },
        },
        "example": {"exposed": True},
    },
    "RateLimit": {
        "type": "object",
        "description": "At most `limit` requests per `per`, counted per key.",
        "required": ["limit", "per"],
        "additionalProperties": False,
        "properties": {
            "limit": {"type": "integer", "minimum": 1, "maximum": 10**12},
            "per": {"type": "string", "enum": list(RATE_LIMIT_UNITS)},
        },
        "example": {"limit": 100, "per": "minute"},
    },
    "RateLimits": {
        "type": "array",
        "maxItems": MAX_RATE_LIMITS,
        "items": {"$ref": "#/components/schemas/RateLimit"},
        "description": f"Up to {MAX_RATE_LIMITS} rate limits; [] for none (unlimited).",
    },
    "Key": {
        "type": "object",
        "required": list(_KEY_PROPERTIES),
        "additionalProperties": False,
        "properties": _KEY_PROPERTIES,
    },
    "KeyList": {
        "type": "object",
        "required": ["keys", "next"],
        "additionalProperties": False,
        "properties": {
            "keys": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Key"},
                "maxItems": MAX_PAGE_SIZE,
                "description": "Oldest first (by created_at, then creation order).",
            },
            "next": {
                "type": ["string", "null"],
                "description": "Pass as ?after= (with the same name) for the next page; null: "
                "no more. With ?name= a page may hold fewer keys than limit, even none, "
                "while next is set: the store bounds the work of one call.",
            },
        },
    },
    "KeyCreate": {
        "type": "object",
        "required": ["name", "kind"],
        "additionalProperties": False,
        "properties": {
            "name": _NAME_INPUT,
            "kind": {"type": "string", "enum": [kind.value for kind in KeyKind]},
            "expires_at": _EXPIRES_AT_INPUT,
            "enabled": {"type": "boolean", "default": True},
            "meta": _META_INPUT,
            "rate_limits": _RATE_LIMITS_INPUT,
        },
        "example": {"name": "Acme", "kind": "internal"},
    },
    "KeyUpdate": {
        "type": "object",
        "additionalProperties": False,
        "description": (
            "The fields to change, on a key of either kind; a field left out keeps its value "
            "and {} changes nothing."
        ),
        "properties": {
            "name": _NAME_INPUT,
            "enabled": {"type": "boolean"},
            "expires_at": _EXPIRES_AT_INPUT,
            "meta": _META_INPUT,
            "rate_limits": _RATE_LIMITS_INPUT,
        },
        "example": {"enabled": False},
    },
    "IssuedKey": {
        "type": "object",
        "required": [*_KEY_PROPERTIES, "secret"],
        "additionalProperties": False,
        "properties": {
            **_KEY_PROPERTIES,
            "secret": {
                "type": ["string", "null"],
                "description": "An internal key's secret, shown this once; null for an "
                "external key, which has no secret until one is set.",
            },
        },
    },
    "Secret": {
        "type": "object",
        "required": ["client_id", "secret", "previous_secret_expires_at"],
        "additionalProperties": False,
        "properties": {
            "client_id": {"type": "string"},
            "secret": {"type": "string", "description": "Shown this once."},
            "previous_secret_expires_at": _nullable_time(
                "Until when the replaced secret still verifies; null: it stopped at once "
                "(no grace, or the key had no secret)."
            ),
        },
    },
    "SecretRequest": {
        "type": "object",
        "additionalProperties": False,
        "description": (
            "The secret is generated by keyguard, never chosen. No body, or {}, replaces "
            "the previous secret at once."
        ),
        "properties": {
            "grace_seconds": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_GRACE_SECONDS,
                "default": 0,
                "description": (
                    "How long the replaced secret keeps verifying (at most 30 days); only "
                    "one previous secret is kept."
                ),
            },
        },
        "example": {"grace_seconds": 86400},
    },
    "AuditEvent": {
        "type": "object",
        "description": (
            "One change (SPEC §10). `changes` maps each field the change set to its new "
            "value; it never holds a secret or a hash."
        ),
        "required": ["id", "at", "actor", "action", "api", "client_id", "name", "changes"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{26}$"},
            "at": {"type": "string", "format": "date-time"},
            "actor": {
                "type": "string",
                "description": "token:<name>, cli:<login name>, or what the code said.",
            },
            "action": {"type": "string", "enum": list(ACTIONS)},
            "api": {"type": "string"},
            "client_id": {"type": ["string", "null"]},
            "name": {
                "type": ["string", "null"],
                "description": "The key's name when the change was made.",
            },
            "changes": {"type": "object"},
        },
    },
    "AuditPage": {
        "type": "object",
        "required": ["events", "next"],
        "additionalProperties": False,
        "properties": {
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
            "next": {
                "type": ["string", "null"],
                "description": "Pass as ?before= for the next page; null: no more.",
            },
        },
    },
    "WhoAmI": {
        "type": "object",
        "required": ["token", "actor", "read_only"],
        "additionalProperties": False,
        "properties": {
            "token": {"type": ["string", "null"]},
            "actor": {"type": "string"},
            "read_only": {"type": "boolean"},
        },
    },
    "UsageHour": {
        "type": "object",
        "required": ["start", "requests", "rate_limited"],
        "additionalProperties": False,
        "properties": {
            "start": {"type": "string", "format": "date-time", "description": "The hour's start."},
            "requests": {"type": "integer", "minimum": 0, "description": "Admitted requests."},
            "rate_limited": {
                "type": "integer",
                "minimum": 0,
                "description": "Requests answered 429.",
            },
        },
    },
    "UsageHours": {
        "type": "array",
        "items": {"$ref": "#/components/schemas/UsageHour"},
        "description": (
            "One entry per hour, oldest first, hours without traffic included as zeros; the "
            "last is the current hour. Counts are written in batches (every 10 s by "
            "default), so the last seconds may be missing."
        ),
    },
    "KeyUsage": {
        "type": "object",
        "required": ["client_id", "hours"],
        "additionalProperties": False,
        "properties": {
            "client_id": {"type": "string"},
            "hours": {"$ref": "#/components/schemas/UsageHours"},
        },
    },
    "ApiUsage": {
        "type": "object",
        "required": ["api", "hours", "keys"],
        "additionalProperties": False,
        "properties": {
            "api": _API_NAME,
            "hours": {"$ref": "#/components/schemas/UsageHours"},
            "keys": {
                "type": "array",
                "description": "Every key of the API (oldest first) with its totals over the "
                "range, zeros included; with `limit`, `after` or `name`, one page of them.",
                "items": {
                    "type": "object",
                    "required": ["client_id", "name", "requests", "rate_limited"],
                    "additionalProperties": False,
                    "properties": {
                        "client_id": {"type": "string"},
                        "name": {"type": "string"},
                        "requests": {"type": "integer", "minimum": 0},
                        "rate_limited": {"type": "integer", "minimum": 0},
                    },
                },
            },
            "next": {
                "type": ["string", "null"],
                "description": "Only when a page was asked for: the cursor of the next page "
                "of keys (`after=`), or null after the last.",
            },
        },
    },
    "OpenApiDocument": {"type": "object", "required": ["openapi", "paths"]},
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string", "format": "uri-reference"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {
                "type": "string",
                "enum": sorted(
                    {code for codes in _ERROR_CODES.values() for code in codes}
                    | {"not_found", "method_not_allowed"}
                ),
            },
        },
    },
}


_AUDIT_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "api",
        "in": "query",
        "required": False,
        "schema": _API_NAME,
        "description": "Only this API's events.",
    },
    {
        "name": "client_id",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "Only this key's events.",
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_AUDIT_LIMIT,
            "default": DEFAULT_AUDIT_LIMIT,
        },
    },
    {
        "name": "before",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{26}$"},
        "description": "The `next` of the previous page.",
    },
]


_KEY_LIST_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_PAGE_SIZE,
            "default": DEFAULT_PAGE_SIZE,
        },
        "description": "Keys per page.",
    },
    {
        "name": "after",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{4,64}$"},
        "description": "The `next` of the previous page (an opaque cursor); a cursor the "
        "listing did not give is 422 `invalid_request`.",
    },
    {
        "name": "name",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "maxLength": 100},
        "description": "Only keys whose name contains this text, ignoring case (casefold).",
    },
]


# An API's usage, a page of its keys at a time (for an API too large to list whole).
_USAGE_PAGE_PARAMETERS: list[dict[str, Any]] = [
    {
        **parameter,
        "schema": {k: v for k, v in parameter["schema"].items() if k != "default"},
        "description": parameter["description"]
        + " Any of `limit`, `after`, `name` asks for one page of the API's keys (the "
        "answer then has `next`); without them every key is listed.",
    }
    for parameter in _KEY_LIST_PARAMETERS
]


def _problem_response(status: int) -> dict[str, Any]:
    codes = ", ".join(f"`{code}`" for code in _ERROR_CODES[status])
    response: dict[str, Any] = {
        "description": f"{HTTPStatus(status).phrase}: {codes}",
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if status == 503:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return response


def _path_parameters(path: str) -> list[dict[str, Any]]:
    parameters = []
    if "{api}" in path:
        parameters.append({"name": "api", "in": "path", "required": True, "schema": _API_NAME})
    if "{client_id}" in path:
        parameters.append(
            {"name": "client_id", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    return parameters


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the management API, built from its route table."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        success: dict[str, Any] = {"description": HTTPStatus(op.status).phrase}
        if op.response is not None:
            success["content"] = {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{op.response}"}}
            }
        if op.name == "create_key":
            success["headers"] = {"Location": {"schema": {"type": "string"}}}
        operation: dict[str, Any] = {
            "operationId": op.name,
            "summary": op.summary,
            "responses": {
                str(op.status): success,
                **{
                    str(status): _problem_response(status)
                    for status in sorted(
                        (401, *op.errors, *(() if op.method == "GET" else (403,)), 500)
                    )
                },
            },
        }
        parameters = _path_parameters(op.path)
        if op.name == "delete_api":
            parameters.append(
                {
                    "name": "force",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "boolean", "default": False},
                    "description": "Delete the API's keys with it (else 409 api_has_keys).",
                }
            )
        if op.name == "audit":
            parameters += _AUDIT_PARAMETERS
        if op.name == "list_keys":
            parameters += _KEY_LIST_PARAMETERS
        if op.name == "api_usage":
            parameters += _USAGE_PAGE_PARAMETERS
        if op.name in ("api_usage", "key_usage"):
            parameters.append(
                {
                    "name": "hours",
                    "in": "query",
                    "required": False,
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_USAGE_HOURS,
                        "default": DEFAULT_USAGE_HOURS,
                    },
                    "description": "How many hours back, the current one included (at most "
                    "840: the 35 days kept).",
                }
            )
        if parameters:
            operation["parameters"] = parameters
        if op.request is not None:
            operation["requestBody"] = {
                "required": op.request_required,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{op.request}"}}
                },
            }
        paths.setdefault(op.path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keyguard management API",
            "version": "1",
            "description": (
                "Expose APIs and issue, list, change, secure and delete their keys. Every "
                "route needs 'Authorization: Bearer <token>'; a read-only token's change is "
                "403 `forbidden`. Errors are RFC 9457 problem "
                "details with a machine-readable `code`; an unknown route is 404 "
                "`not_found` and a wrong method 405 `method_not_allowed` (after "
                "authentication). Every answer carries "
                "'Cache-Control: no-store' and 'X-Content-Type-Options: nosniff'."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
