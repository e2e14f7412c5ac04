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

FastAPI lists the schemes as alternatives (it cannot say "the id, plus the
secret where the key has one"); which ones a key needs is keyguard's business.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the dependency's
# annotations at runtime, and they name local variables.
from collections.abc import Callable
from typing import Annotated

from keyguard.errors import ConfigurationError
from keyguard.middleware import DEFAULT_CLIENT_ID_HEADER, DEFAULT_CLIENT_SECRET_HEADER
from keyguard.models import KeyInfo

try:
    from fastapi import Depends, Request, Security
    from fastapi.security import APIKeyHeader
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without fastapi
    raise ConfigurationError("keyguard.fastapi needs: pip install 'keyguard[fastapi]'") from exc

__all__ = [
    "CLIENT_ID_SCHEME",
    "CLIENT_SECRET_SCHEME",
    "CurrentKey",
    "current_key",
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
