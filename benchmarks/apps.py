"""The contenders: one bare Starlette app, and the same app behind each kind of key check.

Every contender protects the same endpoint and accepts the same credentials
(an ``X-IBM-Client-Id`` and, for internal keys, an ``X-IBM-Client-Secret``),
so the difference to the bare app is the cost of the check alone.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from keyguard import KeyGuard, KeyStore, SecretHasher

ID_HEADER = b"x-ibm-client-id"
SECRET_HEADER = b"x-ibm-client-secret"

Credentials = dict[bytes, bytes | None]  # client id -> secret (None: id only)


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def bare() -> Starlette:
    """The app every contender wraps: one route, a small text response."""
    return Starlette(routes=[Route("/", hello)])


class Floor:
    """The floor: the least a correct pure-ASGI check can do — one header scan, one dict get."""

    def __init__(self, app: ASGIApp, credentials: Credentials) -> None:
        self.app = app
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client_id = secret = None
            for name, value in scope["headers"]:
                if name == ID_HEADER:
                    client_id = value
                elif name == SECRET_HEADER:
                    secret = value
            if client_id not in self.credentials or self.credentials[client_id] != secret:
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


def floor(credentials: Credentials) -> ASGIApp:
    return Floor(bare(), credentials)


class _DictBackend(AuthenticationBackend):
    def __init__(self, credentials: Credentials) -> None:
        self.credentials = {
            k.decode(): None if v is None else v.decode() for k, v in credentials.items()
        }

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        client_id = conn.headers.get("x-ibm-client-id")
        if client_id is None or client_id not in self.credentials:
            raise AuthenticationError("unknown client id")
        if self.credentials[client_id] != conn.headers.get("x-ibm-client-secret"):
            raise AuthenticationError("bad secret")
        return AuthCredentials(["authenticated"]), SimpleUser(client_id)


def starlette_auth(credentials: Credentials) -> ASGIApp:
    """Starlette's own AuthenticationMiddleware with a dict backend."""
    return Starlette(
        routes=[Route("/", hello)],
        middleware=[Middleware(AuthenticationMiddleware, backend=_DictBackend(credentials))],
    )


def base_http(credentials: Credentials) -> ASGIApp:
    """The same dict check written as a BaseHTTPMiddleware (a common pattern, and slow)."""
    text = {k.decode(): None if v is None else v.decode() for k, v in credentials.items()}

    async def check(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        client_id = request.headers.get("x-ibm-client-id")
        if client_id not in text or text[client_id] != request.headers.get("x-ibm-client-secret"):
            return JSONResponse({"detail": "unauthorized"}, status_code=401)
        return await call_next(request)

    return Starlette(
        routes=[Route("/", hello)], middleware=[Middleware(BaseHTTPMiddleware, dispatch=check)]
    )


def fastapi_key_auth(api_key: str) -> ASGIApp | None:
    """The PyPI peer fastapi-key-auth (keys from API_KEY_* environment variables), if installed."""
    try:
        from fastapi_key_auth import AuthorizerMiddleware
    except ImportError:
        return None
    os.environ["API_KEY_BENCH"] = api_key
    app = bare()
    app.add_middleware(AuthorizerMiddleware)
    return app


def keyguard(
    store: KeyStore, api: str = "bench", hasher: SecretHasher | None = None, **options: Any
) -> ASGIApp:
    """keyguard, with default options (and ``hasher`` where keys use a custom scheme;
    ``options`` such as ``rate_limiter``)."""
    app = bare()
    app.add_middleware(KeyGuard, store=store, api=api, hasher=hasher, **options)
    return app


def raw_redis_round_trip(url: str) -> ASGIApp:
    """The bare app after one raw redis-py round trip (``PING``): what one Redis call costs."""
    import redis.asyncio as aioredis

    inner = bare()
    client = aioredis.from_url(url)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await client.ping()
        await inner(scope, receive, send)

    return app


def raw_redis_script_round_trip(url: str) -> ASGIApp:
    """The bare app after one raw redis-py ``EVALSHA`` of a script returning 1, on a
    client with the rate limiter's options (1 s socket timeouts): what the rate limiter's
    one script call costs without its script's work."""
    import redis.asyncio as aioredis

    inner = bare()
    client = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    script = client.register_script("return 1")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await script(["kgbench-rl:{raw}"], [1])
        await inner(scope, receive, send)

    return app
