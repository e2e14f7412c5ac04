"""The app uvicorn serves in the throughput benchmark, chosen by environment variables.

``KGB_CONTENDER``: ``bare`` or ``keyguard``; for keyguard, ``KGB_STORE_URL``,
``KGB_PREFIX`` and ``KGB_CACHE`` (``1``/``0``) pick the store. With
``memory://`` the server seeds its own key from ``KGB_CLIENT_ID`` /
``KGB_SECRET`` (a memory store lives in one process, so with several
workers each seeds its own), and takes the seeding process's client id tag
key from ``KGB_ID_TAG_KEY`` (hex), without which the seeded id's tag would
not verify and every request would be refused 401.

With ``KGB_SERVED_DIR`` set, each worker process writes ``ready-<pid>`` there
once its lifespan has started, and ``served-<pid>`` at shutdown: how many
responses it sent with status 200 and how many with another status (the
``workers`` section checks that every worker served, and only 200s).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from benchmarks.apps import hello
from benchmarks.stores import open_bench_store
from keyguard import KeyGuard, KeyKind, MemoryStore, SecretHasher
from keyguard.models import KeyRecord, utcnow


class TaggedMemoryStore(MemoryStore):
    """A memory store with a given client id tag key (the process that issued the ids')."""

    def __init__(self, tag_key: bytes) -> None:
        super().__init__()
        self._given_tag_key = tag_key

    async def id_tag_key(self) -> bytes:
        return self._given_tag_key


def build() -> Starlette:
    contender = os.environ.get("KGB_CONTENDER", "bare")
    if contender == "bare":
        return Starlette(routes=[Route("/", hello)])
    url = os.environ["KGB_STORE_URL"]
    backend = url.split(":", 1)[0].split("+")[0]
    backend = {"postgresql": "postgres", "mariadb": "mysql"}.get(backend, backend)
    store = (
        TaggedMemoryStore(bytes.fromhex(os.environ["KGB_ID_TAG_KEY"]))
        if url == "memory://" and "KGB_ID_TAG_KEY" in os.environ
        else open_bench_store(
            backend,
            url,
            os.environ.get("KGB_PREFIX", ""),
            cache=os.environ.get("KGB_CACHE") == "1",
        )
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


class Served:
    """Counts the responses ``app`` sends by status, and reports them in ``directory``."""

    def __init__(self, app: ASGIApp, directory: Path) -> None:
        self.app = app
        self.directory = directory
        self.ok = 0
        self.other = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":

            async def counted(message: Message) -> None:
                if message["type"] == "http.response.start":
                    if message["status"] == 200:
                        self.ok += 1
                    else:
                        self.other += 1
                await send(message)

            await self.app(scope, receive, counted)
        elif scope["type"] == "lifespan":

            async def receiving() -> Message:
                message = await receive()
                if message["type"] == "lifespan.shutdown":
                    self._write("served", f"{self.ok} {self.other}\n")
                return message

            async def sending(message: Message) -> None:
                await send(message)
                if message["type"] == "lifespan.startup.complete":
                    self._write("ready", "")

            await self.app(scope, receiving, sending)
        else:
            await self.app(scope, receive, send)

    def _write(self, what: str, text: str) -> None:
        # Written whole under a temporary name, then renamed: a reader never sees half.
        final = self.directory / f"{what}-{os.getpid()}"
        partial = final.with_name(final.name + ".tmp")
        partial.write_text(text, encoding="utf-8")
        partial.replace(final)


app: ASGIApp = build()
if os.environ.get("KGB_SERVED_DIR"):
    app = Served(app, Path(os.environ["KGB_SERVED_DIR"]))
