"""``management_app``: the route table, the bearer check and the error handlers put together."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keyguard.console import CONSOLE_PATHS, console_routes
from keyguard.errors import ConfigurationError, InvalidRequest, KeyGuardError
from keyguard.management.auth import BearerAuth, validate_token
from keyguard.management.openapi import openapi_document
from keyguard.management.problems import HTTPProblem, problem, status_for
from keyguard.management.routes import OPERATIONS, Endpoints
from keyguard.manager import DEFAULT_MAX_KEYS_PER_KIND, KeyManager
from keyguard.middleware import RETRY_AFTER_SECONDS
from keyguard.secrets import SecretHasher
from keyguard.stores.base import KeyStore

__all__ = ["management_app"]


logger = logging.getLogger("keyguard")

# -- errors -----------------------------------------------------------------------------------


async def _keyguard_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KeyGuardError)
    status = status_for(exc)
    if status is None:
        logger.error("management API: %s", exc.code, exc_info=exc)
        return problem(500, "internal_error", "keyguard is misconfigured; see the server log")
    if status == 503:
        logger.warning("management API: key store unavailable", exc_info=exc)
        return problem(
            503,
            exc.code,
            "the key store is unavailable; try again later",
            {"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return problem(status, exc.code, exc.message)


async def _http_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPProblem)
    return problem(exc.status, exc.code, exc.detail)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return problem(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}",
            exc.headers,
        )
    if exc.status_code == 404:
        return problem(404, "not_found", f"no route matches {request.url.path}")
    return problem(exc.status_code, "invalid_request", str(exc.detail), exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error("management API: unexpected error", exc_info=exc)
    return problem(500, "internal_error", "unexpected error; see the server log")


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
    secret_token = validate_token(token, allow_no_auth)
    try:
        manager = KeyManager(store, max_keys_per_kind=max_keys_per_kind, hasher=hasher)
    except InvalidRequest as exc:
        raise ConfigurationError(f"management_app: {exc}") from None
    endpoints = Endpoints(manager, openapi_document())
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for op in OPERATIONS:
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
        middleware=[Middleware(BearerAuth, token=secret_token, public=public)],
        exception_handlers={
            KeyGuardError: _keyguard_error,
            HTTPProblem: _http_problem,
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
