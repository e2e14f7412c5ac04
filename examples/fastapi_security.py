"""A FastAPI app whose Swagger UI offers the key headers, with the caller as a typed dependency.

Run it:  uvicorn examples.fastapi_security:app
Then open http://127.0.0.1:8000/docs, press "Authorize", paste the client id
and secret it prints at startup, and try GET /orders.

``CurrentKey`` declares the ``X-IBM-Client-Id`` and ``X-IBM-Client-Secret``
headers as security schemes in the OpenAPI document and hands the handler the
``KeyInfo`` that ``KeyGuard`` authenticated; ``document_keyguard`` makes the
document say that the id is needed (with the secret, for keys that have one)
and lists KeyGuard's refusals. The docs pages themselves are excluded from key
checks so a browser can load them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from keyguard import KeyGuard, KeyManager, open_store
from keyguard.fastapi import CurrentKey, document_keyguard

store = open_store(os.environ.get("KEYGUARD_STORE", "memory://"))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    manager = KeyManager(store)
    await manager.expose("orders")
    if not await manager.list_keys("orders"):
        key = await manager.create_key("orders", name="example", kind="internal")
        print(
            "\nIn http://127.0.0.1:8000/docs press Authorize and enter:\n"
            f"  ClientId:     {key.client_id}\n  ClientSecret: {key.secret}\n"
            "or:\n  curl -i http://127.0.0.1:8000/orders"
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
    exclude_paths=["/health", "/docs", "/docs/*", "/openapi.json", "/redoc"],
)
document_keyguard(app)  # "id and secret, or id alone", not FastAPI's "either header"


@app.get("/orders")
async def orders(key: CurrentKey) -> dict[str, object]:
    """Only callers with a valid key get here; ``key`` says who they are."""
    return {"orders": [], "caller": key.name, "kind": key.kind.value}


@app.get("/health")
async def health() -> dict[str, str]:
    """Excluded from key checks, for load balancers; it declares no security."""
    return {"status": "ok"}
