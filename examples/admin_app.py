"""The management API and its web console as an app of their own, on an origin of their own.

Run it next to the protected app, on another port, over the same store:

    export KEYGUARD_STORE=sqlite:///keys.db
    export KEYGUARD_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
    uvicorn examples.admin_app:app --port 8001      # operators: http://127.0.0.1:8001/
    uvicorn examples.starlette_app:app --port 8000  # callers, with their keys

An origin (scheme, host and port) of its own keeps the console's token, which
the page holds in the tab's sessionStorage, away from every other page's
script (docs/console.md). In production, also keep the port off the public
network and put TLS in front.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Mount

from keyguard import management_app, open_store

token = os.environ.get("KEYGUARD_TOKEN")
if not token:
    raise SystemExit(
        "examples.admin_app needs KEYGUARD_TOKEN: export KEYGUARD_TOKEN=$(python -c "
        "'import secrets; print(secrets.token_urlsafe(32))')"
    )
store = open_store(os.environ.get("KEYGUARD_STORE", "sqlite:///keys.db"))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Whoever opens the store closes it: here, when the server stops."""
    yield
    await store.aclose()


app = Starlette(routes=[Mount("", management_app(store, token=token))], lifespan=lifespan)
