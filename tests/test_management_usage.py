"""The usage routes of the management API (SPEC §5, §10), over traffic sent through KeyGuard.

One app: ``KeyGuard`` in front of a small route, the management API mounted
beside it (excluded from the key check). Requests go through the guard, its
counts are flushed, and the routes answer with SPEC §10's objects; every
answer is checked against the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from keyguard import KeyGuard, KeyManager, KeyStore, management_app
from keyguard.errors import InvalidRequest
from keyguard.models import rfc3339, utcnow
from keyguard.stores.memory import MemoryStore
from keyguard.usage import hour_start
from tests.helpers import CountingStore, record
from tests.test_management import TOKEN, assert_problem, client_for

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"
SECRET = "X-IBM-Client-Secret"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


@pytest.fixture
async def served(store: KeyStore) -> AsyncIterator[tuple[KeyGuard, httpx.AsyncClient]]:
    """The guarded app with the management API at /admin, and a client with the token."""
    inner = Starlette(
        routes=[Route("/", hello), Mount("/admin", management_app(store, token=TOKEN))]
    )
    guard = KeyGuard(inner, store=store, api="orders", exclude_paths=["/admin/*"])
    async with client_for(guard) as http:
        yield guard, http
    await guard.aclose()


async def test_usage_of_an_api_and_of_a_key(
    served: tuple[KeyGuard, httpx.AsyncClient], store: KeyStore
) -> None:
    """Traffic of two keys (one rate-limited to 2/minute) read back per API and per key, with
    every hour of the range and the current hour last; an unused key listed with zeros."""
    guard, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    made = [
        (await http.post("/admin/apis/orders/keys", json=body)).json()
        for body in (
            {"name": "Acme", "kind": "internal"},
            {"name": "Tiny", "kind": "external", "rate_limits": [{"limit": 2, "per": "minute"}]},
            {"name": "Idle", "kind": "external"},
        )
    ]
    acme, tiny, idle = made
    for _ in range(5):
        ok = await http.get("/", headers={ID: acme["client_id"], SECRET: acme["secret"]})
        assert ok.status_code == 200
    statuses = [
        (await http.get("/", headers={ID: tiny["client_id"]})).status_code for _ in range(5)
    ]
    assert statuses == [200, 200, 429, 429, 429]
    assert guard.usage is not None
    await guard.usage.flush()

    response = await http.get("/admin/apis/orders/usage", params={"hours": 3})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["api"] == "orders"
    now = hour_start(utcnow())
    assert [h["start"] for h in body["hours"]] == [
        rfc3339(now - timedelta(hours=n)) for n in (2, 1, 0)
    ]
    assert body["hours"][-1] == {"start": rfc3339(now), "requests": 7, "rate_limited": 3}
    assert [(h["requests"], h["rate_limited"]) for h in body["hours"][:2]] == [(0, 0), (0, 0)]
    assert body["keys"] == [
        {"client_id": acme["client_id"], "name": "Acme", "requests": 5, "rate_limited": 0},
        {"client_id": tiny["client_id"], "name": "Tiny", "requests": 2, "rate_limited": 3},
        {"client_id": idle["client_id"], "name": "Idle", "requests": 0, "rate_limited": 0},
    ]
    default = (await http.get("/admin/apis/orders/usage")).json()
    assert len(default["hours"]) == 24

    one = await http.get(f"/admin/apis/orders/keys/{tiny['client_id']}/usage?hours=1")
    assert one.status_code == 200
    assert one.json() == {
        "client_id": tiny["client_id"],
        "hours": [{"start": rfc3339(now), "requests": 2, "rate_limited": 3}],
    }
    key = (await http.get(f"/admin/apis/orders/keys/{acme['client_id']}")).json()
    assert key["last_used_at"] is not None


@pytest.mark.parametrize("hours", ["0", "841", "-1", "2.5", "abc", "", "\uff11\uff12"])
async def test_a_bad_hours_is_422(served: tuple[KeyGuard, httpx.AsyncClient], hours: str) -> None:
    """hours outside 1..840 or not a whole number: 422 invalid_request, on both routes."""
    _, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    key = (
        await http.post("/admin/apis/orders/keys", json={"name": "A", "kind": "external"})
    ).json()
    for path in ("/admin/apis/orders/usage", f"/admin/apis/orders/keys/{key['client_id']}/usage"):
        assert_problem(
            await http.get(path, params={"hours": hours}), 422, "invalid_request", "hours"
        )


async def test_hours_given_twice_is_422(served: tuple[KeyGuard, httpx.AsyncClient]) -> None:
    """?hours=1&hours=2 is refused rather than one of them picked."""
    _, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    response = await http.get("/admin/apis/orders/usage?hours=1&hours=2")
    assert_problem(response, 422, "invalid_request", "hours")


async def test_an_api_never_created_has_no_usage_and_unknown_keys_are_404(
    served: tuple[KeyGuard, httpx.AsyncClient],
) -> None:
    """An API never created: its usage is an API's with no keys (SPEC §2), key_not_found
    for a key's (SPEC §5: key routes); an unknown key of an existing API: key_not_found;
    no token: 401."""
    _, http = served
    never = await http.get("/admin/apis/nope/usage?hours=2")
    assert never.status_code == 200, never.text
    assert never.json()["keys"] == []
    assert [hour["requests"] for hour in never.json()["hours"]] == [0, 0]
    # A key route, like GET …/keys/{client_id}: an API never created has no such key.
    never = await http.get(f"/admin/apis/nope/keys/{'0' * 32}/usage")
    assert_problem(never, 404, "key_not_found")
    assert_problem(await http.get(f"/admin/apis/nope/keys/{'0' * 32}"), 404, "key_not_found")
    await http.put("/admin/apis/orders", json={"exposed": True})
    missing = await http.get(f"/admin/apis/orders/keys/{'0' * 32}/usage")
    assert_problem(missing, 404, "key_not_found")
    anonymous = await http.get("/admin/apis/orders/usage", headers={"Authorization": ""})
    assert_problem(anonymous, 401, "unauthorized")


async def test_usage_through_the_manager_matches_the_route(
    served: tuple[KeyGuard, httpx.AsyncClient], store: KeyStore
) -> None:
    """The route answers exactly what ``KeyManager.usage`` returns (one definition)."""
    _, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    await http.post("/admin/apis/orders/keys", json={"name": "A", "kind": "external"})
    route = (await http.get("/admin/apis/orders/usage?hours=5")).json()
    assert route == await KeyManager(store).usage("orders", hours=5)


async def test_an_api_usage_a_page_of_keys_at_a_time(
    served: tuple[KeyGuard, httpx.AsyncClient], store: KeyStore
) -> None:
    """?limit / ?after / ?name ask for one page of the API's keys, with ``next``; the
    pages together are the whole listing, and the hours still count every key's traffic."""
    guard, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    made = [
        (await http.post("/admin/apis/orders/keys", json={"name": n, "kind": "external"})).json()
        for n in ("Acme", "Beta", "Acme Labs", "Delta", "Echo")
    ]
    for i, key in enumerate(made):
        for _ in range(i):
            assert (await http.get("/", headers={ID: key["client_id"]})).status_code == 200
    assert guard.usage is not None
    await guard.usage.flush()
    whole = (await http.get("/admin/apis/orders/usage?hours=2")).json()
    assert "next" not in whole
    assert whole["hours"][-1]["requests"] == 10
    seen: list[dict[str, object]] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"hours": 2, "limit": 2}
        if after is not None:
            params["after"] = after
        page = (await http.get("/admin/apis/orders/usage", params=params)).json()
        pages += 1
        assert page["hours"] == whole["hours"]
        assert len(page["keys"]) <= 2
        seen += page["keys"]
        after = page["next"]
        if after is None:
            break
    assert pages == 3
    assert seen == whole["keys"]
    named = (await http.get("/admin/apis/orders/usage", params={"name": "acme"})).json()
    assert [(k["name"], k["requests"]) for k in named["keys"]] == [("Acme", 0), ("Acme Labs", 2)]
    assert named["next"] is None
    assert named["hours"] == (await http.get("/admin/apis/orders/usage")).json()["hours"]


async def test_an_empty_after_or_name_is_not_given_as_in_the_key_listing(
    served: tuple[KeyGuard, httpx.AsyncClient],
) -> None:
    """``?after=`` and ``?name=`` left empty mean what they mean to ``GET …/keys``: not
    given. The first page (not a 422 for a bad cursor), and the whole API (not one page)."""
    _, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    for name in ("Acme", "Beta"):
        await http.post("/admin/apis/orders/keys", json={"name": name, "kind": "external"})
    assert (await http.get("/admin/apis/orders/keys?after=")).status_code == 200
    first = await http.get("/admin/apis/orders/usage?limit=1&after=")
    assert first.status_code == 200
    paged = (await http.get("/admin/apis/orders/usage?limit=1")).json()
    assert (first.json()["keys"], first.json()["next"]) == (paged["keys"], paged["next"])
    unnamed = (await http.get("/admin/apis/orders/usage?name=")).json()
    assert [key["name"] for key in unnamed["keys"]] == ["Acme", "Beta"]
    assert "next" not in unnamed


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=x", "after=not-a-cursor!", "limit=1&limit=2", "x=1"]
)
async def test_a_bad_usage_page_is_422(
    served: tuple[KeyGuard, httpx.AsyncClient], query: str
) -> None:
    """A limit outside 1..1000, a cursor the listing did not give, a parameter twice or an
    unknown one: 422 invalid_request, never a guess."""
    _, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    assert_problem(await http.get(f"/admin/apis/orders/usage?{query}"), 422, "invalid_request")


async def test_a_key_usage_takes_no_page(
    served: tuple[KeyGuard, httpx.AsyncClient], store: KeyStore
) -> None:
    """A key's usage has no keys to page: ?limit there is 422, and so is the manager's."""
    _, http = served
    await http.put("/admin/apis/orders", json={"exposed": True})
    key = (
        await http.post("/admin/apis/orders/keys", json={"name": "A", "kind": "external"})
    ).json()
    path = f"/admin/apis/orders/keys/{key['client_id']}/usage?limit=5"
    assert_problem(await http.get(path), 422, "invalid_request")
    with pytest.raises(InvalidRequest, match="not a key's"):
        await KeyManager(store).usage("orders", key["client_id"], limit=5)


async def test_a_large_api_usage_is_read_a_page_at_a_time() -> None:
    """Every key of a 2,500-key API is listed, read with pages (three of at most 1,000),
    never with one call listing the whole API."""
    inner = MemoryStore()
    counting = CountingStore(inner)
    manager = KeyManager(counting)
    await manager.update_api("big", exposed=True, max_keys_per_kind=5000)
    for i in range(2500):
        await inner.insert_key(record(api="big", name=f"Key {i}", offset=i))
    usage = await manager.usage("big", hours=1)
    assert len(usage["keys"]) == 2500
    assert usage["keys"][0]["name"] == "Key 0"
    assert usage["keys"][-1]["name"] == "Key 2499"
    assert counting.calls["list_keys"] == 0
    assert counting.calls["page_keys"] == 3
