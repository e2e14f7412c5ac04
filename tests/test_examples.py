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
