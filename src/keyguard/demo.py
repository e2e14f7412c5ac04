"""``keyguard demo``: keyguard's main job, visible in one command.

One server on ``127.0.0.1`` serves a small app protected by ``KeyGuard`` for
the API ``demo`` (every method on every path answers a JSON echo of the
method, path, caller and body; ``/health`` needs no key) and
the management API at ``/keyguard``. The demo exposes ``demo``, gives it one
internal and one external key, and prints ``curl`` lines that succeed and
that fail, each with the status it gets.

It can be run again and again on the same store. Secrets are never stored,
so an existing internal key's secret cannot be shown again, and internal
keys cannot be given a new one (R4): each run therefore deletes the two demo
keys (found by name) and creates them afresh, which also keeps the API under
its key limit however often the demo runs. Other keys are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from keyguard.cli import cli_actor, store_label
from keyguard.errors import KeyGuardError, KeyNotFound
from keyguard.management import management_app
from keyguard.manager import KeyManager
from keyguard.middleware import DEFAULT_CLIENT_ID_HEADER, DEFAULT_CLIENT_SECRET_HEADER, KeyGuard
from keyguard.models import IssuedKey, KeyInfo, KeyKind
from keyguard.secrets import new_client_id
from keyguard.stores import open_store
from keyguard.stores._redact import redact
from keyguard.stores.base import KeyStore

if TYPE_CHECKING:
    import uvicorn

__all__ = ["DEMO_API", "DEMO_STORE", "TOKEN_ENV", "demo_app", "run_demo"]

DEMO_API = "demo"
DEMO_STORE = "sqlite:///keyguard-demo.db"
"""The demo's store unless ``--store`` is given: ``keyguard-demo.db`` in the current folder."""
TOKEN_ENV = "KEYGUARD_DEMO_TOKEN"  # noqa: S105 - the variable's name, not a token
INTERNAL_NAME = "demo-internal"
EXTERNAL_NAME = "demo-external"


_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def demo_app(store: KeyStore, *, token: str) -> Starlette:
    """The demo's ASGI app: every method on every path behind ``KeyGuard`` answers a JSON
    echo (method, path, the caller's key name, the JSON body received), ``/health`` is
    open, and the management API is at ``/keyguard`` (behind its own bearer ``token``, so
    excluded from key checks)."""

    async def echo(request: Request) -> JSONResponse:
        caller: KeyInfo = request.state.keyguard
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:  # not JSON (or not UTF-8): say so, as text
                body = {"not_json": raw.decode("utf-8", "replace")[:1000]}
        return JSONResponse(
            {
                "message": f"Hello, {caller.name}!",
                "method": request.method,
                "path": request.url.path,
                "name": caller.name,
                "api": caller.api,
                "client_id": caller.client_id,
                "kind": caller.kind.value,
                "body": body,
            }
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/health", health),
            Mount("/keyguard", management_app(store, token=token)),
            # Last: whatever the gateway's documentation calls, the app answers.
            Route("/{path:path}", echo, methods=_METHODS),
        ],
        middleware=[
            Middleware(
                KeyGuard, store=store, api=DEMO_API, exclude_paths=["/health", "/keyguard/*"]
            )
        ],
    )


@dataclass(frozen=True)
class _DemoKeys:
    internal: IssuedKey
    external: IssuedKey


async def _prepare(manager: KeyManager) -> _DemoKeys:
    """Expose the demo API and replace its two demo keys with fresh ones."""
    await manager.expose(DEMO_API)
    for name in (INTERNAL_NAME, EXTERNAL_NAME):
        try:
            old = await manager.find_key_by_name(DEMO_API, name)
        except KeyNotFound:
            continue
        await manager.delete_key(DEMO_API, old.client_id)
    return _DemoKeys(
        internal=await manager.create_key(DEMO_API, name=INTERNAL_NAME, kind=KeyKind.INTERNAL),
        external=await manager.create_key(DEMO_API, name=EXTERNAL_NAME, kind=KeyKind.EXTERNAL),
    )


def _curl(url: str, *headers: tuple[str, str]) -> str:
    return " ".join(["curl -i", url, *(f"-H {shlex.quote(f'{k}: {v}')}" for k, v in headers)])


def _banner(store_url: str, port: int, token: str, keys: _DemoKeys) -> str:
    base = f"http://127.0.0.1:{port}"
    hello, management = f"{base}/hello", f"{base}/keyguard/apis/{DEMO_API}/keys"
    internal, external = keys.internal, keys.external
    assert internal.secret is not None
    internal_id = (DEFAULT_CLIENT_ID_HEADER, internal.client_id)
    external_id = (DEFAULT_CLIENT_ID_HEADER, external.client_id)
    # Lowercase, as the gateway's documentation writes them (header names ignore case).
    id_header, secret_header = (
        DEFAULT_CLIENT_ID_HEADER.lower(),
        DEFAULT_CLIENT_SECRET_HEADER.lower(),
    )
    tries = [
        (
            200,
            "the internal key: client id and secret",
            _curl(hello, internal_id, (DEFAULT_CLIENT_SECRET_HEADER, internal.secret)),
        ),
        (200, "the external key: no secret yet, so the client id alone", _curl(hello, external_id)),
        (
            200,
            "IBM's own example call: any method, any path; the JSON body is echoed back",
            " ".join(
                [
                    "curl -i --request PUT",
                    shlex.quote(f"{base}/"),
                    f"--header {shlex.quote('content-type: application/json')}",
                    f"--header {shlex.quote(f'{id_header}: {internal.client_id}')}",
                    f"--header {shlex.quote(f'{secret_header}: {internal.secret}')}",
                    "--data '{\"id\":999999999999999}'",
                ]
            ),
        ),
        (200, "/health is excluded from key checks", _curl(f"{base}/health")),
        (401, "Client id missing.", _curl(hello)),
        (
            401,
            "Client id not registered. (an id nobody issued)",
            _curl(hello, (DEFAULT_CLIENT_ID_HEADER, new_client_id())),
        ),
        (
            401,
            "Invalid client id or secret. (the internal key with a wrong secret)",
            _curl(hello, internal_id, (DEFAULT_CLIENT_SECRET_HEADER, "wrong-secret")),
        ),
        (
            401,
            "Invalid client id or secret. (a secret sent to a key that has none)",
            _curl(hello, external_id, (DEFAULT_CLIENT_SECRET_HEADER, "anything")),
        ),
        (
            400,
            "Multiple client id or secret values in the request.",
            _curl(hello, internal_id, external_id),
        ),
        (
            200,
            "management API: the demo API's keys",
            _curl(management, ("Authorization", f"Bearer {token}")),
        ),
        (401, "management API without its token", _curl(management)),
    ]
    lines = [
        "",
        f"keyguard demo on {base}  (store: {redact(store_url)})",
        "",
        f"API {DEMO_API!r} is exposed with two fresh keys (a re-run replaces them):",
        f"  internal  {INTERNAL_NAME}  client id {internal.client_id}",
        f"                           secret    {internal.secret}",
        f"  external  {EXTERNAL_NAME}  client id {external.client_id}  (no secret yet)",
        "  The secret is shown only now; keyguard keeps just its hash.",
        "",
        f"Web console:    {base}/keyguard/  (sign in with the token below)",
        f"Management API: {base}/keyguard  (OpenAPI document at /keyguard/openapi.json)",
        f"  token: {token}",
        "",
        "This demo's store, from the command line (in another terminal):",
        f"  keyguard --store {shlex.quote(store_label(store_url))} keys list {DEMO_API}",
        "",
        "Try these; the comment above each line is the status it gets:",
        "",
    ]
    for status, what, command in tries:
        lines += [f"# {status}: {what}", command, ""]
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sys.platform != "win32":  # on Windows this would let another process share the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def _server(app: Starlette, on_ready: Callable[[], None]) -> uvicorn.Server:
    import uvicorn

    class DemoServer(uvicorn.Server):
        """A uvicorn server for which Ctrl-C and SIGTERM are the normal way to stop.

        uvicorn re-raises a signal it caught once it has shut down, so the process
        would end in a KeyboardInterrupt or with status -15; the demo exits 0.
        """

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                on_ready()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = [signal.SIGINT, signal.SIGTERM]
            previous = {sig: signal.signal(sig, self._stop) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def _stop(self, sig: int, frame: FrameType | None) -> None:
            # A second Ctrl-C stops without waiting for open connections.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    # uvicorn's own logging, with the access log on stderr too: stdout is the demo's.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(app, lifespan="off", log_level="info", log_config=log_config)
    return DemoServer(config)


async def _serve(store: KeyStore, store_url: str, token: str, port: int) -> int:
    try:
        try:
            app = demo_app(store, token=token)
            sock = _listen(port)
        except KeyGuardError as exc:
            print(f"keyguard: error: {exc.message}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(
                f"keyguard: error: cannot listen on 127.0.0.1:{port}: {exc.strerror} "
                "(choose another --port, or --port 0 for any free one)",
                file=sys.stderr,
            )
            return 1
        with sock:
            try:
                keys = await _prepare(KeyManager(store, actor=cli_actor()))
            except KeyGuardError as exc:
                print(f"keyguard: error: {exc.message}", file=sys.stderr)
                return 1
            banner = _banner(store_url, sock.getsockname()[1], token, keys)
            server = _server(app, on_ready=lambda: print(banner, flush=True))
            await server.serve(sockets=[sock])
        print("keyguard demo stopped.", flush=True)
        return 0
    finally:
        with contextlib.suppress(KeyGuardError):
            await store.aclose()


def run_demo(*, store_url: str | None = None, port: int = 8000) -> int:
    """Run the demo until Ctrl-C or SIGTERM; the exit code (0 after a clean stop).

    ``store_url`` defaults to ``DEMO_STORE``; the management token is
    ``$KEYGUARD_DEMO_TOKEN`` if set, else a fresh random one.
    """
    try:
        import uvicorn  # noqa: F401 - checked here so the message comes before any work
    except ImportError:
        print("keyguard: error: keyguard demo needs: pip install 'keyguard[cli]'", file=sys.stderr)
        return 1
    url = store_url or DEMO_STORE
    token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    try:
        store = open_store(url)
    except KeyGuardError as exc:
        print(f"keyguard: error: {exc.message}", file=sys.stderr)
        return 1
    return asyncio.run(_serve(store, url, token, port))
