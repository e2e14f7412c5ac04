"""A Starlette app behind KeyGuard.

Run it:  uvicorn examples.starlette_app:app
Then call the curl line it prints at startup.

The store comes from KEYGUARD_STORE (default: memory://, gone when the app
stops). On startup the app exposes the API "orders" and, if the API has no
key yet, issues one internal key and prints how to call the app with it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyInfo, KeyManager, open_store

store = open_store(os.environ.get("KEYGUARD_STORE", "memory://"))


async def orders(request: Request) -> JSONResponse:
    """Only callers with a valid key get here; KeyGuard says who they are."""
    caller: KeyInfo = request.state.keyguard
    return JSONResponse({"orders": [], "caller": caller.name, "kind": caller.kind.value})


async def health(request: Request) -> JSONResponse:
    """Excluded from key checks, for load balancers."""
    return JSONResponse({"status": "ok"})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    manager = KeyManager(store)
    await manager.expose("orders")
    if not await manager.list_keys("orders"):
        key = await manager.create_key("orders", name="example", kind="internal")
        print(  # the secret is shown once, here, as a real gateway's console would
            "\nTry:\n  curl -i http://127.0.0.1:8000/orders"
            f" -H 'X-IBM-Client-Id: {key.client_id}' -H 'X-IBM-Client-Secret: {key.secret}'\n"
            "  curl -i http://127.0.0.1:8000/orders   # 401: Client id missing.\n",
            flush=True,
        )
    yield
    await store.aclose()


app = Starlette(
    routes=[Route("/orders", orders), Route("/health", health)],
    lifespan=lifespan,
)
app.add_middleware(KeyGuard, store=store, api="orders", exclude_paths=["/health"])
