"""``management_app``: the management HTTP API (SPEC §5): HTTP in, ``KeyManager`` calls, HTTP out.

``app.mount("/keyguard", management_app(store, token=os.environ["KEYGUARD_TOKEN"]))``

Every route needs ``Authorization: Bearer <token>``, checked before routing so
that nothing, not even which routes exist, is revealed without it. Every error
is an RFC 9457 problem details object (``application/problem+json``) whose
``code`` member is the ``KeyGuardError.code`` (or one of this module's own:
``unauthorized``, ``not_found``, ``method_not_allowed``, ``request_too_large``,
``unsupported_media_type``, ``internal_error``). The rules themselves live in
``KeyManager``; this module only parses, calls and formats.

The JSON shapes (``api_json``, ``key_json``, ``problem_json``) are shared with
the command line, so ``keyguard --json`` prints exactly what this API answers.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from keyguard.console import CONSOLE_PATHS, console_routes
from keyguard.errors import ConfigurationError, InvalidRequest, KeyGuardError, RuleViolation
from keyguard.manager import DEFAULT_MAX_KEYS_PER_KIND, MAX_KEYS_PER_KIND_LIMIT, KeyManager
from keyguard.middleware import RETRY_AFTER_SECONDS
from keyguard.models import (
    KEY_NAME_PATTERN,
    MAX_GRACE,
    MAX_META_BYTES,
    MAX_NAME_LENGTH,
    MAX_RATE_LIMITS,
    RATE_LIMIT_UNITS,
    Api,
    IssuedKey,
    KeyInfo,
    KeyKind,
    RateLimit,
    rfc3339,
    thaw,
)
from keyguard.secrets import SecretHasher
from keyguard.stores.base import KeyStore

__all__ = [
    "MAX_BODY_BYTES",
    "MIN_TOKEN_LENGTH",
    "api_json",
    "key_json",
    "management_app",
    "openapi_document",
    "problem_json",
    "rate_limits_json",
    "status_for",
]

logger = logging.getLogger("keyguard")

MIN_TOKEN_LENGTH = 32
"""A management token shorter than this is a ``ConfigurationError`` when the app is built."""

MAX_BODY_BYTES = 64 * 1024
"""Request bodies larger than this are refused with 413 (real bodies are under 200 bytes)."""

PROBLEM_MEDIA_TYPE = "application/problem+json"
_REALM = 'Bearer realm="keyguard"'

# Management answers describe secrets and who holds which key: nothing may cache them.
_NO_STORE = {"Cache-Control": "no-store"}


# -- the JSON shapes, shared with the command line -------------------------------------------


def api_json(api: Api) -> dict[str, Any]:
    """The JSON object of an API: name, exposed, its key limit, its rate limits and its key
    counts per kind."""
    return {
        "name": api.name,
        "exposed": api.exposed,
        "max_keys_per_kind": api.max_keys_per_kind,
        "rate_limits": rate_limits_json(api.rate_limits),
        "keys": {"internal": api.internal_keys, "external": api.external_keys},
    }


def rate_limits_json(limits: tuple[RateLimit, ...] | None) -> list[dict[str, object]] | None:
    """Rate limits as JSON: a list of ``{"limit", "per"}`` (``None`` stays ``None``: inherit)."""
    return None if limits is None else [limit.as_json() for limit in limits]


def _time_json(moment: datetime | None) -> str | None:
    return None if moment is None else rfc3339(moment)


def key_json(key: KeyInfo) -> dict[str, Any]:
    """The JSON object of a key (R9's fields and SPEC §8's); for a just-issued key also its
    ``secret``. Times are RFC 3339 UTC or ``null``; ``rate_limits`` ``null`` means the API's.

    ``secret`` is present exactly when ``key`` is an ``IssuedKey``: a string for
    an internal key, ``null`` for an external one (which has no secret yet).
    """
    result: dict[str, Any] = {
        "client_id": key.client_id,
        "name": key.name,
        "kind": key.kind.value,
        "has_secret": key.has_secret,
        "created_at": rfc3339(key.created_at),
        "enabled": key.enabled,
        "expires_at": _time_json(key.expires_at),
        "meta": thaw(key.meta),
        "last_used_at": _time_json(key.last_used_at),
        "previous_secret_expires_at": _time_json(key.previous_secret_expires_at),
        "rate_limits": rate_limits_json(key.rate_limits),
    }
    if isinstance(key, IssuedKey):
        result["secret"] = key.secret
    return result


_STATUS_BY_CODE = {
    "invalid_request": 422,
    "api_not_found": 404,
    "key_not_found": 404,
    "store_unavailable": 503,
}


def status_for(error: KeyGuardError) -> int | None:
    """The HTTP status the management API answers ``error`` with; ``None`` if it has none.

    Rule violations are 409, bad values 422, unknown APIs and keys 404, an
    unavailable store 503. A ``ConfigurationError`` is a bug in the setup, not
    in the request, and has no status of its own.
    """
    if isinstance(error, RuleViolation):
        return 409
    return _STATUS_BY_CODE.get(error.code)


def problem_json(code: str, detail: str, status: int | None = None) -> dict[str, Any]:
    """An RFC 9457 problem details object with keyguard's extra ``code`` member.

    ``type`` is ``about:blank`` (so ``title`` is the HTTP reason phrase) and
    ``code`` is the machine-readable part. Without a ``status`` (errors of the
    command line that HTTP never sends) the title is derived from ``code``.
    """
    title = HTTPStatus(status).phrase if status else code.replace("_", " ").capitalize()
    problem: dict[str, Any] = {"type": "about:blank", "title": title}
    if status is not None:
        problem["status"] = status
    problem["detail"] = detail
    problem["code"] = code
    return problem


class _ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def _problem(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    return _ProblemResponse(
        problem_json(code, detail, status),
        status_code=status,
        headers={**_NO_STORE, **(headers or {})},
    )


def _json(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse(content, status_code=status, headers={**_NO_STORE, **(headers or {})})


class _HTTPProblem(Exception):
    """A refusal decided by this module itself (body too large, wrong media type)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


# -- authentication ---------------------------------------------------------------------------


class _BearerAuth:
    """Refuse, before routing, every request without ``Authorization: Bearer <token>``.

    The only exception is reading one of the ``public`` paths (the console's
    static files, which hold no data): ``GET`` or ``HEAD`` of exactly that path.
    """

    def __init__(self, app: ASGIApp, *, token: bytes | None, public: frozenset[str]) -> None:
        self.app = app
        self.token = token
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope["headers"] if name == b"authorization"]
        presented = values[0].strip() if len(values) == 1 else b""
        scheme, _, credentials = presented.partition(b" ")
        credentials = credentials.strip()
        if scheme.lower() != b"bearer" or not credentials:
            response = _problem(
                401,
                "unauthorized",
                "this API needs an 'Authorization: Bearer <token>' header",
                {"WWW-Authenticate": _REALM},
            )
        elif not hmac.compare_digest(credentials, self.token):
            response = _problem(
                401,
                "unauthorized",
                "the bearer token is not valid",
                {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _is_public(self, scope: Scope) -> bool:
        if not self.public or scope["method"] not in ("GET", "HEAD"):
            return False
        # The path inside this app, as Starlette's router sees it: a mount leaves its
        # prefix in both path and root_path. The mount's bare prefix ("/kg" for
        # root_path "/kg") is not "/": it stays an unknown route, after authentication.
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            if len(path) == len(root_path) or path[len(root_path)] != "/":
                return False
            path = path[len(root_path) :]
        return path in self.public


def _validate_token(token: str | None, allow_no_auth: bool) -> bytes | None:
    if token is None:
        if allow_no_auth:
            return None
        raise ConfigurationError(
            "management_app needs token=...: every route requires 'Authorization: Bearer "
            "<token>' (generate one with python -c 'import secrets; print(secrets.token_urlsafe"
            "(32))'); pass allow_no_auth=True only if something in front of it authenticates"
        )
    if allow_no_auth:
        raise ConfigurationError("management_app: give either token= or allow_no_auth=True")
    if not isinstance(token, str) or not token or not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigurationError(
            "management_app: token must be a non-empty string of visible ASCII characters "
            "(no spaces), as it travels in an HTTP header"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        # The length only, never the token itself.
        raise ConfigurationError(
            f"management_app: token must be at least {MIN_TOKEN_LENGTH} characters, got "
            f"{len(token)} (generate one with python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return token.encode("ascii")


# -- bodies -----------------------------------------------------------------------------------


async def _read_object(request: Request, *, required: bool) -> dict[str, Any] | None:
    """The request body as a JSON object; ``None`` for an empty body when not ``required``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    if not body:
        if required:
            raise InvalidRequest("the request body must be a JSON object")
        return None
    media_type, _, params = request.headers.get("content-type", "").partition(";")
    media_type = media_type.strip().lower()
    charset = params.strip().lower().removeprefix("charset=").strip('"')
    if (
        not (media_type == "application/json" or media_type.endswith("+json"))
        or not media_type.startswith("application/")
        or (params.strip() and charset not in ("utf-8", "utf8"))
    ):
        raise _HTTPProblem(
            415,
            "unsupported_media_type",
            "the request body must be sent as 'Content-Type: application/json' (UTF-8)",
        )
    try:
        value = json.loads(
            bytes(body).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except InvalidRequest:
        raise  # from the hooks: duplicate members, NaN / Infinity
    except ValueError:
        # Python refuses integers of more than 4300 digits (CVE-2020-10735).
        raise InvalidRequest("the request body holds a number too large to read") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return value


def _too_large() -> _HTTPProblem:
    return _HTTPProblem(
        413, "request_too_large", f"the request body is larger than {MAX_BODY_BYTES} bytes"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise InvalidRequest(f"{name}: the field appears more than once")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"the request body is not valid JSON: {name} is not a JSON value")


# Fields a caller might try to choose although keyguard always generates them (R5, R6).
_GENERATED = {
    "secret": "secret: secrets are generated by keyguard and cannot be chosen",
    "client_id": "client_id: client ids are generated by keyguard and cannot be chosen",
}


def _check_fields(
    body: Mapping[str, Any],
    *,
    allowed: tuple[str, ...],
    required: tuple[str, ...] = (),
    nullable: tuple[str, ...] = (),
) -> None:
    for name in body:
        if name not in allowed:
            if name in _GENERATED:
                raise InvalidRequest(_GENERATED[name])
            expected = ", ".join(allowed) if allowed else "none"
            raise InvalidRequest(f"{name}: unknown field (allowed fields: {expected})")
        if body[name] is None and name not in nullable:
            raise InvalidRequest(f"{name}: cannot be null")
    for name in required:
        if name not in body:
            raise InvalidRequest(f"{name}: this field is required")


def _whole(value: Any) -> Any:
    """``value``, an integer-valued float (``5.0``, ``5e0``) made the integer it is.

    JSON has one number type, and JSON Schema calls 5.0 an integer; anything
    else is returned unchanged, for the checks downstream to refuse.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _expires_at(value: Any) -> Any:
    """The ``expires_at`` of a body: RFC 3339 text or ``null`` (checked by ``KeyManager``)."""
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(
            "expires_at must be an RFC 3339 time with a zone, such as 2026-12-31T23:59:59Z, or null"
        )
    return value


def _meta(value: Any) -> dict[str, Any]:
    """The ``meta`` of a body: a JSON object (its size is checked by ``KeyManager``)."""
    if not isinstance(value, dict):
        raise InvalidRequest('meta must be a JSON object, such as {"plan": "gold"}')
    return value


def _rate_limits(value: Any) -> list[dict[str, Any]] | None:
    """The ``rate_limits`` of a body: ``null`` or a list of ``{"limit", "per"}`` objects.

    Only objects: the ``"100/minute"`` shorthand is the command line's, not JSON's.
    """
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidRequest(
            'rate_limits must be a list of {"limit": n, "per": "second" | "minute" | '
            '"hour" | "day"} objects'
        )
    return [{name: _whole(item[name]) for name in item} for item in value]


MAX_GRACE_SECONDS = int(MAX_GRACE.total_seconds())
"""The longest ``grace_seconds`` of ``PUT …/secret``: 30 days."""


def _grace_seconds(value: Any) -> int:
    value = _whole(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("grace_seconds must be a whole number of seconds")
    if not 0 <= value <= MAX_GRACE_SECONDS:
        raise InvalidRequest(
            f"grace_seconds must be between 0 and {MAX_GRACE_SECONDS} (30 days), got {value}"
        )
    return value


# -- the routes -------------------------------------------------------------------------------


class _Endpoints:
    """One method per route; each parses, calls ``KeyManager`` and formats."""

    def __init__(self, manager: KeyManager, document: dict[str, Any]) -> None:
        self.manager = manager
        self.document = document

    async def list_apis(self, request: Request) -> Response:
        apis = await self.manager.list_apis()
        return _json({"apis": [api_json(api) for api in apis]})

    async def get_api(self, request: Request) -> Response:
        return _json(api_json(await self.manager.get_api(request.path_params["api"])))

    async def update_api(self, request: Request) -> Response:
        body = await _read_object(request, required=True)
        assert body is not None
        _check_fields(body, allowed=("exposed", "max_keys_per_kind", "rate_limits"))
        # JSON has one number type: 5.0 and 5e0 are the integer 5 (as in JSON Schema).
        limit = _whole(body.get("max_keys_per_kind"))
        api = await self.manager.update_api(
            request.path_params["api"],
            exposed=body.get("exposed"),
            max_keys_per_kind=limit,
            # Never null here (checked above): an API's own list has no "inherit".
            rate_limits=_rate_limits(body["rate_limits"]) if "rate_limits" in body else None,
        )
        return _json(api_json(api))

    async def delete_api(self, request: Request) -> Response:
        force = request.query_params.getlist("force")
        if force not in ([], ["true"], ["false"]):
            raise InvalidRequest("force: must be given once, as true or false")
        await self.manager.delete_api(request.path_params["api"], force=force == ["true"])
        return Response(status_code=204, headers=_NO_STORE)

    async def list_keys(self, request: Request) -> Response:
        keys = await self.manager.list_keys(request.path_params["api"])
        return _json({"keys": [key_json(key) for key in keys]})

    async def create_key(self, request: Request) -> Response:
        body = await _read_object(request, required=True)
        assert body is not None
        _check_fields(
            body,
            allowed=_CREATE_FIELDS,
            required=("name", "kind"),
            nullable=("expires_at", "rate_limits"),
        )
        key = await self.manager.create_key(
            request.path_params["api"],
            name=body["name"],
            kind=body["kind"],
            expires_at=_expires_at(body.get("expires_at")),
            enabled=body.get("enabled", True),
            meta=_meta(body["meta"]) if "meta" in body else None,
            rate_limits=_rate_limits(body.get("rate_limits")),
        )
        # Built from this app's own mount point (root_path), not with url_for: that resolves
        # through the outermost router, which cannot see inside a wrapped mount. Both parts
        # are URL-safe by construction (API names and client ids are restricted).
        root_path = request.scope.get("root_path", "")
        location = request.url.replace(
            path=f"{root_path}/apis/{key.api}/keys/{key.client_id}", query=""
        )
        return _json(key_json(key), 201, {"Location": str(location)})

    async def get_key(self, request: Request) -> Response:
        params = request.path_params
        return _json(key_json(await self.manager.get_key(params["api"], params["client_id"])))

    async def update_key(self, request: Request) -> Response:
        body = await _read_object(request, required=True)
        assert body is not None
        _check_fields(body, allowed=_UPDATE_FIELDS, nullable=("expires_at", "rate_limits"))
        # Only the fields present change; an absent one stays UNCHANGED (null is a value).
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = body["name"]
        if "enabled" in body:
            changes["enabled"] = body["enabled"]
        if "expires_at" in body:
            changes["expires_at"] = _expires_at(body["expires_at"])
        if "meta" in body:
            changes["meta"] = _meta(body["meta"])
        if "rate_limits" in body:
            changes["rate_limits"] = _rate_limits(body["rate_limits"])
        params = request.path_params
        key = await self.manager.update_key(params["api"], params["client_id"], **changes)
        return _json(key_json(key))

    async def set_secret(self, request: Request) -> Response:
        body = await _read_object(request, required=False)
        grace = 0
        if body is not None:
            _check_fields(body, allowed=("grace_seconds",))
            if "grace_seconds" in body:
                grace = _grace_seconds(body["grace_seconds"])
        params = request.path_params
        secret = await self.manager.set_secret(params["api"], params["client_id"], grace=grace)
        return _json(
            {
                "client_id": secret.client_id,
                "secret": str(secret),
                "previous_secret_expires_at": _time_json(secret.previous_secret_expires_at),
            }
        )

    async def delete_key(self, request: Request) -> Response:
        params = request.path_params
        await self.manager.delete_key(params["api"], params["client_id"])
        return Response(status_code=204, headers=_NO_STORE)

    async def openapi(self, request: Request) -> Response:
        document = self.document
        root_path = request.scope.get("root_path", "")
        if root_path:
            document = {**document, "servers": [{"url": root_path}]}
        return _json(document)


_CREATE_FIELDS = ("name", "kind", "expires_at", "enabled", "meta", "rate_limits")
_UPDATE_FIELDS = ("name", "enabled", "expires_at", "meta", "rate_limits")


@dataclass(frozen=True)
class _Operation:
    """One route: what the router needs and what the OpenAPI document says about it."""

    method: str
    path: str
    name: str
    summary: str
    status: int
    response: str | None  # a schema in components, or None for an empty body
    request: str | None = None  # the body's schema, if the route takes one
    request_required: bool = True
    errors: tuple[int, ...] = ()


_ON_API = (422, 503)  # every route with {api} validates the name and reads the store
_WITH_BODY = (413, 415)

_OPERATIONS = (
    _Operation("GET", "/apis", "list_apis", "List every API", 200, "ApiList", errors=(503,)),
    _Operation("GET", "/apis/{api}", "get_api", "Get one API", 200, "Api", errors=(404, *_ON_API)),
    _Operation(
        "PUT",
        "/apis/{api}",
        "update_api",
        "Create an API if needed and expose or un-expose it, or change its key limit",
        200,
        "Api",
        request="ApiUpdate",
        errors=(*_WITH_BODY, *_ON_API),
    ),
    _Operation(
        "DELETE",
        "/apis/{api}",
        "delete_api",
        "Delete an API; while it has keys only with ?force=true, which deletes them too",
        204,
        None,
        errors=(404, 409, *_ON_API),
    ),
    _Operation(
        "GET", "/apis/{api}/keys", "list_keys", "List an API's keys", 200, "KeyList", errors=_ON_API
    ),
    _Operation(
        "POST",
        "/apis/{api}/keys",
        "create_key",
        "Create a key; an internal key's secret is in this answer and never again",
        201,
        "IssuedKey",
        request="KeyCreate",
        errors=(409, *_WITH_BODY, *_ON_API),
    ),
    _Operation(
        "GET",
        "/apis/{api}/keys/{client_id}",
        "get_key",
        "Get one key",
        200,
        "Key",
        errors=(404, *_ON_API),
    ),
    _Operation(
        "PATCH",
        "/apis/{api}/keys/{client_id}",
        "update_key",
        "Change a key's name, enabled, expires_at, meta or rate_limits (either kind); "
        "only the fields given change",
        200,
        "Key",
        request="KeyUpdate",
        errors=(404, 409, *_WITH_BODY, *_ON_API),
    ),
    _Operation(
        "PUT",
        "/apis/{api}/keys/{client_id}/secret",
        "set_secret",
        "Generate a new secret for an external key, replacing the previous one at once or "
        "after a grace period",
        200,
        "Secret",
        request="SecretRequest",
        request_required=False,
        errors=(404, 409, *_WITH_BODY, *_ON_API),
    ),
    _Operation(
        "DELETE",
        "/apis/{api}/keys/{client_id}",
        "delete_key",
        "Delete a key; its next request fails",
        204,
        None,
        errors=(404, *_ON_API),
    ),
    _Operation("GET", "/openapi.json", "openapi", "This OpenAPI document", 200, "OpenApiDocument"),
)


# -- the OpenAPI document ---------------------------------------------------------------------

_ERROR_CODES = {
    401: ["unauthorized"],
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
    f"{MAX_META_BYTES} bytes as compact UTF-8 JSON, replaced as a whole when changed, "
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
        "required": ["keys"],
        "additionalProperties": False,
        "properties": {
            "keys": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/Key"},
                "description": "Oldest first.",
            }
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
    for op in _OPERATIONS:
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
                    for status in sorted((401, *op.errors, 500))
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
                "route needs 'Authorization: Bearer <token>'. Errors are RFC 9457 problem "
                "details with a machine-readable `code`; an unknown route is 404 "
                "`not_found` and a wrong method 405 `method_not_allowed` (after "
                "authentication). Every answer carries "
                "'Cache-Control: no-store'."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


# -- errors -----------------------------------------------------------------------------------


async def _keyguard_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KeyGuardError)
    status = status_for(exc)
    if status is None:
        logger.error("management API: %s", exc.code, exc_info=exc)
        return _problem(500, "internal_error", "keyguard is misconfigured; see the server log")
    if status == 503:
        logger.warning("management API: key store unavailable", exc_info=exc)
        return _problem(
            503,
            exc.code,
            "the key store is unavailable; try again later",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return _problem(status, exc.code, exc.message)


async def _http_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _HTTPProblem)
    return _problem(exc.status, exc.code, exc.detail)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _problem(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}",
            exc.headers,
        )
    if exc.status_code == 404:
        return _problem(404, "not_found", f"no route matches {request.url.path}")
    return _problem(exc.status_code, "invalid_request", str(exc.detail), exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error("management API: unexpected error", exc_info=exc)
    return _problem(500, "internal_error", "unexpected error; see the server log")


# -- the app ----------------------------------------------------------------------------------


def management_app(
    store: KeyStore,
    *,
    token: str | None = None,
    max_keys_per_kind: int = DEFAULT_MAX_KEYS_PER_KIND,
    allow_no_auth: bool = False,
    hasher: SecretHasher | None = None,
    console: bool = True,
) -> Starlette:
    """The management HTTP API over ``store``, to mount anywhere (SPEC §5).

    ``token`` is the bearer token every request must carry; building the app
    without one raises ``ConfigurationError`` unless ``allow_no_auth=True``
    says that something in front of it authenticates operators.
    ``max_keys_per_kind`` is the limit given to APIs created through it
    (an existing API keeps its stored limit). ``hasher`` hashes the secrets it
    issues: give it the same :class:`~keyguard.SecretHasher` as the middleware
    when you configure a non-default passlib scheme. Whoever opened ``store``
    closes it.

    ``console`` (on by default) serves the web console, a "Sharing & keys"
    page, at the app's root (``GET /``; see :mod:`keyguard.console`). Its
    static files are the only answers given without the token; the page asks
    the operator for the token and sends it with every call it makes.
    """
    secret_token = _validate_token(token, allow_no_auth)
    try:
        manager = KeyManager(store, max_keys_per_kind=max_keys_per_kind, hasher=hasher)
    except InvalidRequest as exc:
        raise ConfigurationError(f"management_app: {exc}") from None
    endpoints = _Endpoints(manager, openapi_document())
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for op in _OPERATIONS:
        by_path.setdefault(op.path, {})[op.method] = getattr(endpoints, op.name)
    # One route per path, so that a wrong method's 405 lists every allowed one in Allow.
    routes = [
        Route(path, _dispatch(handlers), methods=list(handlers))
        for path, handlers in by_path.items()
    ]
    public = CONSOLE_PATHS if console else frozenset()
    if console:
        routes += console_routes(token_required=secret_token is not None)
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_BearerAuth, token=secret_token, public=public)],
        exception_handlers={
            KeyGuardError: _keyguard_error,
            _HTTPProblem: _http_problem,
            HTTPException: _http_exception,
            Exception: _unexpected,
        },
    )
    # A trailing slash is a different, unknown route, not a redirect to follow.
    app.router.redirect_slashes = False
    return app


def _dispatch(
    handlers: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return endpoint
