"""FastAPI friendliness: the key headers as OpenAPI security schemes, the caller as a dependency.

::

    from keyguard.fastapi import CurrentKey

    app = FastAPI()
    app.add_middleware(KeyGuard, store=store, api="orders",
                       exclude_paths=["/docs", "/docs/*", "/openapi.json"])

    @app.get("/orders")
    async def orders(key: CurrentKey) -> dict[str, str]:
        return {"caller": key.name}

A route that takes ``CurrentKey`` (or lists ``Depends(current_key)`` among its
dependencies) declares the two headers as ``apiKey`` security schemes in the
app's OpenAPI document, so Swagger UI's "Authorize" button offers them, and
receives the :class:`~keyguard.KeyInfo` the ``KeyGuard`` middleware put in
``request.state.keyguard``. The middleware does the checking; these
dependencies only describe it and hand its result over.

FastAPI on its own lists the schemes as alternatives, which reads as if the
secret alone were enough, and knows nothing of KeyGuard's refusals. Call
``document_keyguard(app)`` once: each protected operation then requires "id
and secret, or id alone" (``[{"ClientId": [], "ClientSecret": []},
{"ClientId": []}]``, along with the route's other requirements) and lists the 400,
401, 404, 429 and 503 refusals with IBM's body schema.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the dependency's
# annotations at runtime, and they name local variables.
import copy
from collections.abc import Callable
from typing import Annotated, Any

from keyguard.errors import ConfigurationError
from keyguard.middleware import DEFAULT_CLIENT_ID_HEADER, DEFAULT_CLIENT_SECRET_HEADER
from keyguard.models import KeyInfo

try:
    from fastapi import Depends, FastAPI, Request, Security
    from fastapi.security import APIKeyHeader
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without fastapi
    raise ConfigurationError("keyguard.fastapi needs: pip install 'keyguard[fastapi]'") from exc

__all__ = [
    "CLIENT_ID_SCHEME",
    "CLIENT_SECRET_SCHEME",
    "CurrentKey",
    "current_key",
    "document_keyguard",
    "key_dependency",
]

CLIENT_ID_SCHEME = "ClientId"
"""The name of the client id's security scheme in the OpenAPI document."""
CLIENT_SECRET_SCHEME = "ClientSecret"  # noqa: S105 - a scheme's name
"""The name of the secret's security scheme in the OpenAPI document."""


def key_dependency(
    *,
    client_id_header: str = DEFAULT_CLIENT_ID_HEADER,
    client_secret_header: str = DEFAULT_CLIENT_SECRET_HEADER,
) -> Callable[..., KeyInfo]:
    """A dependency returning the caller's ``KeyInfo``, declaring these two headers.

    Use it when ``KeyGuard`` is configured with other header names; the
    defaults are IBM's, like the middleware's (``current_key`` is this
    function's result for them).
    """
    client_id = APIKeyHeader(
        name=client_id_header,
        scheme_name=CLIENT_ID_SCHEME,
        description="The key's client id.",
        auto_error=False,
    )
    client_secret = APIKeyHeader(
        name=client_secret_header,
        scheme_name=CLIENT_SECRET_SCHEME,
        description="The key's secret, for keys that have one.",
        auto_error=False,
    )

    def dependency(
        request: Request,
        presented_id: Annotated[str | None, Security(client_id)],
        presented_secret: Annotated[str | None, Security(client_secret)],
    ) -> KeyInfo:
        # The headers are declared only for the OpenAPI document; KeyGuard has
        # checked them already (and stripped the secret).
        key = getattr(request.state, "keyguard", None)
        if not isinstance(key, KeyInfo):
            raise ConfigurationError(
                f"{request.url.path} asks for the caller's key, but no KeyGuard middleware "
                "checked this request (not installed, or the path is in exclude_paths)"
            )
        return key

    return dependency


current_key = key_dependency()
"""The caller's ``KeyInfo`` (default header names), as a FastAPI dependency."""

CurrentKey = Annotated[KeyInfo, Depends(current_key)]
"""A handler parameter annotated ``CurrentKey`` receives the caller's ``KeyInfo``."""


REFUSAL_SCHEMA_NAME = "KeyGuardRefusal"
_REFUSAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A refusal in IBM's gateway format.",
    "properties": {
        "httpCode": {"type": "string", "examples": ["401"]},
        "httpMessage": {"type": "string", "examples": ["Unauthorized"]},
        "moreInformation": {"type": "string", "examples": ["Client id not registered."]},
    },
    "required": ["httpCode", "httpMessage", "moreInformation"],
}
_REFUSALS = {
    "400": "Multiple client id or secret values in the request.",
    "401": (
        "Client id missing, not registered, disabled or expired, or an invalid client id or secret."
    ),
    "404": "The API is unknown or not exposed.",
    "429": "A rate limit of the key is used up; retry after Retry-After seconds.",
    "503": "The key store is unavailable; retry after Retry-After seconds.",
}
_SECONDS = {"schema": {"type": "integer", "minimum": 1}, "description": "Seconds to wait."}
_RATE_HEADERS: dict[str, Any] = {
    "X-RateLimit-Limit": {
        "schema": {"type": "integer"},
        "description": "The key's tightest rate limit (sent to rate-limited keys only).",
    },
    "X-RateLimit-Remaining": {
        "schema": {"type": "integer"},
        "description": "Requests left within that limit (sent to rate-limited keys only).",
    },
}
_HEADERS: dict[str, dict[str, Any]] = {
    "401": {
        "WWW-Authenticate": {
            "schema": {"type": "string", "examples": ['APIKey realm="orders"']},
            "description": "The challenge every 401 carries: APIKey, realm the API's name.",
        }
    },
    "429": {"Retry-After": _SECONDS, **_RATE_HEADERS},
    "503": {"Retry-After": _SECONDS},
}
_OURS = (CLIENT_ID_SCHEME, CLIENT_SECRET_SCHEME)


def document_keyguard(app: FastAPI) -> None:
    """Make ``app``'s OpenAPI document say what KeyGuard requires and answers.

    Every operation that uses the key's security schemes requires "id and
    secret, or id alone", and lists KeyGuard's refusals (400, 401, 404, 429,
    503) with IBM's body schema and their ``Retry-After`` and rate-limit
    headers (and a 401's ``WWW-Authenticate``). Call it once, after the routes are added
    or before: the document is rewritten when it is next built. The operation's other
    security requirements (a bearer token of the app's own, say), which FastAPI lists as
    alternatives to the key, are kept, as required along with it: every dependency of a
    route runs.
    """
    build = app.openapi
    app.openapi_schema = None  # a document built already is built again, rewritten

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        reference = {"$ref": f"#/components/schemas/{REFUSAL_SCHEMA_NAME}"}
        used = False
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                if not isinstance(operation, dict):
                    continue
                security = operation.get("security", [])
                if not any(CLIENT_ID_SCHEME in entry for entry in security):
                    continue
                used = True
                others: dict[str, list[str]] = {}
                for entry in security:
                    for name, scopes in entry.items():
                        if name not in _OURS:
                            held = others.setdefault(name, [])
                            held.extend(scope for scope in scopes if scope not in held)
                operation["security"] = [
                    {**others, CLIENT_ID_SCHEME: [], CLIENT_SECRET_SCHEME: []},
                    {**copy.deepcopy(others), CLIENT_ID_SCHEME: []},
                ]
                responses = operation.setdefault("responses", {})
                for status, description in _REFUSALS.items():
                    refusal: dict[str, Any] = {
                        "description": description,
                        "content": {"application/json": {"schema": dict(reference)}},
                    }
                    if status in _HEADERS:
                        refusal["headers"] = copy.deepcopy(_HEADERS[status])
                    responses.setdefault(status, refusal)
        if used:
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas[REFUSAL_SCHEMA_NAME] = copy.deepcopy(_REFUSAL_SCHEMA)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
