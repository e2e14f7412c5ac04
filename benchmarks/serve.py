"""The app uvicorn serves in the throughput benchmark, chosen by environment variables.

``KGB_CONTENDER``: ``bare`` or ``keyguard``; for keyguard, ``KGB_STORE_URL``,
``KGB_PREFIX`` and ``KGB_CACHE`` (``1``/``0``) pick the store. With
``memory://`` the server seeds its own key from ``KGB_CLIENT_ID`` /
``KGB_SECRET`` (a memory store lives in one process).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route

from benchmarks.apps import hello
from benchmarks.stores import open_bench_store
from keyguard import KeyGuard, KeyKind, SecretHasher
from keyguard.models import KeyRecord, utcnow


def build() -> Starlette:
    contender = os.environ.get("KGB_CONTENDER", "bare")
    if contender == "bare":
        return Starlette(routes=[Route("/", hello)])
    url = os.environ["KGB_STORE_URL"]
    backend = url.split(":", 1)[0].split("+")[0]
    backend = {"postgresql": "postgres", "mariadb": "mysql"}.get(backend, backend)
    store = open_bench_store(
        backend, url, os.environ.get("KGB_PREFIX", ""), cache=os.environ.get("KGB_CACHE") == "1"
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if url == "memory://":
            await store.upsert_api(
                "bench", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
            )
            await store.insert_key(
                KeyRecord(
                    "bench",
                    os.environ["KGB_CLIENT_ID"],
                    "internal",
                    KeyKind.INTERNAL,
                    SecretHasher().hash(os.environ["KGB_SECRET"]),
                    utcnow(),
                )
            )
        yield
        await store.aclose()

    app = Starlette(routes=[Route("/", hello)], lifespan=lifespan)
    app.add_middleware(KeyGuard, store=store, api="bench")
    return app


app = build()
