"""A Litestar app behind KeyGuard, wrapped at the ASGI level.

Run it:  uvicorn examples.litestar_app:app

Litestar's own middleware (``Litestar(middleware=[...])``) runs after routing,
so a request for a route that does not exist would get Litestar's 404 (and a
wrong method its 405) without a key: which routes exist would be visible.
Wrapping the whole Litestar app in ``KeyGuard`` checks every request first.
"""

from __future__ import annotations

import os
from typing import cast

from litestar import Litestar, Request, get
from starlette.types import ASGIApp

from keyguard import KeyGuard, KeyInfo, open_store


@get("/echo")
async def echo(request: Request) -> dict[str, str]:  # type: ignore[type-arg]
    """Who called, as KeyGuard authenticated them."""
    key: KeyInfo = request.scope["state"]["keyguard"]
    return {"caller": key.name}


@get("/health")
async def health() -> dict[str, str]:
    """Open to everyone (excluded below)."""
    return {"status": "ok"}


store = open_store(os.environ.get("KEYGUARD_STORE", "sqlite:///keys.db"))
litestar_app = Litestar(route_handlers=[echo, health])
app = KeyGuard(cast("ASGIApp", litestar_app), store=store, api="orders", exclude_paths=["/health"])
