"""The request path through real server processes (issue 12): root paths, HEAD refusals,
state seen by outer middleware and websocket handshakes, under uvicorn (its three websocket
implementations), hypercorn (HTTP/1.1 and h2c), granian (HTTP/1.1 and HTTP/2 cleartext) and
daphne, each on a free loopback port and terminated at the end of the module."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from keyguard import KeyManager, open_store

pytestmark = pytest.mark.slow

APP = """
import os
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from keyguard import KeyGuard, open_store

async def health(request: Request) -> JSONResponse:
    return JSONResponse({"secret": request.headers.get("x-ibm-client-secret")})

async def data(request: Request) -> JSONResponse:
    return JSONResponse({"secret": request.headers.get("x-ibm-client-secret"),
                         "caller": request.state.keyguard.name})

async def ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(websocket.state.keyguard.name)
    await websocket.close()

guarded = KeyGuard(
    Starlette(routes=[Route("/health", health), Route("/data", data),
                      WebSocketRoute("/ws", ws)]),
    store=open_store(os.environ["KG_URL"]), api="orders", exclude_paths=["/health"])

async def app(scope, receive, send):
    # An outer middleware (an access logger, say): reads who called from the request's
    # state once KeyGuard has run, and reports it in a header.
    async def send_caller(message):
        if message["type"] == "http.response.start":
            info = (scope.get("state") or {}).get("keyguard")
            caller = b"-" if info is None else info.name.encode()
            message = {**message, "headers": [*message["headers"], (b"x-caller", caller)]}
        await send(message)
    await guarded(scope, receive, send_caller)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Variant:
    """One server set-up: its command line and how a client reaches the app under /prefix."""

    args: tuple[str, ...]
    # The path a client sends: uvicorn prepends --root-path to it (a proxy has stripped
    # the prefix); hypercorn and granian expect the prefix in the request path.
    client_prefix: str
    http2: bool = False


UVICORN = ("-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--root-path", "/prefix")
HYPERCORN = ("-m", "hypercorn", "--bind", "127.0.0.1:{port}", "--root-path", "/prefix")
GRANIAN = (
    "-m",
    "granian",
    "--interface",
    "asgi",
    "--host",
    "127.0.0.1",
    "--port",
    "{port}",
    "--url-path-prefix",
    "/prefix",
    "--no-access-log",
)
DAPHNE = ("-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", "--root-path", "/prefix")
VARIANTS = {
    "uvicorn": Variant((*UVICORN, "--ws", "websockets", "srvapp:app"), ""),
    "uvicorn-wsproto": Variant((*UVICORN, "--ws", "wsproto", "srvapp:app"), ""),
    "uvicorn-sansio": Variant((*UVICORN, "--ws", "websockets-sansio", "srvapp:app"), ""),
    "daphne": Variant((*DAPHNE, "srvapp:app"), "/prefix"),
    "hypercorn": Variant((*HYPERCORN, "srvapp:app"), "/prefix"),
    # hypercorn answers HTTP/2 with prior knowledge on a cleartext port (h2c).
    "hypercorn-h2c": Variant((*HYPERCORN, "srvapp:app"), "/prefix", http2=True),
    "granian": Variant((*GRANIAN, "--http", "1", "srvapp:app"), "/prefix"),
    "granian-h2": Variant((*GRANIAN, "--http", "2", "srvapp:app"), "/prefix", http2=True),
}
HTTP_VARIANTS = ["daphne", "granian", "granian-h2", "hypercorn", "hypercorn-h2c", "uvicorn"]
# Websocket handshakes are HTTP/1.1 upgrades; uvicorn has three implementations of them.
WS_VARIANTS = ["daphne", "granian", "hypercorn", "uvicorn", "uvicorn-sansio", "uvicorn-wsproto"]


@dataclass(frozen=True)
class Key:
    client_id: str
    secret: str


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    prefix: str
    http2: bool

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def client(self) -> httpx.Client:
        # http1=False: HTTP/2 with prior knowledge, the only HTTP/2 on a cleartext port.
        if self.http2:
            return httpx.Client(base_url=self.base, http1=False, http2=True, timeout=10)
        return httpx.Client(base_url=self.base, timeout=10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("srv")


@pytest.fixture(scope="module")
def key(folder: Path) -> Key:
    """An SQLite key store the server processes open: API orders with one internal key."""

    async def create() -> Key:
        store = open_store(f"sqlite:///{folder / 'keys.db'}", cache_ttl=0)
        try:
            manager = KeyManager(store)
            await manager.expose("orders")
            issued = await manager.create_key("orders", name="Acme", kind="internal")
            assert issued.secret is not None
            return Key(issued.client_id, str(issued.secret))
        finally:
            await store.aclose()

    return asyncio.run(create())


@pytest.fixture(scope="module")
def processes(folder: Path, key: Key) -> Iterator[dict[str, Server]]:
    """Server processes started on first use (one per variant), all terminated at the end."""
    (folder / "srvapp.py").write_text(APP)
    env = {**os.environ, "PYTHONPATH": str(folder), "KG_URL": f"sqlite:///{folder / 'keys.db'}"}
    running: dict[str, subprocess.Popen[bytes]] = {}

    class Started(dict[str, Server]):
        def __missing__(self, name: str) -> Server:
            variant = VARIANTS[name]
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, *(a.format(port=port) for a in variant.args)],
                cwd=folder,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            running[name] = proc
            server = Server(name, port, variant.client_prefix, variant.http2)
            deadline = time.monotonic() + 30
            while True:
                try:
                    with server.client() as c:
                        c.get("/health", timeout=1)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        pytest.fail(f"{name} did not start")
                    time.sleep(0.1)
            self[name] = server
            return server

    try:
        yield Started()
    finally:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(params=HTTP_VARIANTS)
def server(request: pytest.FixtureRequest, processes: dict[str, Server]) -> Server:
    return processes[request.param]


@pytest.fixture(params=WS_VARIANTS)
def ws_server(request: pytest.FixtureRequest, processes: dict[str, Server]) -> Server:
    return processes[request.param]


def credentials(key: Key) -> dict[str, str]:
    return {"X-IBM-Client-Id": key.client_id, "X-IBM-Client-Secret": key.secret}


def test_exclusion_under_root_path_and_secret_stripped(server: Server) -> None:
    """Under a root path an excluded path answers without a key and never sees the secret."""
    with server.client() as c:
        r = c.get("/health", headers={"X-IBM-Client-Secret": "s"})
    assert r.status_code == 200
    assert r.http_version == ("HTTP/2" if server.http2 else "HTTP/1.1")
    assert r.json() == {"secret": None}


def test_head_refusal_has_no_body_through_the_server(server: Server) -> None:
    """A refused HEAD through a real server: the GET refusal's status and headers (its
    Content-Length too) and no body (granian's HTTP/2 forwarded one, and httpx failed)."""
    with server.client() as c:
        get = c.get("/data")
        head = c.head("/data")
    assert get.status_code == head.status_code == 401
    assert get.json()["moreInformation"] == "Client id missing."
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["www-authenticate"] == get.headers["www-authenticate"]


def test_outer_middleware_sees_the_caller(server: Server, key: Key) -> None:
    """Middleware outside KeyGuard reads the caller from the request's state (set in
    place); the app sees it too, without the secret; a refusal shows no caller."""
    with server.client() as c:
        r = c.get("/data", headers=credentials(key))
        refused = c.get("/data", headers={"X-IBM-Client-Id": key.client_id})
    assert r.status_code == 200
    assert r.json() == {"secret": None, "caller": "Acme"}
    assert r.headers["x-caller"] == "Acme"
    assert refused.status_code == 401
    assert refused.headers["x-caller"] == "-"


@dataclass
class Handshake:
    """What a websocket client saw: an accept and the first text message, an HTTP
    refusal (status and body), or a close (code)."""

    accepted: bool = False
    text: str | None = None
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    close_code: int | None = None


def handshake(server: Server, path: str, headers: dict[str, str]) -> Handshake:
    """Open a websocket to ``path`` with ``headers`` (wsproto over a plain socket)."""
    ws = WSConnection(ConnectionType.CLIENT)
    seen = Handshake()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            ws.send(
                Request(
                    host=f"127.0.0.1:{server.port}",
                    target=server.prefix + path,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers.items()],
                )
            )
        )
        while True:
            chunk = sock.recv(65536)
            ws.receive_data(chunk or None)
            event: Event
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    seen.accepted = True
                elif isinstance(event, TextMessage):
                    seen.text = (seen.text or "") + event.data
                elif isinstance(event, RejectConnection):
                    seen.status = event.status_code
                    seen.headers = {k.lower(): v for k, v in event.headers}
                    if not event.has_body:
                        return seen
                elif isinstance(event, RejectData):
                    seen.body += event.data
                    if event.body_finished:
                        return seen
                elif isinstance(event, CloseConnection):
                    seen.close_code = event.code
                    return seen
            if not chunk:
                return seen


# The servers without the ASGI websocket denial extension: KeyGuard closes the handshake
# before accepting it (1008), and the server turns that into a bare 403. What
# docs/middleware.md's websocket table says.
NO_DENIAL = {"daphne"}


def assert_refused(seen: Handshake, server: Server, message: str) -> None:
    assert not seen.accepted
    assert seen.text is None  # the app never ran
    if server.name in NO_DENIAL:
        assert seen.status == 403
        assert seen.body == b""
    else:
        assert seen.status == 401
        assert seen.headers[b"www-authenticate"] == b'APIKey realm="orders"'
        assert seen.headers[b"content-type"] == b"application/json"
        assert seen.headers[b"cache-control"] == b"no-store"
        assert json.loads(seen.body) == {
            "httpCode": "401",
            "httpMessage": "Unauthorized",
            "moreInformation": message,
        }


def test_websocket_without_a_key_is_refused(ws_server: Server) -> None:
    """A handshake without a client id never reaches the app: KeyGuard's HTTP refusal where
    the server offers the websocket denial extension, else the server's bare 403."""
    assert_refused(handshake(ws_server, "/ws", {}), ws_server, "Client id missing.")


def test_websocket_with_a_wrong_secret_is_refused(ws_server: Server, key: Key) -> None:
    seen = handshake(ws_server, "/ws", {**credentials(key), "X-IBM-Client-Secret": "wrong"})
    assert_refused(seen, ws_server, "Invalid client id or secret.")


def test_websocket_with_a_key_is_accepted(ws_server: Server, key: Key) -> None:
    """With the key the handshake is accepted and the app sees the caller's KeyInfo."""
    seen = handshake(ws_server, "/ws", credentials(key))
    assert seen.accepted
    assert seen.text == "Acme"
