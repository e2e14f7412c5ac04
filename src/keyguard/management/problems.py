"""Problem details (RFC 9457) and the responses of the management API, none of them cacheable
nor sniffable.

``status_for`` and ``problem_json`` are shared with the command line, so its
``--json`` errors are the objects this API answers with. The JSON of APIs,
keys and secrets is :mod:`keyguard.shapes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse, Response

from keyguard.errors import KeyGuardError, RuleViolation

__all__ = [
    "ANSWER_HEADERS",
    "PROBLEM_MEDIA_TYPE",
    "HTTPProblem",
    "ProblemResponse",
    "json_response",
    "problem",
    "problem_json",
    "status_for",
]


PROBLEM_MEDIA_TYPE = "application/problem+json"

# Management answers describe secrets and who holds which key: nothing may cache them, and no
# browser may read one as anything but what it is (a JSON answer holding a key's name or meta
# as HTML or script), as the console's own files are served.
ANSWER_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


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
    """A problem details response that no cache may keep (and no browser may sniff)."""
    return ProblemResponse(
        problem_json(code, detail, status),
        status_code=status,
        headers={**ANSWER_HEADERS, **(headers or {})},
    )


def json_response(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response that no cache may keep (and no browser may sniff)."""
    return JSONResponse(content, status_code=status, headers={**ANSWER_HEADERS, **(headers or {})})


class HTTPProblem(Exception):
    """A refusal decided by the HTTP layer itself (body too large, wrong media type)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
