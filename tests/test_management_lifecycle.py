"""The key lifecycle through the management HTTP API (SPEC §5, §8, §9's limits as data).

The lifecycle fields in key and API JSON, ``POST …/keys`` with them,
``PATCH …/keys/{client_id}``, ``PUT …/secret`` with a grace period and
``PUT /apis/{api}`` with rate limits; and that what the API changes is what a
``KeyGuard`` over the same store then does. Every answer is checked against
the app's OpenAPI document (``client_for`` of ``test_management``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyInfo, KeyStore, MemoryStore, management_app
from keyguard.models import MAX_META_BYTES, MAX_META_DEPTH, thaw, utcnow
from tests.test_management import (
    DOCUMENT,
    TOKEN,
    assert_problem,
    client_for,
    create,
    expose,
)

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"
SECRET = "X-IBM-Client-Secret"
DAY = 86400
HOURLY = {"limit": 3, "per": "hour"}
THIRTY_DAYS = 30 * DAY


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


def parse_time(text: str) -> datetime:
    """An RFC 3339 UTC time as the API writes it (``…Z``)."""
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text[:-1] + "+00:00")


async def patch(
    client: httpx.AsyncClient, key: dict[str, Any], body: object, api: str = "orders"
) -> httpx.Response:
    return await client.patch(f"/apis/{api}/keys/{key['client_id']}", json=body)


async def fetch(client: httpx.AsyncClient, key: dict[str, Any]) -> dict[str, Any]:
    response = await client.get(f"/apis/orders/keys/{key['client_id']}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def public(key: dict[str, Any]) -> dict[str, Any]:
    """A created key's JSON without its one-time ``secret``."""
    return {name: value for name, value in key.items() if name != "secret"}


# -- the JSON of keys and APIs ----------------------------------------------------------------


async def test_new_key_shows_every_lifecycle_field_with_its_default(
    client: httpx.AsyncClient,
) -> None:
    """A key created with only name and kind shows SPEC §5's fields with §8's defaults."""
    await expose(client)
    key = await create(client, "Acme", "external")
    assert list(key) == [
        "client_id",
        "name",
        "kind",
        "has_secret",
        "created_at",
        "enabled",
        "expires_at",
        "meta",
        "last_used_at",
        "previous_secret_expires_at",
        "rate_limits",
        "secret",
    ]
    assert {name: key[name] for name in list(key)[5:]} == {
        "enabled": True,
        "expires_at": None,
        "meta": {},
        "last_used_at": None,
        "previous_secret_expires_at": None,
        "rate_limits": None,
        "secret": None,
    }
    assert await fetch(client, key) == public(key)


async def test_create_key_with_every_lifecycle_field(client: httpx.AsyncClient) -> None:
    """``POST …/keys`` takes expires_at (stored in UTC), enabled, meta and rate_limits."""
    await expose(client)
    response = await client.post(
        "/apis/orders/keys",
        json={
            "name": "Acme",
            "kind": "internal",
            "expires_at": "2031-01-02T03:04:05.5+02:00",
            "enabled": False,
            "meta": {"plan": "gold", "ids": [1, 2], "nested": {"a": None}, "ü": "✓"},
            "rate_limits": [{"limit": 10, "per": "second"}, {"limit": 1000, "per": "day"}],
        },
    )
    assert response.status_code == 201, response.text
    key = response.json()
    assert key["expires_at"] == "2031-01-02T01:04:05.500000Z"
    assert key["enabled"] is False
    assert key["meta"] == {"plan": "gold", "ids": [1, 2], "nested": {"a": None}, "ü": "✓"}
    assert key["rate_limits"] == [{"limit": 10, "per": "second"}, {"limit": 1000, "per": "day"}]
    assert isinstance(key["secret"], str)
    assert await fetch(client, key) == public(key)
    listed = (await client.get("/apis/orders/keys")).json()["keys"]
    assert listed == [public(key)]


async def test_create_key_with_null_expiry_and_rate_limits_takes_the_defaults(
    memory_client: httpx.AsyncClient,
) -> None:
    """``expires_at: null`` is "never" and ``rate_limits: null`` "the API's", at creation too;
    ``rate_limits: []`` is the key's own "unlimited"."""
    await expose(memory_client)
    response = await memory_client.post(
        "/apis/orders/keys",
        json={"name": "Acme", "kind": "external", "expires_at": None, "rate_limits": None},
    )
    assert response.status_code == 201, response.text
    assert (response.json()["expires_at"], response.json()["rate_limits"]) == (None, None)
    response = await memory_client.post(
        "/apis/orders/keys", json={"name": "Globex", "kind": "external", "rate_limits": []}
    )
    assert response.json()["rate_limits"] == []


_TOO_BIG_META = {"blob": "x" * (MAX_META_BYTES - len('{"blob":""}') + 1)}
_BIGGEST_META = {"blob": "x" * (MAX_META_BYTES - len('{"blob":""}'))}


def _nested_meta(levels: int) -> dict[str, object]:
    """A meta of ``levels`` levels: the top object, then arrays inside one another."""
    inner: object = 1
    for _ in range(levels - 1):
        inner = [inner]
    return {"a": inner}


_BAD_LIFECYCLE_FIELDS: list[tuple[str, dict[str, object], str]] = [
    ("time-without-zone", {"expires_at": "2031-01-02T03:04:05"}, "expires_at"),
    ("date-only", {"expires_at": "2031-01-02"}, "expires_at"),
    ("time-not-a-date", {"expires_at": "2031-02-30T00:00:00Z"}, "expires_at"),
    ("time-a-number", {"expires_at": 1924992000}, "expires_at"),
    ("time-out-of-range", {"expires_at": "9999-12-31T23:59:59-01:00"}, "expires_at"),
    ("enabled-string", {"enabled": "false"}, "enabled"),
    ("enabled-null", {"enabled": None}, "enabled"),
    ("meta-array", {"meta": [1, 2]}, "meta"),
    ("meta-string", {"meta": '{"plan": "gold"}'}, "meta"),
    ("meta-null", {"meta": None}, "meta"),
    ("meta-too-big", {"meta": _TOO_BIG_META}, f"at most {MAX_META_BYTES} bytes"),
    ("meta-lone-surrogate", {"meta": {"plan": "\ud800"}}, "meta"),
    ("meta-too-deep", {"meta": _nested_meta(MAX_META_DEPTH + 1)}, "meta must nest at most"),
    # Small enough for the body, deep enough that reading it back once ran out of stack (500).
    ("meta-far-too-deep", {"meta": _nested_meta(600)}, "meta must nest at most"),
    ("limits-object", {"rate_limits": {"limit": 1, "per": "second"}}, "rate_limits"),
    ("limits-shorthand", {"rate_limits": ["100/minute"]}, "rate_limits"),
    ("limits-zero", {"rate_limits": [{"limit": 0, "per": "second"}]}, "rate_limits"),
    ("limits-fraction", {"rate_limits": [{"limit": 1.5, "per": "second"}]}, "rate_limits"),
    ("limits-bool", {"rate_limits": [{"limit": True, "per": "second"}]}, "rate_limits"),
    ("limits-week", {"rate_limits": [{"limit": 1, "per": "week"}]}, "rate_limits"),
    (
        "limits-extra-member",
        {"rate_limits": [{"limit": 1, "per": "second", "burst": 2}]},
        "rate_limits",
    ),
    ("limits-five", {"rate_limits": [{"limit": n, "per": "day"} for n in range(1, 6)]}, "at most"),
]


@pytest.mark.parametrize(
    ("fields", "detail"),
    [(fields, detail) for _, fields, detail in _BAD_LIFECYCLE_FIELDS],
    ids=[case for case, _, _ in _BAD_LIFECYCLE_FIELDS],
)
async def test_invalid_lifecycle_field_at_creation_is_422(
    memory_client: httpx.AsyncClient, fields: dict[str, object], detail: str
) -> None:
    """Each invalid lifecycle field of ``POST …/keys`` is 422 naming it; no key is made."""
    await expose(memory_client)
    # Sent as text: httpx's own encoder would refuse a lone surrogate.
    body = json.dumps({"name": "Acme", "kind": "external", **fields})
    response = await memory_client.post(
        "/apis/orders/keys", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 422, "invalid_request", detail)
    assert (await memory_client.get("/apis/orders/keys")).json() == {"keys": [], "next": None}


async def test_meta_of_exactly_4096_bytes_is_accepted(memory_client: httpx.AsyncClient) -> None:
    """The limit is inclusive: a meta of 4,096 bytes as compact JSON is kept whole."""
    await expose(memory_client)
    response = await memory_client.post(
        "/apis/orders/keys", json={"name": "Acme", "kind": "external", "meta": _BIGGEST_META}
    )
    assert response.status_code == 201, response.text
    assert response.json()["meta"] == _BIGGEST_META


async def test_meta_of_the_deepest_nesting_is_accepted(memory_client: httpx.AsyncClient) -> None:
    """The nesting limit is inclusive: a meta of exactly MAX_META_DEPTH levels is kept whole."""
    await expose(memory_client)
    meta = _nested_meta(MAX_META_DEPTH)
    response = await memory_client.post(
        "/apis/orders/keys", json={"name": "Acme", "kind": "external", "meta": meta}
    )
    assert response.status_code == 201, response.text
    assert response.json()["meta"] == meta


async def test_integer_valued_float_limit_is_an_integer(memory_client: httpx.AsyncClient) -> None:
    """JSON has one number type: a limit of 5.0 is the limit 5 (as in JSON Schema)."""
    await expose(memory_client)
    response = await memory_client.post(
        "/apis/orders/keys",
        content=b'{"name": "Acme", "kind": "external", '
        b'"rate_limits": [{"limit": 5.0, "per": "minute"}]}',
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["rate_limits"] == [{"limit": 5, "per": "minute"}]


# -- PATCH …/keys/{client_id} -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["internal", "external"])
async def test_patch_changes_each_field_and_only_it(client: httpx.AsyncClient, kind: str) -> None:
    """R11: on either kind, each PATCH changes exactly the fields it names (never the kind,
    the client id or whether it has a secret)."""
    await expose(client)
    key = public(await create(client, "Acme", kind))
    steps: list[tuple[dict[str, object], dict[str, object]]] = [
        ({"name": "  Acme Corp  "}, {"name": "Acme Corp"}),
        ({"enabled": False}, {"enabled": False}),
        ({"expires_at": "2031-06-01T12:00:00Z"}, {"expires_at": "2031-06-01T12:00:00Z"}),
        ({"meta": {"plan": "gold", "seats": 5}}, {"meta": {"plan": "gold", "seats": 5}}),
        ({"meta": {"tier": 2}}, {"meta": {"tier": 2}}),  # replaced as a whole, not merged
        ({"rate_limits": [{"limit": 3, "per": "hour"}]}, {"rate_limits": [HOURLY]}),
        ({"rate_limits": []}, {"rate_limits": []}),
        ({"rate_limits": None}, {"rate_limits": None}),
        ({"expires_at": None}, {"expires_at": None}),
        ({"meta": {}}, {"meta": {}}),
        ({"enabled": True, "name": "Acme"}, {"enabled": True, "name": "Acme"}),
    ]
    for body, changed in steps:
        response = await patch(client, key, body)
        assert response.status_code == 200, (body, response.text)
        key = {**key, **changed}
        assert response.json() == key, body
        assert await fetch(client, key) == key, body
    assert key["client_id"] == response.json()["client_id"]


async def test_patch_with_an_empty_object_changes_nothing(client: httpx.AsyncClient) -> None:
    """``{}`` is 200 with the key as it was."""
    await expose(client)
    key = await create(client, "Acme", "external")
    await patch(client, key, {"meta": {"plan": "gold"}, "enabled": False})
    before = await fetch(client, key)
    response = await patch(client, key, {})
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == before
    assert await fetch(client, key) == before


async def test_patch_rename_clash_is_409(client: httpx.AsyncClient) -> None:
    """R3 on rename: another key's name, ignoring case, is 409 ``duplicate_name``; the key
    keeps its name. Its own name in another case is no clash."""
    await expose(client)
    await create(client, "Acme", "internal")
    other = await create(client, "Globex", "external")
    response = await patch(client, other, {"name": "ACME", "enabled": False})
    assert_problem(response, 409, "duplicate_name")
    fetched = await fetch(client, other)
    assert (fetched["name"], fetched["enabled"]) == ("Globex", True)
    response = await patch(client, other, {"name": "GLOBEX"})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "GLOBEX"


async def test_patch_of_an_unknown_key_is_404(client: httpx.AsyncClient) -> None:
    """No such key, in a known API or one never created: 404 ``key_not_found``."""
    await expose(client)
    ghost = {"client_id": "0" * 32}
    assert_problem(await patch(client, ghost, {"enabled": False}), 404, "key_not_found")
    assert_problem(await patch(client, ghost, {}, api="never"), 404, "key_not_found")
    key = await create(client, "Acme", "external")
    await client.delete(f"/apis/orders/keys/{key['client_id']}")
    assert_problem(await patch(client, key, {"name": "Back"}), 404, "key_not_found")


_BAD_PATCH_BODIES: list[tuple[str, object, str]] = [
    ("unknown-field", {"enabled": False, "kind": "internal"}, "kind"),
    ("client-id", {"client_id": "x"}, "client_id"),
    ("secret", {"secret": "chosen"}, "secret"),
    ("name-null", {"name": None}, "name"),
    ("name-blank", {"name": "   "}, "name"),
    ("name-too-long", {"name": "x" * 101}, "name"),
    ("array", [{"enabled": False}], "JSON object"),
    *[(case, fields, detail) for case, fields, detail in _BAD_LIFECYCLE_FIELDS],
]


@pytest.mark.parametrize(
    ("body", "detail"),
    [(body, detail) for _, body, detail in _BAD_PATCH_BODIES],
    ids=[case for case, _, _ in _BAD_PATCH_BODIES],
)
async def test_invalid_patch_body_is_422_and_changes_nothing(
    memory_client: httpx.AsyncClient, body: object, detail: str
) -> None:
    """Each invalid ``PATCH`` body is 422 naming what is wrong; the key is unchanged."""
    await expose(memory_client)
    key = await create(memory_client, "Acme", "external")
    before = await fetch(memory_client, key)
    response = await memory_client.patch(
        f"/apis/orders/keys/{key['client_id']}",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    assert_problem(response, 422, "invalid_request", detail)
    assert await fetch(memory_client, key) == before


async def test_patch_needs_a_body(memory_client: httpx.AsyncClient) -> None:
    """A PATCH without a body is 422 (``{}`` is the way to change nothing)."""
    await expose(memory_client)
    key = await create(memory_client, "Acme", "external")
    response = await memory_client.patch(f"/apis/orders/keys/{key['client_id']}")
    assert_problem(response, 422, "invalid_request", "JSON object")


async def test_patch_takes_merge_patch_json(memory_client: httpx.AsyncClient) -> None:
    """``application/merge-patch+json`` (what the body is, but for meta's whole replacement)
    is accepted like ``application/json``."""
    await expose(memory_client)
    key = await create(memory_client, "Acme", "external")
    response = await memory_client.patch(
        f"/apis/orders/keys/{key['client_id']}",
        content=b'{"expires_at": "2030-01-01T00:00:00+00:00"}',
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["expires_at"] == "2030-01-01T00:00:00Z"


# -- PUT …/secret with a grace period ---------------------------------------------------------


@pytest.mark.parametrize("body", [None, {}, {"grace_seconds": 0}], ids=["none", "empty", "zero"])
async def test_roll_without_grace_replaces_at_once(
    client: httpx.AsyncClient, body: dict[str, int] | None
) -> None:
    """No body, ``{}`` or 0 seconds: ``previous_secret_expires_at`` is null."""
    await expose(client)
    key = await create(client, "Globex", "external")
    path = f"/apis/orders/keys/{key['client_id']}/secret"
    await client.put(path)
    response = await client.put(path, json=body) if body is not None else await client.put(path)
    assert response.status_code == 200, response.text
    assert response.json()["previous_secret_expires_at"] is None
    assert (await fetch(client, key))["previous_secret_expires_at"] is None


async def test_grace_on_a_key_without_a_secret_keeps_nothing(client: httpx.AsyncClient) -> None:
    """The first secret of an external key has no previous one to keep, grace or not."""
    await expose(client)
    key = await create(client, "Globex", "external")
    response = await client.put(
        f"/apis/orders/keys/{key['client_id']}/secret", json={"grace_seconds": DAY}
    )
    assert response.status_code == 200, response.text
    assert response.json()["previous_secret_expires_at"] is None


@pytest.mark.parametrize(
    ("grace", "detail"),
    [
        (THIRTY_DAYS + 1, "between 0 and 2592000"),
        (-1, "between 0 and 2592000"),
        (1.5, "whole number"),
        ("1h", "whole number"),
        (True, "whole number"),
        (None, "null"),
    ],
    ids=["over-30-days", "negative", "fraction", "text", "bool", "null"],
)
async def test_invalid_grace_is_422_and_keeps_the_secret(
    memory_client: httpx.AsyncClient, grace: object, detail: str
) -> None:
    """A grace over 30 days, negative or not a whole number is 422 naming grace_seconds."""
    await expose(memory_client)
    key = await create(memory_client, "Globex", "external")
    path = f"/apis/orders/keys/{key['client_id']}/secret"
    await memory_client.put(path)
    response = await memory_client.put(path, json={"grace_seconds": grace})
    problem = assert_problem(response, 422, "invalid_request", detail)
    assert "grace_seconds" in problem["detail"]
    assert (await fetch(memory_client, key))["previous_secret_expires_at"] is None


async def test_grace_of_exactly_30_days_is_accepted(memory_client: httpx.AsyncClient) -> None:
    """2,592,000 seconds (30 days) is the longest grace, inclusive."""
    await expose(memory_client)
    key = await create(memory_client, "Globex", "external")
    path = f"/apis/orders/keys/{key['client_id']}/secret"
    await memory_client.put(path)
    before = utcnow()
    response = await memory_client.put(path, json={"grace_seconds": float(THIRTY_DAYS)})
    assert response.status_code == 200, response.text
    until = parse_time(response.json()["previous_secret_expires_at"])
    assert until >= before + timedelta(days=30)


@pytest.mark.parametrize("grace", [None, {}, {"grace_seconds": DAY}], ids=["none", "empty", "day"])
async def test_internal_key_secret_is_409_key_immutable(
    client: httpx.AsyncClient, grace: dict[str, int] | None
) -> None:
    """R4: an internal key cannot roll, with or without a grace period."""
    await expose(client)
    key = await create(client, "Acme", "internal")
    path = f"/apis/orders/keys/{key['client_id']}/secret"
    response = await client.put(path, json=grace) if grace is not None else await client.put(path)
    assert_problem(response, 409, "key_immutable")


# -- what KeyGuard does with it -----------------------------------------------------------------


async def whoami(request: Request) -> JSONResponse:
    info: KeyInfo = request.state.keyguard
    return JSONResponse({"name": info.name, "meta": thaw(info.meta)})


@dataclass
class Apps:
    """The management API and an app behind KeyGuard, two apps over one store."""

    admin: httpx.AsyncClient
    guarded: httpx.AsyncClient

    async def call(self, client_id: str, secret: str | None = None) -> httpx.Response:
        """``GET /whoami`` through KeyGuard with these credentials."""
        headers = {ID: client_id} if secret is None else {ID: client_id, SECRET: secret}
        return await self.guarded.get("/whoami", headers=headers)


@pytest.fixture
async def apps(store: KeyStore) -> AsyncIterator[Apps]:
    """``/whoami`` behind KeyGuard for API ``orders``, and the management API, on ``store``."""
    guarded = Starlette(routes=[Route("/whoami", whoami)])
    guarded.add_middleware(KeyGuard, store=store, api="orders")
    async with (
        client_for(management_app(store, token=TOKEN)) as admin,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=guarded), base_url="http://testserver"
        ) as app_client,
    ):
        yield Apps(admin, app_client)


def assert_refused(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["moreInformation"] == message


async def test_rolled_secret_keeps_the_previous_one_during_grace(apps: Apps) -> None:
    """With ``grace_seconds`` the replaced secret still authenticates through KeyGuard, both
    secrets do, and the answer's ``previous_secret_expires_at`` is the key's; rolling again
    without grace ends it at once."""
    await expose(apps.admin)
    key = await create(apps.admin, "Globex", "external")
    client_id = key["client_id"]
    path = f"/apis/orders/keys/{client_id}/secret"
    first = (await apps.admin.put(path)).json()["secret"]
    assert (await apps.call(client_id, first)).status_code == 200

    before = utcnow()
    response = await apps.admin.put(path, json={"grace_seconds": 3600})
    after = utcnow()
    assert response.status_code == 200, response.text
    rolled = response.json()
    assert set(rolled) == {"client_id", "secret", "previous_secret_expires_at"}
    assert rolled["client_id"] == client_id
    until = parse_time(rolled["previous_secret_expires_at"])
    assert before + timedelta(seconds=3600) <= until <= after + timedelta(seconds=3600)
    fetched = await fetch(apps.admin, key)
    assert fetched["previous_secret_expires_at"] == rolled["previous_secret_expires_at"]

    assert (await apps.call(client_id, first)).status_code == 200
    assert (await apps.call(client_id, rolled["secret"])).status_code == 200
    assert_refused(await apps.call(client_id, "wrong"), "Invalid client id or secret.")

    third = (await apps.admin.put(path)).json()
    assert third["previous_secret_expires_at"] is None
    assert (await fetch(apps.admin, key))["previous_secret_expires_at"] is None
    for old in (first, rolled["secret"]):
        assert_refused(await apps.call(client_id, old), "Invalid client id or secret.")
    assert (await apps.call(client_id, third["secret"])).status_code == 200


async def test_rolling_twice_in_grace_keeps_only_the_last_previous(apps: Apps) -> None:
    """Only one previous secret is kept: a second roll during a grace period drops the oldest."""
    await expose(apps.admin)
    key = await create(apps.admin, "Globex", "external")
    client_id = key["client_id"]
    path = f"/apis/orders/keys/{client_id}/secret"
    oldest = (await apps.admin.put(path)).json()["secret"]
    middle = (await apps.admin.put(path, json={"grace_seconds": DAY})).json()["secret"]
    newest = (await apps.admin.put(path, json={"grace_seconds": DAY})).json()["secret"]
    assert_refused(await apps.call(client_id, oldest), "Invalid client id or secret.")
    assert (await apps.call(client_id, middle)).status_code == 200
    assert (await apps.call(client_id, newest)).status_code == 200


async def test_patch_disabled_refuses_the_next_request(apps: Apps) -> None:
    """PATCH ``enabled: false``: the very next request is 401 "Client id disabled."; enabling
    it again lets it in, with its secret unchanged."""
    await expose(apps.admin)
    key = await create(apps.admin, "Acme", "internal")
    client_id, secret = key["client_id"], key["secret"]
    assert (await apps.call(client_id, secret)).status_code == 200
    assert (await patch(apps.admin, key, {"enabled": False})).status_code == 200
    assert_refused(await apps.call(client_id, secret), "Client id disabled.")
    # The state is told only to someone holding the credentials.
    assert_refused(await apps.call(client_id, "wrong"), "Invalid client id or secret.")
    assert (await patch(apps.admin, key, {"enabled": True})).status_code == 200
    assert (await apps.call(client_id, secret)).status_code == 200


async def test_expiry_in_the_past_refuses_the_next_request(apps: Apps) -> None:
    """An ``expires_at`` in the past (allowed) is 401 "Client id expired." from the next
    request; clearing it (null) lets the key in again."""
    await expose(apps.admin)
    key = await create(apps.admin, "Globex", "external")
    assert (await apps.call(key["client_id"])).status_code == 200
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    response = await patch(apps.admin, key, {"expires_at": past})
    assert response.status_code == 200, response.text
    assert_refused(await apps.call(key["client_id"]), "Client id expired.")
    assert (await patch(apps.admin, key, {"expires_at": None})).status_code == 200
    assert (await apps.call(key["client_id"])).status_code == 200


async def test_keys_created_expired_or_disabled_admit_nothing(apps: Apps) -> None:
    """The same two refusals for keys created that way through ``POST …/keys``."""
    await expose(apps.admin)
    response = await apps.admin.post(
        "/apis/orders/keys",
        json={"name": "Old", "kind": "external", "expires_at": "2001-01-01T00:00:00Z"},
    )
    assert_refused(await apps.call(response.json()["client_id"]), "Client id expired.")
    response = await apps.admin.post(
        "/apis/orders/keys", json={"name": "Off", "kind": "external", "enabled": False}
    )
    assert_refused(await apps.call(response.json()["client_id"]), "Client id disabled.")


async def test_meta_set_through_the_api_reaches_the_app(apps: Apps) -> None:
    """``meta`` given at creation and replaced by PATCH is what the app sees."""
    await expose(apps.admin)
    response = await apps.admin.post(
        "/apis/orders/keys",
        json={"name": "Acme", "kind": "external", "meta": {"customer": 42}},
    )
    key = response.json()
    seen = (await apps.call(key["client_id"])).json()
    assert seen == {"name": "Acme", "meta": {"customer": 42}}
    await patch(apps.admin, key, {"meta": {"plan": ["gold"]}, "name": "Acme Corp"})
    seen = (await apps.call(key["client_id"])).json()
    assert seen == {"name": "Acme Corp", "meta": {"plan": ["gold"]}}


# -- PUT /apis/{api} with rate limits ---------------------------------------------------------


async def test_api_rate_limits_are_set_kept_and_cleared(client: httpx.AsyncClient) -> None:
    """``rate_limits`` of ``PUT /apis/{api}`` replaces the API's list; other fields stay; []
    clears it."""
    await expose(client)
    limits = [{"limit": 100, "per": "minute"}, {"limit": 5, "per": "second"}]
    response = await client.put("/apis/orders", json={"rate_limits": limits})
    assert response.status_code == 200, response.text
    assert response.json()["rate_limits"] == limits
    assert response.json()["exposed"] is True
    response = await client.put("/apis/orders", json={"max_keys_per_kind": 3})
    assert response.json()["rate_limits"] == limits
    assert (await client.get("/apis/orders")).json()["rate_limits"] == limits
    assert (await client.get("/apis")).json()["apis"][0]["rate_limits"] == limits
    response = await client.put("/apis/orders", json={"rate_limits": []})
    assert response.json()["rate_limits"] == []


async def test_new_api_with_rate_limits(memory_client: httpx.AsyncClient) -> None:
    """A PUT that creates the API may give its limits at once."""
    response = await memory_client.put(
        "/apis/orders", json={"rate_limits": [{"limit": 1, "per": "day"}]}
    )
    assert response.json()["rate_limits"] == [{"limit": 1, "per": "day"}]
    assert response.json()["exposed"] is False


@pytest.mark.parametrize(
    "limits",
    [
        None,
        [{"limit": 0, "per": "minute"}],
        ["100/minute"],
        [{"limit": n, "per": "day"} for n in range(1, 6)],
        {"limit": 1, "per": "day"},
    ],
    ids=["null", "zero", "shorthand", "five", "object"],
)
async def test_invalid_api_rate_limits_are_422(
    memory_client: httpx.AsyncClient, limits: object
) -> None:
    """An API's rate limits are a list of up to four ``{"limit", "per"}``; never null."""
    await expose(memory_client)
    response = await memory_client.put("/apis/orders", json={"rate_limits": limits})
    assert_problem(response, 422, "invalid_request", "rate_limits")
    assert (await memory_client.get("/apis/orders")).json()["rate_limits"] == []


# -- the OpenAPI document ---------------------------------------------------------------------


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = DOCUMENT["components"]["schemas"][name]
    return schema


def test_document_describes_the_patch_route() -> None:
    """``PATCH …/keys/{client_id}`` takes a closed ``KeyUpdate`` and answers a Key or the
    errors it can send."""
    operation = DOCUMENT["paths"]["/apis/{api}/keys/{client_id}"]["patch"]
    body = operation["requestBody"]
    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KeyUpdate"
    }
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Key"
    }
    assert {"401", "404", "409", "413", "415", "422", "503"} <= set(operation["responses"])
    update = _schema("KeyUpdate")
    assert update["additionalProperties"] is False
    assert "required" not in update
    assert set(update["properties"]) == {"name", "enabled", "expires_at", "meta", "rate_limits"}


def test_document_describes_every_lifecycle_field() -> None:
    """Times are date-time (nullable where null means something), limits are bounded and
    closed, and the grace period is bounded by 30 days."""
    key = _schema("Key")["properties"]
    for name in ("expires_at", "last_used_at", "previous_secret_expires_at"):
        assert key[name]["format"] == "date-time"
        assert key[name]["type"] == ["string", "null"]
    assert set(_schema("Key")["required"]) >= {
        "enabled",
        "expires_at",
        "meta",
        "last_used_at",
        "previous_secret_expires_at",
        "rate_limits",
    }
    for schema in ("KeyCreate", "KeyUpdate"):
        properties = _schema(schema)["properties"]
        assert properties["expires_at"]["format"] == "date-time"
        assert properties["meta"]["type"] == "object"
        assert "4096 bytes" in properties["meta"]["description"]
    assert _schema("RateLimits")["maxItems"] == 4
    rate_limit = _schema("RateLimit")
    assert rate_limit["additionalProperties"] is False
    assert rate_limit["properties"]["limit"]["minimum"] == 1
    assert rate_limit["properties"]["per"]["enum"] == ["second", "minute", "hour", "day"]
    assert "rate_limits" in _schema("Api")["required"]
    assert "rate_limits" in _schema("ApiUpdate")["properties"]
    grace = _schema("SecretRequest")
    assert grace["additionalProperties"] is False
    assert grace["properties"]["grace_seconds"] == {
        **grace["properties"]["grace_seconds"],
        "type": "integer",
        "minimum": 0,
        "maximum": THIRTY_DAYS,
    }
    assert set(_schema("Secret")["required"]) == {
        "client_id",
        "secret",
        "previous_secret_expires_at",
    }
