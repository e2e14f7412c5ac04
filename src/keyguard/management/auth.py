"""The bearer tokens of the management API (SPEC §5), checked before routing.

``token="…"`` is one admin token named ``admin``; ``tokens={"ops": "…",
"dashboard": ReadOnly("…")}`` names several. A token wrapped in
:class:`ReadOnly` may only read (``GET``, ``HEAD``): any other method is
answered 403 ``forbidden`` before routing. The token's name is the actor of
the changes it makes, written ``token:<name>`` in the audit log.

The presented token is compared, in constant time, with *every* configured
token, with no early exit: the time taken tells neither whether nor which
token matched.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from keyguard.errors import ConfigurationError
from keyguard.management.problems import problem

__all__ = [
    "MIN_TOKEN_LENGTH",
    "NO_AUTH_ACTOR",
    "BearerAuth",
    "Principal",
    "ReadOnly",
    "principal",
    "validate_tokens",
]


MIN_TOKEN_LENGTH = 32
"""A management token shorter than this is a ``ConfigurationError`` when the app is built."""
NO_AUTH_ACTOR = "management"
"""The actor of changes through an app built with ``allow_no_auth=True``."""

_REALM = 'Bearer realm="keyguard"'
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SCOPE_KEY = "keyguard.principal"
_READS = frozenset({"GET", "HEAD"})


class ReadOnly:
    """A management token that may only read: ``tokens={"dashboard": ReadOnly("…")}``.

    Its ``repr`` never shows the token.
    """

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token

    def __repr__(self) -> str:
        return "ReadOnly('***')"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: the token's name, and whether it may only read."""

    name: str
    read_only: bool

    @property
    def actor(self) -> str:
        """How the audit log names this token: ``token:<name>``."""
        return f"token:{self.name}" if self.name else NO_AUTH_ACTOR

    def as_json(self) -> dict[str, object]:
        """``{"token", "actor", "read_only"}``, as ``GET /whoami`` answers."""
        return {"token": self.name or None, "actor": self.actor, "read_only": self.read_only}


_NO_AUTH = Principal("", read_only=False)


@dataclass(frozen=True, slots=True)
class _Token:
    secret: bytes
    principal: Principal


def principal(scope: Scope) -> Principal:
    """The :class:`Principal` ``BearerAuth`` found for this request."""
    found = scope.get(_SCOPE_KEY)
    return found if isinstance(found, Principal) else _NO_AUTH


class BearerAuth:
    """Refuse, before routing, every request without ``Authorization: Bearer <token>``.

    The only exception is reading one of the ``public`` paths (the console's
    static files, which hold no data): ``GET`` or ``HEAD`` of exactly that path.
    """

    def __init__(
        self, app: ASGIApp, *, tokens: tuple[_Token, ...] | None, public: frozenset[str]
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.tokens is None or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        # Header names are case-insensitive: an ASGI server lowercases them, but an app or
        # middleware in front may not, and a second "Authorization" must count however spelt.
        values = [value for name, value in scope["headers"] if name.lower() == b"authorization"]
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
        elif (found := self._match(credentials)) is None:
            response = problem(
                401,
                "unauthorized",
                "the bearer token is not valid",
                {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        elif found.read_only and scope["method"] not in _READS:
            response = problem(
                403,
                "forbidden",
                f"the token {found.name!r} is read-only: it cannot make changes",
            )
        else:
            scope[_SCOPE_KEY] = found
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)

    def _match(self, credentials: bytes) -> Principal | None:
        """The principal of the token equal to ``credentials``, comparing with every token."""
        assert self.tokens is not None
        found: Principal | None = None
        for token in self.tokens:
            # Every comparison runs, whatever the earlier ones found.
            if hmac.compare_digest(credentials, token.secret):
                found = token.principal
        return found

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


def validate_tokens(
    token: str | None,
    tokens: Mapping[str, str | ReadOnly] | None,
    allow_no_auth: bool,
) -> tuple[_Token, ...] | None:
    """The configured tokens, checked once (``None``: no authentication, as asked)."""
    if token is None and tokens is None:
        if allow_no_auth:
            return None
        raise ConfigurationError(
            "management_app needs token=... or tokens={...}: every route requires "
            "'Authorization: Bearer <token>' (generate one with python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'); pass allow_no_auth=True only if something "
            "in front of it authenticates"
        )
    if allow_no_auth:
        raise ConfigurationError("management_app: give either token=/tokens= or allow_no_auth=True")
    if token is not None and tokens is not None:
        raise ConfigurationError("management_app: give token= or tokens=, not both")
    named: Mapping[str, str | ReadOnly] = {"admin": token} if token is not None else tokens or {}
    if not isinstance(named, Mapping) or not named:
        raise ConfigurationError("management_app: tokens must be a non-empty dict of name: token")
    checked: list[_Token] = []
    names_seen: dict[str, str] = {}
    for name, value in named.items():
        if not isinstance(name, str) or not _TOKEN_NAME.fullmatch(name):
            raise ConfigurationError(
                f"management_app: a token's name must match {_TOKEN_NAME.pattern}, got {name!r}"
            )
        # The name is the actor in the audit log: "token:ops" and "token:OPS" would read as one.
        if (other := names_seen.setdefault(name.casefold(), name)) != name:
            raise ConfigurationError(
                f"management_app: the token names {other!r} and {name!r} differ only in case; "
                "each token needs a name of its own in the audit log"
            )
        read_only = isinstance(value, ReadOnly)
        text = value.token if isinstance(value, ReadOnly) else value
        checked.append(_Token(_check_token(text, name), Principal(name, read_only)))
    secrets_seen = [entry.secret for entry in checked]
    if len(set(secrets_seen)) != len(secrets_seen):
        raise ConfigurationError(
            "management_app: two token names share one token; each needs its own"
        )
    return tuple(checked)


def _check_token(token: object, name: str) -> bytes:
    if not isinstance(token, str) or not token or not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigurationError(
            f"management_app: token {name!r} must be a non-empty string of visible ASCII "
            "characters (no spaces), as it travels in an HTTP header"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        # The length only, never the token itself.
        raise ConfigurationError(
            f"management_app: token {name!r} must be at least {MIN_TOKEN_LENGTH} characters, "
            f"got {len(token)} (generate one with python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))')"
        )
    return token.encode("ascii")
