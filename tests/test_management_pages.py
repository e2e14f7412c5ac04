"""``GET /apis/{api}/keys`` a page at a time (SPEC §5): ``?limit=&after=&name=`` and ``next``.

Every answer is also checked against the app's own OpenAPI document (the
``client_for`` hook of ``tests/test_management.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keyguard import KeyStore, MemoryStore, management_app
from keyguard.management import ReadOnly
from tests.test_management import DOCUMENT, TOKEN, assert_problem, client_for, create, expose

pytestmark = pytest.mark.anyio

READER = "r" * 40


@pytest.fixture
async def client(store: KeyStore) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the management API over each kind of store."""
    async with client_for(management_app(store, token=TOKEN)) as opened:
        yield opened


@pytest.fixture
async def memory_client() -> AsyncIterator[httpx.AsyncClient]:
    """A client over a memory store, for what only the HTTP layer decides."""
    async with client_for(management_app(MemoryStore(), token=TOKEN)) as opened:
        yield opened


async def create_many(client: httpx.AsyncClient, count: int, prefix: str = "Key") -> list[str]:
    """Expose ``orders`` with room for ``count`` keys per kind and create ``count`` external
    keys named ``<prefix> <n>``; their client ids, oldest first."""
    await expose(client, max_keys_per_kind=max(count, 5))
    return [
        (await create(client, f"{prefix} {n:03}", kind="external"))["client_id"]
        for n in range(count)
    ]


async def listing(
    client: httpx.AsyncClient, api: str = "orders", **query: object
) -> list[dict[str, Any]]:
    """Every page of ``GET /apis/{api}/keys`` with ``query``, following ``next``."""
    pages: list[dict[str, Any]] = []
    params = {name: str(value) for name, value in query.items()}
    for _ in range(1000):
        response = await client.get(f"/apis/{api}/keys", params=params)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        if pages[-1]["next"] is None:
            return pages
        params["after"] = pages[-1]["next"]
    raise AssertionError("the listing never ended")


async def test_pages_list_every_key_once_oldest_first(client: httpx.AsyncClient) -> None:
    """``limit`` pages through every key once, oldest first; the last page's next is null."""
    ids = await create_many(client, 7)
    pages = await listing(client, limit=3)
    assert [len(page["keys"]) for page in pages] == [3, 3, 1]
    assert [key["client_id"] for page in pages for key in page["keys"]] == ids
    assert all(page["next"] for page in pages[:-1])
    assert pages[-1]["next"] is None


async def test_name_filter_over_the_api(client: httpx.AsyncClient) -> None:
    """``name`` keeps keys whose name contains it in any case, and pages like the rest."""
    await expose(client, max_keys_per_kind=10)
    for name in ("Acme Corp", "Beta", "ACME labs", "Gamma acme", "Delta"):
        await create(client, name, kind="external")
    pages = await listing(client, name="aCmE", limit=2)
    assert [key["name"] for page in pages for key in page["keys"]] == [
        "Acme Corp",
        "ACME labs",
        "Gamma acme",
    ]
    assert await listing(client, name="zzz") == [{"keys": [], "next": None}]


async def test_default_page_is_100(memory_client: httpx.AsyncClient) -> None:
    """Without ``limit`` a page holds 100 keys; ``limit=1000`` takes them all at once."""
    ids = await create_many(memory_client, 130)
    first = (await memory_client.get("/apis/orders/keys")).json()
    assert [key["client_id"] for key in first["keys"]] == ids[:100]
    rest = (await memory_client.get("/apis/orders/keys", params={"after": first["next"]})).json()
    assert [key["client_id"] for key in rest["keys"]] == ids[100:]
    assert rest["next"] is None
    whole = (await memory_client.get("/apis/orders/keys", params={"limit": 1000})).json()
    assert len(whole["keys"]) == 130
    assert whole["next"] is None


async def test_empty_parameters_mean_none(memory_client: httpx.AsyncClient) -> None:
    """``?after=&name=`` (as SPEC §5 writes it) means from the start, unfiltered."""
    ids = await create_many(memory_client, 3)
    body = (await memory_client.get("/apis/orders/keys?limit=100&after=&name=")).json()
    assert [key["client_id"] for key in body["keys"]] == ids


async def test_keys_created_between_pages_come_later(memory_client: httpx.AsyncClient) -> None:
    """A key created while a client pages is on a later page; none repeats."""
    ids = await create_many(memory_client, 4)
    first = (await memory_client.get("/apis/orders/keys", params={"limit": 2})).json()
    newer = (await create(memory_client, "Newer", kind="external"))["client_id"]
    await memory_client.delete(f"/apis/orders/keys/{ids[0]}")
    rest = await listing(memory_client, limit=2, after=first["next"])
    seen = [k["client_id"] for k in first["keys"]] + [
        k["client_id"] for page in rest for k in page["keys"]
    ]
    assert seen == [*ids, newer]


async def test_read_only_token_pages(memory_client: httpx.AsyncClient) -> None:
    """A read-only token lists pages like any other: listing changes nothing."""
    store = MemoryStore()
    app = management_app(store, tokens={"admin": TOKEN, "dash": ReadOnly(READER)})
    async with client_for(app) as admin:
        ids = await create_many(admin, 3)
    async with client_for(app) as reader:
        reader.headers["Authorization"] = f"Bearer {READER}"
        pages = await listing(reader, limit=2)
    assert [key["client_id"] for page in pages for key in page["keys"]] == ids


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=1.5", "limit"),
        ("limit=99999", "limit"),
        ("limit=", "limit"),
        ("limit=2&limit=3", "at most once"),
        ("after=nonsense!", "after"),
        ("after=abc", "after"),
        ("after=MTox", "after"),
        ("after=" + "A" * 65, "after"),
        ("name=" + "n" * 101, "name"),
        ("name=%00", "name"),
        ("name=a&name=b", "at most once"),
        ("before=x", "unknown query parameter"),
    ],
)
async def test_bad_query_is_422(memory_client: httpx.AsyncClient, query: str, detail: str) -> None:
    """A bad ``limit``, ``after`` or ``name``, a repeated or unknown parameter: 422
    ``invalid_request`` saying which, never a 500."""
    await expose(memory_client)
    response = await memory_client.get(f"/apis/orders/keys?{query}")
    assert_problem(response, 422, "invalid_request", detail)


async def test_tampered_cursor_is_422_on_every_store(client: httpx.AsyncClient) -> None:
    """A cursor changed by hand is 422 ``invalid_request`` on every store."""
    await create_many(client, 2)
    first = (await client.get("/apis/orders/keys", params={"limit": 1})).json()
    tampered = first["next"][:-2] + ("A" if first["next"][-2] != "A" else "B") + "*"
    response = await client.get("/apis/orders/keys", params={"after": tampered})
    assert_problem(response, 422, "invalid_request", "after")


def test_document_describes_the_pages() -> None:
    """The OpenAPI document gives ``limit``, ``after`` and ``name`` and the ``next`` member."""
    operation = DOCUMENT["paths"]["/apis/{api}/keys"]["get"]
    query = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
    assert set(query) == {"limit", "after", "name"}
    assert query["limit"]["schema"]["maximum"] == 1000
    assert query["limit"]["schema"]["default"] == 100
    listing_schema = DOCUMENT["components"]["schemas"]["KeyList"]
    assert set(listing_schema["required"]) == {"keys", "next"}
    assert listing_schema["properties"]["next"]["type"] == ["string", "null"]
