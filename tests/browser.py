"""A real management app on a real socket, and Debian's Chromium to drive its console.

``ConsoleServer`` runs uvicorn in a thread, serving the management app at
``/keyguard`` (so the console is exercised under a mount, as users deploy it)
over an embedded SQLite store, next to an app protected by ``KeyGuard`` at
``/orders/hello``, so that a test can prove a secret the page showed really
works. The store is opened and closed on the server's own event loop.

Chromium is the machine's (``apt-get install chromium``), driven by Playwright
with ``executable_path``; Playwright's own browser download is never used.
Without Chromium the browser tests skip, loudly; with ``CI=true`` they fail.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from keyguard import KeyGuard, KeyStore, management_app, open_store
from tests.backends.servers import in_ci

TOKEN = "console-admin-token-0123456789-ab"
PROTECTED_API = "orders"

# What the machine's Chromium needs here: root (no sandbox), no GPU, and no
# background calls to Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium_path() -> str:
    """The machine's Chromium, or skip (fail under ``CI=true``) when it is not installed."""
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium is not installed (apt-get install chromium): browser tests cannot run"
        if in_ci():
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return path


def _hello(request: Request) -> JSONResponse:
    key = request.state.keyguard
    return JSONResponse({"hello": key.name})


class ConsoleServer:
    """The management app (console at ``/keyguard/``) and a protected app, on a free port."""

    def __init__(self, database: Path, *, token: str | None = TOKEN, timeout: float = 3.0) -> None:
        self.database = database
        self.url = f"sqlite:///{database}"
        # No cache: what the page changes is what the protected app sees, at once.
        self.store: KeyStore = open_store(self.url, cache_ttl=0, timeout=timeout)
        self.token = token
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.console = f"{self.base}/keyguard/"
        self.change_token(token)
        store = self.store

        async def admin(scope: Scope, receive: Receive, send: Send) -> None:
            await self._admin(scope, receive, send)

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await store.aclose()

        protected = Starlette(routes=[Route("/hello", _hello)])
        app = Starlette(
            routes=[
                Mount("/keyguard", admin),
                Mount(
                    f"/{PROTECTED_API}",
                    KeyGuard(protected, store=self.store, api=PROTECTED_API),
                ),
            ],
            lifespan=lifespan,
        )
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", ws="none", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def change_token(self, token: str | None) -> None:
        """Serve the management app with this token from now on, as after a restart."""
        self.token = token
        self._admin = (
            management_app(self.store, token=token)
            if token is not None
            else management_app(self.store, allow_no_auth=True)
        )

    def __enter__(self) -> ConsoleServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the console's test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
