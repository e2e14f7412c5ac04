"""The request path through real server processes (uvicorn, hypercorn): root paths, HEAD
refusals and state seen by outer middleware (issue 12)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

APP = """
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from keyguard import KeyGuard, MemoryStore

async def health(request: Request) -> JSONResponse:
    return JSONResponse({"secret": request.headers.get("x-ibm-client-secret")})

guarded = KeyGuard(Starlette(routes=[Route("/health", health), Route("/data", health)]),
                   store=MemoryStore(), api="orders", exclude_paths=["/health"])
app = guarded
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The path a client sends: uvicorn prepends --root-path to it (a proxy has stripped the
# prefix), hypercorn expects it in the request path.
CLIENT_PREFIX = {"uvicorn": "", "hypercorn": "/prefix"}

SERVERS = {
    "uvicorn": [
        "-m",
        "uvicorn",
        "--port",
        "{port}",
        "--host",
        "127.0.0.1",
        "--root-path",
        "/prefix",
        "srvapp:app",
    ],
    "hypercorn": [
        "-m",
        "hypercorn",
        "--bind",
        "127.0.0.1:{port}",
        "--root-path",
        "/prefix",
        "srvapp:app",
    ],
}


@pytest.fixture(scope="module", params=sorted(SERVERS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real server process on a free loopback port, serving the app under /prefix."""
    folder: Path = tmp_path_factory.mktemp("srv")
    (folder / "srvapp.py").write_text(APP)
    port = free_port()
    args = [a.format(port=port) for a in SERVERS[request.param]]
    env = {**os.environ, "PYTHONPATH": str(folder)}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=folder,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}{CLIENT_PREFIX[request.param]}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"{request.param} did not start")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def test_exclusion_under_root_path_and_secret_stripped(server: str) -> None:
    """Under --root-path an excluded path answers without a key and never sees the secret."""
    r = httpx.get(server + "/health", headers={"X-IBM-Client-Secret": "s"})
    assert r.status_code == 200
    assert r.json() == {"secret": None}


def test_head_refusal_has_no_body_through_the_server(server: str) -> None:
    """A refused HEAD through a real server: the refusal's status and no body."""
    r = httpx.head(server + "/data")
    assert r.status_code == 404  # the API was never exposed
    assert r.content == b""
