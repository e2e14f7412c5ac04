"""The example apps work as their docstrings say: a key opens them, nothing else does."""

from __future__ import annotations

import importlib
from types import ModuleType

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
