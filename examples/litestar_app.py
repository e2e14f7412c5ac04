"""A Litestar app behind KeyGuard, wrapped at the ASGI level.

Run it:  uvicorn examples.litestar_app:app
Then call the curl line it prints at startup.

Litestar's own middleware (``Litestar(middleware=[...])``) runs after routing,
so a request for a route that does not exist would get Litestar's 404 (and a
wrong method its 405) without a key: which routes exist would be visible.
Wrapping the whole Litestar app in ``KeyGuard`` checks every request first;
lifespan messages pass through it to Litestar unchanged.

The store comes from KEYGUARD_STORE (default: memory://, gone when the app
stops). On startup the app exposes the API "orders" and, if the API has no key
yet, issues one internal key and prints how to call the app with it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

from litestar import Litestar, Request, get
from starlette.types import ASGIApp

from keyguard import KeyGuard, KeyInfo, KeyManager, open_store

store = open_store(os.environ.get("KEYGUARD_STORE", "memory://"))


@get("/echo")
async def echo(request: Request) -> dict[str, str]:  # type: ignore[type-arg]
    """Who called, as KeyGuard authenticated them."""
    key: KeyInfo = request.scope["state"]["keyguard"]
    return {"caller": key.name}


@get("/health")
async def health() -> dict[str, str]:
    """Open to everyone (excluded below)."""
    return {"status": "ok"}


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    manager = KeyManager(store)
    await manager.expose("orders")
    if not await manager.list_keys("orders"):
        key = await manager.create_key("orders", name="example", kind="internal")
        print(  # the secret is shown once, here
            "\nTry:\n  curl -i http://127.0.0.1:8000/echo"
            f" -H 'X-IBM-Client-Id: {key.client_id}' -H 'X-IBM-Client-Secret: {key.secret}'\n"
            "  curl -i http://127.0.0.1:8000/nowhere   # 401, not 404: no route shows\n",
            flush=True,
        )
    yield
    await store.aclose()  # whoever opens the store closes it


litestar_app = Litestar(route_handlers=[echo, health], lifespan=[lifespan])
app = KeyGuard(cast("ASGIApp", litestar_app), store=store, api="orders", exclude_paths=["/health"])
