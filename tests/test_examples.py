"""The example apps work as their docstrings say: a key opens them, nothing else does."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.anyio


def fresh(module: str) -> ModuleType:
    """A freshly imported example (each import opens its own memory store)."""
    return importlib.reload(importlib.import_module(module))


@pytest.mark.parametrize("module", ["examples.starlette_app", "examples.fastapi_app"])
async def test_example_protects_orders(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On startup the example prints a working curl line; its key opens /orders, no key is a
    401, and /health stays open."""
    monkeypatch.setenv("KEYGUARD_STORE", "memory://")
    example = fresh(module)
    app = example.app
    async with app.router.lifespan_context(app):
        printed = capsys.readouterr().out
        client_id = printed.split("X-IBM-Client-Id: ")[1].split("'")[0]
        secret = printed.split("X-IBM-Client-Secret: ")[1].split("'")[0]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            ok = await c.get(
                "/orders", headers={"X-IBM-Client-Id": client_id, "X-IBM-Client-Secret": secret}
            )
            assert ok.status_code == 200
            assert ok.json()["caller"] == "example"
            denied = await c.get("/orders")
            assert denied.status_code == 401
            assert denied.json()["moreInformation"] == "Client id missing."
            assert (await c.get("/health")).status_code == 200


@asynccontextmanager
async def lifespan_of(app: Any) -> AsyncIterator[None]:
    """Run ``app``'s ASGI lifespan: startup before the block, shutdown after it."""
    incoming: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outgoing: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, incoming.get, outgoing.put))
    await incoming.put({"type": "lifespan.startup"})
    assert (await outgoing.get())["type"] == "lifespan.startup.complete"
    try:
        yield
    finally:
        await incoming.put({"type": "lifespan.shutdown"})
        assert (await outgoing.get())["type"] == "lifespan.shutdown.complete"
        await task


async def test_litestar_example_protects_echo_and_hides_its_routes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Litestar example, its lifespan run through KeyGuard, exposes its API and prints
    a working curl line; without a key an unknown route is a 401, not Litestar's 404; the
    store is closed at shutdown."""
    monkeypatch.setenv("KEYGUARD_STORE", "memory://")
    # A Litestar app sets up logging (a queue handler on the root logger): the app's to
    # keep, the test suite's to undo, or later tests log into a closed capture.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    example = fresh("examples.litestar_app")
    app = example.app
    closed: list[bool] = []

    async def aclose() -> None:
        closed.append(True)

    monkeypatch.setattr(example.store, "aclose", aclose)
    async with lifespan_of(app):
        printed = capsys.readouterr().out
        client_id = printed.split("X-IBM-Client-Id: ")[1].split("'")[0]
        secret = printed.split("X-IBM-Client-Secret: ")[1].split("'")[0]
        key = {"X-IBM-Client-Id": client_id, "X-IBM-Client-Secret": secret}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/echo", headers=key)).json() == {"caller": "example"}
            assert (await c.get("/nowhere")).status_code == 401
            assert (await c.get("/nowhere", headers=key)).status_code == 404
            assert (await c.get("/health")).json() == {"status": "ok"}
    assert closed == [True]


async def test_admin_example_serves_the_console_and_guards_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admin example serves the console at ``/`` to anyone and the JSON API only with the
    token from KEYGUARD_TOKEN; without that variable it refuses to start, saying why."""
    monkeypatch.setenv("KEYGUARD_STORE", "memory://")
    monkeypatch.delenv("KEYGUARD_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="needs KEYGUARD_TOKEN"):
        fresh("examples.admin_app")
    monkeypatch.setenv("KEYGUARD_TOKEN", "example-admin-token-0123456789-abc")
    example = fresh("examples.admin_app")
    app = example.app
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            page = await c.get("/")
            assert page.status_code == 200
            assert "Sharing &amp; keys" in page.text
            assert (await c.get("/apis")).status_code == 401
            signed = {"Authorization": "Bearer example-admin-token-0123456789-abc"}
            created = await c.put("/apis/orders", json={"exposed": True}, headers=signed)
            assert created.status_code == 200
            assert (await c.get("/apis", headers=signed)).json()["apis"][0]["name"] == "orders"


def test_prometheus_example_serves_keyguard_metrics(tmp_path: Path) -> None:
    """The Prometheus example, run under uvicorn (it sets the process's global meter
    provider, hence a process of its own), counts its requests by outcome and serves them
    at /metrics without a key: ``keyguard_requests_total`` for the admitted call and the
    refused one, and the store's duration histogram in seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    root = Path(__file__).parent.parent
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--port", str(port), "examples.prometheus_app:app"],
            cwd=root,
            env={**os.environ, "KEYGUARD_STORE": "memory://"},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        printed = ""
        while "X-IBM-Client-Secret: " not in printed:
            line = proc.stdout.readline()
            assert line, f"the example stopped: {log.read_text()}"
            printed += line
        found = re.search(r"X-IBM-Client-Id: (\S+)' -H 'X-IBM-Client-Secret: (\S+)'", printed)
        assert found is not None, printed
        key = {"X-IBM-Client-Id": found[1], "X-IBM-Client-Secret": found[2]}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/orders", headers=key).json()["caller"] == "example"
            assert c.get("/orders").status_code == 401
            scraped = c.get("/metrics")
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert scraped.status_code == 200
    text = scraped.text
    for outcome in ("admitted", "client_id_missing"):
        sample = re.search(
            rf'^keyguard_requests_total{{[^}}]*outcome="{outcome}"[^}}]*}} (\S+)$',
            text,
            re.MULTILINE,
        )
        assert sample is not None, text
        assert 'api="orders"' in sample[0]
        assert float(sample[1]) == 1.0
    assert re.search(r'^keyguard_store_duration_seconds_count{[^}]*operation="lookup"', text, re.M)
    assert found[1] not in text
    assert found[2] not in text
