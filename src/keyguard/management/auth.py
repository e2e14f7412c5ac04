"""The bearer token every route of the management API needs, checked before routing."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from keyguard.errors import ConfigurationError
from keyguard.management.problems import problem

__all__ = ["MIN_TOKEN_LENGTH", "BearerAuth", "validate_token"]


MIN_TOKEN_LENGTH = 32
"""A management token shorter than this is a ``ConfigurationError`` when the app is built."""

_REALM = 'Bearer realm="keyguard"'


class BearerAuth:
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
            response = problem(
                401,
                "unauthorized",
                "this API needs an 'Authorization: Bearer <token>' header",
                {"WWW-Authenticate": _REALM},
            )
        elif not hmac.compare_digest(credentials, self.token):
            response = problem(
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


def validate_token(token: str | None, allow_no_auth: bool) -> bytes | None:
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
