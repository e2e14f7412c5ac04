"""Litestar behind KeyGuard wrapped at the ASGI level: nothing about its routes shows without
a key (issue 12, item 10)."""

from __future__ import annotations

from typing import cast

import httpx
import pytest
from litestar import Litestar, get
from starlette.types import ASGIApp

from keyguard import KeyGuard, KeyManager, MemoryStore

pytestmark = pytest.mark.anyio


@get("/echo")
async def echo() -> dict[str, str]:
    return {"ok": "yes"}


async def test_wrapped_litestar_hides_its_routes_without_a_key() -> None:
    """An unknown route and a wrong method answer 401 without a key, not 404/405; with a
    key the app answers as usual."""
    store = MemoryStore()
    manager = KeyManager(store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    app = KeyGuard(cast("ASGIApp", Litestar(route_handlers=[echo])), store=store, api="orders")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/no-such-route")).status_code == 401
        assert (await c.request("DELETE", "/echo")).status_code == 401
        head = await c.head("/echo")
        assert head.status_code == 401
        assert head.content == b""
        headers = {"X-IBM-Client-Id": key.client_id}
        assert (await c.get("/echo", headers=headers)).json() == {"ok": "yes"}
        assert (await c.get("/no-such-route", headers=headers)).status_code == 404
