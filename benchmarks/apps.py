"""The contenders: one bare Starlette app, and the same app behind each kind of key check.

Every contender protects the same endpoint and accepts the same credentials
(an ``X-IBM-Client-Id`` and, for internal keys, an ``X-IBM-Client-Secret``),
so the difference to the bare app is the cost of the check alone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, NamedTuple

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


class FloorKey(NamedTuple):
    """What the spec floor keeps per key: the SHA-256 of its secret (``None``: id only),
    its lifecycle fields, and the object the app is given."""

    digest: bytes | None
    enabled: bool
    expires_at: float | None  # a time.time() instant
    info: object


_REPEATED = [
    {
        "type": "http.response.start",
        "status": 400,
        "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
    },
    {"type": "http.response.body", "body": b'{"httpCode": "400"}'},
]
_REFUSED = [
    {
        "type": "http.response.start",
        "status": 401,
        "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
    },
    {"type": "http.response.body", "body": b'{"httpCode": "401"}'},
]


class SpecFloor:
    """The spec floor: the least hand-written pure-ASGI check doing the work SPEC §4, §8
    and §10 ask of a request whose key is at hand (a cache hit).

    It counts the credential headers (a repeat is refused), takes blank values as
    absent, awaits one lookup (an ``async def`` answering from a dict), compares the
    SHA-256 of the secret with the digest remembered for the key
    (``hmac.compare_digest``), checks ``enabled`` and the expiry, counts the request
    (a dict increment), sets the key's info in the request's own state dict, and strips
    the secret header from a copy of the scope. What it leaves out against keyguard:
    configuration (header names, excluded paths, query credentials, ``api=`` callables),
    the client id's shape and tag check, the API's exposed state, distinct refusal
    bodies, websockets, metrics and rate limits.
    """

    def __init__(self, app: ASGIApp, keys: dict[str, FloorKey]) -> None:
        self.app = app
        self.keys = keys
        self.usage: dict[str, int] = {}

    async def lookup(self, client_id: str) -> FloorKey | None:
        return self.keys.get(client_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = None
        secret_pair = None
        ids = secrets = 0
        for pair in scope["headers"]:
            name = pair[0]
            if name == ID_HEADER:
                ids += 1
                client_id = pair[1]
            elif name == SECRET_HEADER:
                secrets += 1
                secret_pair = pair
        if ids > 1 or secrets > 1:
            await _send_all(send, _REPEATED)
            return
        client_id_text = client_id.decode("latin-1").strip() if client_id else None
        secret = secret_pair[1].decode("latin-1").strip() if secret_pair else None
        if not client_id_text:
            await _send_all(send, _REFUSED)
            return
        key = await self.lookup(client_id_text)
        if (
            key is None
            or (
                not hmac.compare_digest(key.digest, hashlib.sha256(secret.encode()).digest())
                if key.digest is not None and secret
                else key.digest is not None or bool(secret)
            )
            or not key.enabled
            or (key.expires_at is not None and key.expires_at <= time.time())
        ):
            await _send_all(send, _REFUSED)
            return
        usage = self.usage
        usage[client_id_text] = usage.get(client_id_text, 0) + 1
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["keyguard"] = key.info
        if secret_pair is not None:
            scope = dict(scope)
            headers = list(scope["headers"])
            headers.remove(secret_pair)
            scope["headers"] = headers
        await self.app(scope, receive, send)


async def _send_all(send: Send, messages: list[Any]) -> None:
    for message in messages:
        await send(message)


def spec_floor(credentials: Credentials) -> ASGIApp:
    """The spec floor (:class:`SpecFloor`) over ``credentials``, keys enabled, no expiry."""
    keys = {
        client_id.decode(): FloorKey(
            None if secret is None else hashlib.sha256(secret).digest(),
            True,
            None,
            {"client_id": client_id.decode(), "created_at": datetime.now()},
        )
        for client_id, secret in credentials.items()
    }
    return SpecFloor(bare(), keys)


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
