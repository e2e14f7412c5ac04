"""The JSON shapes of the management API: APIs, keys, problem details, and the responses
carrying them. Shared with the command line, so ``keyguard --json`` prints what the API answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse, Response

from keyguard.errors import KeyGuardError, RuleViolation
from keyguard.models import (
    Api,
    IssuedKey,
    KeyInfo,
    RateLimit,
    rfc3339,
    thaw,
)

__all__ = [
    "NO_STORE",
    "PROBLEM_MEDIA_TYPE",
    "HTTPProblem",
    "ProblemResponse",
    "api_json",
    "json_response",
    "key_json",
    "problem",
    "problem_json",
    "rate_limits_json",
    "status_for",
    "time_json",
]


PROBLEM_MEDIA_TYPE = "application/problem+json"

# Management answers describe secrets and who holds which key: nothing may cache them.
NO_STORE = {"Cache-Control": "no-store"}


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


def time_json(moment: datetime | None) -> str | None:
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
        "expires_at": time_json(key.expires_at),
        "meta": thaw(key.meta),
        "last_used_at": time_json(key.last_used_at),
        "previous_secret_expires_at": time_json(key.previous_secret_expires_at),
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
    body: dict[str, Any] = {"type": "about:blank", "title": title}
    if status is not None:
        body["status"] = status
    body["detail"] = detail
    body["code"] = code
    return body


class ProblemResponse(JSONResponse):
    """A JSON response sent as ``application/problem+json``."""

    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    """A problem details response that no cache may keep."""
    return ProblemResponse(
        problem_json(code, detail, status),
        status_code=status,
        headers={**NO_STORE, **(headers or {})},
    )


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response that no cache may keep."""
    return JSONResponse(content, status_code=status, headers={**NO_STORE, **(headers or {})})


class HTTPProblem(Exception):
    """A refusal decided by the HTTP layer itself (body too large, wrong media type)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
