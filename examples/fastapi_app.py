"""A FastAPI app behind KeyGuard.

Run it:  uvicorn examples.fastapi_app:app
Then call the curl line it prints at startup.

KeyGuard is plain ASGI middleware, so FastAPI takes it as it is. Handlers
read the caller from ``request.state.keyguard``; see
``examples/fastapi_security.py`` for the typed dependency and the Swagger UI
"Authorize" button.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from keyguard import KeyGuard, KeyInfo, KeyManager, open_store

store = open_store(os.environ.get("KEYGUARD_STORE", "memory://"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    manager = KeyManager(store)
    await manager.expose("orders")
    if not await manager.list_keys("orders"):
        key = await manager.create_key("orders", name="example", kind="internal")
        print(
            "\nTry:\n  curl -i http://127.0.0.1:8000/orders"
            f" -H 'X-IBM-Client-Id: {key.client_id}' -H 'X-IBM-Client-Secret: {key.secret}'\n",
            flush=True,
        )
    yield
    await store.aclose()


app = FastAPI(title="Orders", lifespan=lifespan)
app.add_middleware(
    KeyGuard,
    store=store,
    api="orders",
    exclude_paths=["/health", "/docs", "/openapi.json"],
)


@app.get("/orders")
async def orders(request: Request) -> dict[str, object]:
    """Only callers with a valid key get here."""
    caller: KeyInfo = request.state.keyguard
    return {"orders": [], "caller": caller.name, "kind": caller.kind.value}


@app.get("/health")
async def health() -> dict[str, str]:
    """Excluded from key checks, for load balancers."""
    return {"status": "ok"}
