"""The management HTTP API (SPEC §5), black-box through httpx and ``ASGITransport``.

Every response a test receives on a known route is also checked against the
app's own OpenAPI document (status documented, body valid for its schema),
so the document cannot drift from what the app answers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from keyguard import KeyInfo, KeyManager, KeyStore, MemoryStore, ReadOnly, management_app
from keyguard.console import CONSOLE_PATHS
from keyguard.errors import ConfigurationError, StoreUnavailable
from keyguard.management import MAX_BODY_BYTES, openapi_document
from tests.helpers import http_scope, run_asgi

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-admin-token-0123456789-abc"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCUMENT = openapi_document()


# -- checking answers against the OpenAPI document --------------------------------------------


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: object, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(value: object, schema: dict[str, Any], where: str = "$") -> None:
    """Assert ``value`` matches ``schema`` (the JSON Schema subset the document uses)."""
    schema = _resolve(schema)
    for combinator in ("oneOf", "anyOf"):
        if combinator in schema:
            matches = 0
            for option in schema[combinator]:
                try:
                    validate(value, option, where)
                except AssertionError:
                    continue
                matches += 1
            assert matches == 1 if combinator == "oneOf" else matches >= 1, (
                f"{where}: {value!r} matches {matches} of {combinator}"
            )
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(_is_type(value, t) for t in types), f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{where}: missing {name}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(properties), f"{where}: extra {set(value) - set(properties)}"
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], f"{where}.{name}")
    if isinstance(value, list):
        assert len(value) <= schema.get("maxItems", len(value)), f"{where}: too many items"
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{index}]")
    if isinstance(value, str):
        assert len(value) >= schema.get("minLength", 0), f"{where}: too short"
        assert len(value) <= schema.get("maxLength", len(value)), f"{where}: too long"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ pattern"
        if schema.get("format") == "date-time":
            assert value.endswith("Z"), f"{where}: {value!r} is not UTC"
            datetime.fromisoformat(value[:-1] + "+00:00")
    if isinstance(value, int) and not isinstance(value, bool):
        assert value >= schema.get("minimum", value), f"{where}: below minimum"
        assert value <= schema.get("maximum", value), f"{where}: above maximum"


def _template(path: str) -> str | None:
    for template in DOCUMENT["paths"]:
        pattern = re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return str(template)
    return None


async def check_against_document(response: httpx.Response) -> None:
    """Fail unless a response of a documented operation is documented, with a valid body."""
    request = response.request
    template = _template(request.url.path)
    method = "get" if request.method == "HEAD" else request.method.lower()
    if template is None or method not in DOCUMENT["paths"][template]:
        return  # unknown routes and methods are checked by their own tests
    documented = DOCUMENT["paths"][template][method]["responses"]
    assert str(response.status_code) in documented, (
        f"{request.method} {template} answered {response.status_code}, not documented"
    )
    content = documented[str(response.status_code)].get("content")
    await response.aread()
    if content is None:
        assert response.content == b""
        return
    (media_type,) = content
    assert response.headers["content-type"] == media_type
    if request.method != "HEAD":
        validate(response.json(), content[media_type]["schema"])


# -- fixtures and helpers ---------------------------------------------------------------------


def client_for(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in-process, checking every answer against the document."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
        base_url="http://testserver",
        headers=AUTH,
        event_hooks={"response": [check_against_document]},
    )


@pytest.fixture
async def client(store: KeyStore) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the management API over each kind of store."""
    async with client_for(management_app(store, token=TOKEN)) as opened:
        yield opened


@pytest.fixture
async def memory_client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the management API over a memory store (where the backend does not matter)."""
    async with client_for(management_app(MemoryStore(), token=TOKEN)) as opened:
        yield opened


def assert_problem(
    response: httpx.Response, status: int, code: str, detail_contains: str = ""
) -> dict[str, Any]:
    """Assert ``response`` is an RFC 9457 problem with this status and code; return it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["type"] == "about:blank"
    assert problem["title"] == HTTPStatus(status).phrase
    assert problem["status"] == status
    assert problem["code"] == code
    assert detail_contains in problem["detail"]
    return problem


async def expose(client: httpx.AsyncClient, api: str = "orders", **fields: object) -> None:
    """Expose ``api`` through the API."""
    response = await client.put(f"/apis/{api}", json={"exposed": True, **fields})
    assert response.status_code == 200, response.text


async def create(
    client: httpx.AsyncClient, name: str = "Acme", kind: str = "internal", api: str = "orders"
) -> dict[str, Any]:
    """Create a key through the API and return the answer's body."""
    response = await client.post(f"/apis/{api}/keys", json={"name": name, "kind": kind})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


# -- building the app -------------------------------------------------------------------------


def test_building_without_token_is_refused() -> None:
    """An app without a token cannot be built by accident."""
    with pytest.raises(ConfigurationError, match="token"):
        management_app(MemoryStore())


def test_token_and_allow_no_auth_together_are_refused() -> None:
    """Asking for a token and for no auth at once is a contradiction, refused at build time."""
    with pytest.raises(ConfigurationError, match="either"):
        management_app(MemoryStore(), token=TOKEN, allow_no_auth=True)


@pytest.mark.parametrize("token", ["", "has space", "naïve", "tab\there"])
def test_token_unusable_in_a_header_is_refused(token: str) -> None:
    """A token that cannot travel in an Authorization header is refused at build time."""
    with pytest.raises(ConfigurationError, match="token"):
        management_app(MemoryStore(), token=token)


@pytest.mark.parametrize("length", [1, 16, 31])
def test_token_shorter_than_32_characters_is_refused(length: int) -> None:
    """A token under 32 characters is a ConfigurationError at build time, not echoed (SPEC §5)."""
    token = "t" * (length - 1) + "Z"
    with pytest.raises(ConfigurationError, match="at least 32") as caught:
        management_app(MemoryStore(), token=token)
    assert token not in str(caught.value)


def test_token_of_32_characters_is_accepted() -> None:
    """A token of exactly 32 characters builds an app."""
    assert management_app(MemoryStore(), token="x" * 32) is not None


def test_invalid_default_limit_is_a_configuration_error() -> None:
    """A default key limit out of range is refused at build time, as a configuration error."""
    with pytest.raises(ConfigurationError, match="max_keys_per_kind"):
        management_app(MemoryStore(), token=TOKEN, max_keys_per_kind=-1)


async def test_allow_no_auth_serves_without_a_token() -> None:
    """With ``allow_no_auth=True`` routes answer requests that carry no token."""
    async with client_for(management_app(MemoryStore(), allow_no_auth=True)) as client:
        response = await client.get("/apis", headers={"Authorization": ""})
    assert response.status_code == 200


async def test_default_limit_applies_to_created_apis() -> None:
    """``max_keys_per_kind`` is the limit of the APIs the app creates."""
    async with client_for(management_app(MemoryStore(), token=TOKEN, max_keys_per_kind=2)) as c:
        response = await c.put("/apis/orders", json={"exposed": True})
    assert response.json()["max_keys_per_kind"] == 2


# -- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic czNjcmV0", TOKEN],
    ids=["absent", "empty", "scheme-only", "blank-token", "basic", "no-scheme"],
)
@pytest.mark.parametrize("path", ["/apis", "/openapi.json", "/no/such/route"])
async def test_request_without_bearer_token_is_401(
    memory_client: httpx.AsyncClient, authorization: str | None, path: str
) -> None:
    """Without a bearer token every path, known or not, is 401 with a Bearer challenge."""
    headers = {} if authorization is None else {"Authorization": authorization}
    memory_client.headers.pop("Authorization")
    response = await memory_client.get(path, headers=headers)
    assert_problem(response, 401, "unauthorized", "Authorization: Bearer")
    assert response.headers["www-authenticate"] == 'Bearer realm="keyguard"'


@pytest.mark.parametrize("token", [TOKEN + "x", TOKEN[:-1], TOKEN.upper()])
async def test_wrong_token_is_401_invalid_token(
    memory_client: httpx.AsyncClient, token: str
) -> None:
    """A wrong token is 401 with ``error="invalid_token"`` and nothing is done."""
    response = await memory_client.put(
        "/apis/orders", json={"exposed": True}, headers={"Authorization": f"Bearer {token}"}
    )
    assert_problem(response, 401, "unauthorized", "not valid")
    assert response.headers["www-authenticate"] == 'Bearer realm="keyguard", error="invalid_token"'
    assert (await memory_client.get("/apis")).json() == {"apis": []}


async def test_scheme_is_case_insensitive(memory_client: httpx.AsyncClient) -> None:
    """``bearer`` in any case is accepted, as RFC 9110 says auth schemes are."""
    response = await memory_client.get("/apis", headers={"Authorization": f"bEaReR {TOKEN}"})
    assert response.status_code == 200


async def test_repeated_authorization_header_is_401(memory_client: httpx.AsyncClient) -> None:
    """Two Authorization headers are refused even if one is right."""
    memory_client.headers.pop("Authorization")
    response = await memory_client.get(
        "/apis", headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer x")]
    )
    assert_problem(response, 401, "unauthorized")


# -- APIs -------------------------------------------------------------------------------------


async def test_api_lifecycle(client: httpx.AsyncClient) -> None:
    """PUT creates and exposes an API, GET shows it and lists it, un-exposing keeps its keys."""
    assert (await client.get("/apis")).json() == {"apis": []}
    response = await client.put("/apis/orders", json={"exposed": True})
    assert response.json() == {
        "name": "orders",
        "exposed": True,
        "max_keys_per_kind": 5,
        "rate_limits": [],
        "keys": {"internal": 0, "external": 0},
    }
    await create(client, "Acme", "internal")
    await create(client, "Globex", "external")
    response = await client.put("/apis/orders", json={"exposed": False})
    assert response.json()["exposed"] is False
    got = (await client.get("/apis/orders")).json()
    assert got == {
        "name": "orders",
        "exposed": False,
        "max_keys_per_kind": 5,
        "rate_limits": [],
        "keys": {"internal": 1, "external": 1},
    }
    assert (await client.get("/apis")).json() == {"apis": [got]}


async def test_apis_are_listed_by_name(memory_client: httpx.AsyncClient) -> None:
    """``GET /apis`` lists every API ordered by name."""
    for name in ("zeta", "alpha", "mid"):
        await expose(memory_client, name)
    names = [api["name"] for api in (await memory_client.get("/apis")).json()["apis"]]
    assert names == ["alpha", "mid", "zeta"]


async def test_unknown_api_is_404_api_not_found(client: httpx.AsyncClient) -> None:
    """``GET /apis/{api}`` of an API never created is 404 ``api_not_found``."""
    assert_problem(await client.get("/apis/nobody"), 404, "api_not_found", "nobody")


async def test_put_with_empty_object_creates_unexposed(client: httpx.AsyncClient) -> None:
    """``PUT /apis/{api}`` with ``{}`` creates the API, unexposed, and changes nothing else."""
    response = await client.put("/apis/orders", json={})
    assert response.json()["exposed"] is False
    assert (await client.get("/apis/orders")).status_code == 200


async def test_limit_up_to_a_million(client: httpx.AsyncClient) -> None:
    """``max_keys_per_kind`` accepts the ceiling, 1,000,000 (one more is 422, below)."""
    await expose(client)
    response = await client.put("/apis/orders", json={"max_keys_per_kind": 1_000_000})
    assert response.status_code == 200
    assert response.json()["max_keys_per_kind"] == 1_000_000


async def test_put_changes_only_the_limit(client: httpx.AsyncClient) -> None:
    """``max_keys_per_kind`` alone changes the limit and leaves ``exposed`` as it was."""
    await expose(client)
    response = await client.put("/apis/orders", json={"max_keys_per_kind": 9})
    assert (response.json()["exposed"], response.json()["max_keys_per_kind"]) == (True, 9)


# -- keys -------------------------------------------------------------------------------------


async def test_create_internal_key_shows_secret_once(client: httpx.AsyncClient) -> None:
    """An internal key is 201 with its secret, a Location, no-store; no later answer has it."""
    await expose(client)
    response = await client.post("/apis/orders/keys", json={"name": "  Acme  ", "kind": "internal"})
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    key = response.json()
    assert key["name"] == "Acme"
    assert key["kind"] == "internal"
    assert key["has_secret"] is True
    assert isinstance(key["secret"], str)
    assert len(key["secret"]) >= 43
    assert response.headers["location"] == (
        f"http://testserver/apis/orders/keys/{key['client_id']}"
    )
    listed = (await client.get("/apis/orders/keys")).text
    fetched = (await client.get(f"/apis/orders/keys/{key['client_id']}")).text
    assert key["secret"] not in listed
    assert key["secret"] not in fetched


async def test_issued_secret_authenticates(client: httpx.AsyncClient, store: KeyStore) -> None:
    """The secret the API returns is the one the key really has."""
    await expose(client)
    key = await create(client)
    result = await KeyManager(store).authenticate("orders", key["client_id"], key["secret"])
    assert isinstance(result, KeyInfo)


async def test_create_external_key_has_null_secret(client: httpx.AsyncClient) -> None:
    """An external key is created without a secret: ``"secret": null``, ``has_secret`` false."""
    await expose(client)
    key = await create(client, "Globex", "external")
    assert key["secret"] is None
    assert key["has_secret"] is False


async def test_list_and_get_keys(client: httpx.AsyncClient) -> None:
    """Keys are listed oldest first with exactly R9's fields, and each can be fetched."""
    await expose(client)
    first = await create(client, "Acme", "internal")
    second = await create(client, "Globex", "external")
    listed = (await client.get("/apis/orders/keys")).json()["keys"]
    expected = [{k: v for k, v in key.items() if k != "secret"} for key in (first, second)]
    assert listed == expected
    response = await client.get(f"/apis/orders/keys/{second['client_id']}")
    assert response.json() == expected[1]


async def test_never_created_api_keys(client: httpx.AsyncClient) -> None:
    """For an API never created: keys list empty, key routes 404, creation 409 not exposed."""
    assert (await client.get("/apis/ghost/keys")).json() == {"keys": [], "next": None}
    client_id = "0" * 32
    assert_problem(await client.get(f"/apis/ghost/keys/{client_id}"), 404, "key_not_found")
    assert_problem(await client.delete(f"/apis/ghost/keys/{client_id}"), 404, "key_not_found")
    assert_problem(await client.put(f"/apis/ghost/keys/{client_id}/secret"), 404, "key_not_found")
    response = await client.post("/apis/ghost/keys", json={"name": "Acme", "kind": "internal"})
    assert_problem(response, 409, "api_not_exposed")


async def test_create_on_unexposed_api_is_409(client: httpx.AsyncClient) -> None:
    """R1: creating a key for an unexposed API is 409 ``api_not_exposed``."""
    await client.put("/apis/orders", json={"exposed": False})
    response = await client.post("/apis/orders/keys", json={"name": "Acme", "kind": "internal"})
    assert_problem(response, 409, "api_not_exposed")


async def test_key_limit_is_409(client: httpx.AsyncClient) -> None:
    """R2: a key beyond ``max_keys_per_kind`` of its kind is 409 ``key_limit_reached``."""
    await expose(client, max_keys_per_kind=1)
    await create(client, "Acme", "internal")
    await create(client, "Globex", "external")
    response = await client.post("/apis/orders/keys", json={"name": "Initech", "kind": "internal"})
    assert_problem(response, 409, "key_limit_reached")


async def test_duplicate_name_is_409(client: httpx.AsyncClient) -> None:
    """R3: a name equal to another key's, ignoring case, is 409 ``duplicate_name``."""
    await expose(client)
    await create(client, "Acme", "internal")
    response = await client.post("/apis/orders/keys", json={"name": "ACME", "kind": "external"})
    assert_problem(response, 409, "duplicate_name")


async def test_set_secret_on_external_key(client: httpx.AsyncClient, store: KeyStore) -> None:
    """An external key gets a fresh secret, once, replacing the previous one."""
    await expose(client)
    key = await create(client, "Globex", "external")
    path = f"/apis/orders/keys/{key['client_id']}/secret"
    first = await client.put(path)
    assert first.status_code == 200
    assert first.headers["cache-control"] == "no-store"
    assert set(first.json()) == {"client_id", "secret", "previous_secret_expires_at"}
    assert first.json()["previous_secret_expires_at"] is None
    assert first.json()["client_id"] == key["client_id"]
    second = (await client.put(path, json={})).json()["secret"]
    assert second != first.json()["secret"]
    manager = KeyManager(store)
    assert isinstance(await manager.authenticate("orders", key["client_id"], second), KeyInfo)
    assert not isinstance(
        await manager.authenticate("orders", key["client_id"], first.json()["secret"]), KeyInfo
    )
    fetched = (await client.get(f"/apis/orders/keys/{key['client_id']}")).json()
    assert fetched["has_secret"] is True


async def test_set_secret_on_internal_key_is_409(client: httpx.AsyncClient) -> None:
    """R4: an internal key's secret cannot be replaced: 409 ``key_immutable``."""
    await expose(client)
    key = await create(client, "Acme", "internal")
    response = await client.put(f"/apis/orders/keys/{key['client_id']}/secret")
    assert_problem(response, 409, "key_immutable")


async def test_delete_key(client: httpx.AsyncClient) -> None:
    """Deleting is 204 with no body; the key is then gone (404) and cannot be deleted again."""
    await expose(client)
    key = await create(client)
    path = f"/apis/orders/keys/{key['client_id']}"
    response = await client.delete(path)
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get(path), 404, "key_not_found")
    assert_problem(await client.delete(path), 404, "key_not_found")
    assert (await client.get("/apis/orders/keys")).json() == {"keys": [], "next": None}


async def test_delete_api(client: httpx.AsyncClient) -> None:
    """DELETE /apis/{api}: 404 if unknown, 409 api_has_keys while it has keys, 204 with force."""
    assert_problem(await client.delete("/apis/orders"), 404, "api_not_found")
    await expose(client)
    await create(client)
    assert_problem(await client.delete("/apis/orders"), 409, "api_has_keys")
    assert_problem(await client.delete("/apis/orders?force=false"), 409, "api_has_keys")
    assert_problem(await client.delete("/apis/orders?force=yes"), 422, "invalid_request")
    assert (await client.get("/apis/orders")).json()["keys"] == {"internal": 1, "external": 0}
    response = await client.delete("/apis/orders?force=true")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get("/apis/orders"), 404, "api_not_found")
    assert (await client.get("/apis")).json() == {"apis": []}
    await client.put("/apis/empty", json={})
    assert (await client.delete("/apis/empty")).status_code == 204


async def test_key_of_another_api_is_not_found(client: httpx.AsyncClient) -> None:
    """A key is reachable only under its own API."""
    await expose(client, "orders")
    await expose(client, "billing")
    key = await create(client, api="orders")
    response = await client.get(f"/apis/billing/keys/{key['client_id']}")
    assert_problem(response, 404, "key_not_found")


# -- validation -------------------------------------------------------------------------------

_BAD_KEY_BODIES: list[tuple[str, object, str]] = [
    ("not-an-object", ["Acme", "internal"], "JSON object"),
    ("string", "Acme", "JSON object"),
    ("missing-name", {"kind": "internal"}, "name"),
    ("missing-kind", {"name": "Acme"}, "kind"),
    ("name-not-string", {"name": 5, "kind": "internal"}, "name"),
    ("name-null", {"name": None, "kind": "internal"}, "name"),
    ("name-blank", {"name": "   ", "kind": "internal"}, "name"),
    ("name-too-long", {"name": "x" * 101, "kind": "internal"}, "name"),
    ("name-control", {"name": "a\nb", "kind": "internal"}, "name"),
    ("kind-unknown", {"name": "Acme", "kind": "root"}, "kind"),
    ("kind-not-string", {"name": "Acme", "kind": 1}, "kind"),
    ("unknown-field", {"name": "Acme", "kind": "internal", "colour": "red"}, "colour"),
    ("chosen-secret", {"name": "Acme", "kind": "internal", "secret": "mine"}, "secret"),
    ("chosen-client-id", {"name": "Acme", "kind": "internal", "client_id": "x"}, "client_id"),
]


@pytest.mark.parametrize(
    ("body", "field"),
    [(body, field) for _, body, field in _BAD_KEY_BODIES],
    ids=[case for case, _, _ in _BAD_KEY_BODIES],
)
async def test_invalid_key_body_is_422(
    memory_client: httpx.AsyncClient, body: object, field: str
) -> None:
    """Each invalid ``POST …/keys`` body is 422 ``invalid_request`` naming what is wrong."""
    await expose(memory_client)
    response = await memory_client.post("/apis/orders/keys", json=body)
    assert_problem(response, 422, "invalid_request", field)
    assert (await memory_client.get("/apis/orders/keys")).json() == {"keys": [], "next": None}


_BAD_API_BODIES: list[tuple[str, object, str]] = [
    ("exposed-string", {"exposed": "yes"}, "exposed"),
    ("exposed-null", {"exposed": None}, "exposed"),
    ("limit-float", {"max_keys_per_kind": 1.5}, "max_keys_per_kind"),
    ("limit-bool", {"max_keys_per_kind": True}, "max_keys_per_kind"),
    ("limit-negative", {"max_keys_per_kind": -1}, "max_keys_per_kind"),
    ("limit-huge", {"max_keys_per_kind": 10**9}, "max_keys_per_kind"),
    ("limit-over-ceiling", {"max_keys_per_kind": 1_000_001}, "max_keys_per_kind"),
    ("unknown-field", {"exposed": True, "public": True}, "public"),
    ("array", [True], "JSON object"),
]


@pytest.mark.parametrize(
    ("body", "field"),
    [(body, field) for _, body, field in _BAD_API_BODIES],
    ids=[case for case, _, _ in _BAD_API_BODIES],
)
async def test_invalid_api_body_is_422(
    memory_client: httpx.AsyncClient, body: object, field: str
) -> None:
    """Each invalid ``PUT /apis/{api}`` body is 422 ``invalid_request`` naming the field."""
    response = await memory_client.put("/apis/orders", json=body)
    assert_problem(response, 422, "invalid_request", field)
    assert_problem(await memory_client.get("/apis/orders"), 404, "api_not_found")


_RAW_BODIES: list[tuple[str, bytes, str]] = [
    ("malformed", b'{"name": "Acme",', "not valid JSON"),
    ("empty", b"", "JSON object"),
    ("whitespace", b"   ", "not valid JSON"),
    ("duplicate-member", b'{"name": "A", "name": "B", "kind": "internal"}', "name"),
    ("nan", b'{"name": "A", "kind": "internal", "x": NaN}', "NaN"),
    ("not-utf8", b'{"name": "\xff", "kind": "internal"}', "UTF-8"),
    ("deep", b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
    ("huge-number", b'{"max_keys_per_kind": ' + b"9" * 5000 + b"}", "number too large"),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(raw, expected) for _, raw, expected in _RAW_BODIES],
    ids=[case for case, _, _ in _RAW_BODIES],
)
async def test_unparsable_body_is_422(
    memory_client: httpx.AsyncClient, raw: bytes, expected: str
) -> None:
    """A body that is not one JSON object (or not UTF-8) is 422 ``invalid_request``."""
    await expose(memory_client)
    response = await memory_client.post(
        "/apis/orders/keys", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 422, "invalid_request", expected)


@pytest.mark.parametrize(
    "path",
    ["/apis/-bad", "/apis/a%20b", "/apis/" + "x" * 65, "/apis/-bad/keys", "/apis/-bad/keys/abc"],
)
async def test_bad_api_name_in_path_is_422(memory_client: httpx.AsyncClient, path: str) -> None:
    """An invalid API name in the path is 422 ``invalid_request`` about the API name."""
    assert_problem(await memory_client.get(path), 422, "invalid_request", "API name")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "", "application/json; charset=latin-1"],
)
async def test_non_json_content_type_is_415(
    memory_client: httpx.AsyncClient, content_type: str
) -> None:
    """A body sent as anything but JSON (UTF-8) is 415 ``unsupported_media_type``."""
    await expose(memory_client)
    response = await memory_client.post(
        "/apis/orders/keys",
        content=b'{"name": "Acme", "kind": "internal"}',
        headers={"Content-Type": content_type},
    )
    assert_problem(response, 415, "unsupported_media_type", "application/json")


async def test_json_suffix_media_type_is_accepted(memory_client: httpx.AsyncClient) -> None:
    """``application/<something>+json`` with a UTF-8 charset is JSON too."""
    await expose(memory_client)
    response = await memory_client.post(
        "/apis/orders/keys",
        content=b'{"name": "Acme", "kind": "external"}',
        headers={"Content-Type": "application/merge-patch+json; charset=UTF-8"},
    )
    assert response.status_code == 201


async def test_declared_oversized_body_is_413(memory_client: httpx.AsyncClient) -> None:
    """A Content-Length over the limit is 413 ``request_too_large``."""
    await expose(memory_client)
    response = await memory_client.post(
        "/apis/orders/keys",
        content=b" " * (MAX_BODY_BYTES + 1),
        headers={"Content-Type": "application/json"},
    )
    assert_problem(response, 413, "request_too_large")


async def test_streamed_oversized_body_is_413_without_reading_it_all(
    memory_client: httpx.AsyncClient,
) -> None:
    """A chunked body over the limit is 413, and the app stops reading soon after the limit."""
    await expose(memory_client)
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            sent += 1
            yield b" " * 1024

    response = await memory_client.put(
        "/apis/orders", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413, "request_too_large")
    assert "content-length" not in response.request.headers
    assert sent < 100


async def test_body_at_the_limit_is_read(memory_client: httpx.AsyncClient) -> None:
    """A body of exactly the limit is accepted (padding is whitespace)."""
    body = b'{"exposed": true}'
    body += b" " * (MAX_BODY_BYTES - len(body))
    response = await memory_client.put(
        "/apis/orders", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200


async def test_a_content_length_of_thousands_of_digits_is_413() -> None:
    """A Content-Length too long for ``int()`` (over 4,300 digits) is 413, not a 500."""
    app = management_app(MemoryStore(), token=TOKEN)
    headers = [
        (b"authorization", f"Bearer {TOKEN}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", b"9" * 5000),
    ]
    scope = {**http_scope("/apis/orders", headers), "method": "PUT"}
    body = {"type": "http.request", "body": b'{"exposed": true}', "more_body": False}
    sent = await run_asgi(app, scope, [body])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["code"] == "request_too_large"


async def test_a_body_cut_short_by_a_disconnect_is_422_and_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client gone before its whole body arrived is a malformed request (422), not an
    unexpected error with a traceback in the log; nothing is changed."""
    store = MemoryStore()
    app = management_app(store, token=TOKEN)
    headers = [
        (b"authorization", f"Bearer {TOKEN}".encode()),
        (b"content-type", b"application/json"),
    ]
    scope = {**http_scope("/apis/orders", headers), "method": "PUT"}
    # Half a body, then run_asgi's receive reports the disconnect.
    part = {"type": "http.request", "body": b'{"expo', "more_body": True}
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        sent = await run_asgi(app, scope, [part])
    assert sent[0]["status"] == 422
    assert json.loads(sent[1]["body"])["code"] == "invalid_request"
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert await KeyManager(store).list_apis() == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/apis", 200),
        ("PUT", "/apis/orders", 200),
        ("DELETE", "/apis/orders", 204),
        ("GET", "/apis/absent", 404),
        ("GET", "/apis/bad%20name", 422),
        ("GET", "/nowhere", 404),
        ("PATCH", "/apis", 405),
        ("GET", "/openapi.json", 200),
    ],
)
async def test_every_answer_forbids_sniffing(
    memory_client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    """JSON answers, problems and 204s all carry ``X-Content-Type-Options: nosniff`` (and
    ``Cache-Control: no-store``): no browser reads a key's name or meta as HTML or script."""
    await expose(memory_client)
    body = {"exposed": True} if method == "PUT" else None
    response = await memory_client.request(method, path, json=body)
    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


async def test_refusals_before_routing_forbid_sniffing() -> None:
    """The bearer check's own 401 and 403 carry ``nosniff`` too."""
    app = management_app(
        MemoryStore(),
        tokens={"admin": TOKEN, "viewer": ReadOnly("viewer-token-0123456789-abcdefgh")},
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as plain:
        missing = await plain.get("/apis")
        refused = await plain.put(
            "/apis/orders", headers={"Authorization": "Bearer viewer-token-0123456789-abcdefgh"}
        )
    assert (missing.status_code, refused.status_code) == (401, 403)
    for response in (missing, refused):
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_set_secret_refuses_a_chosen_secret(memory_client: httpx.AsyncClient) -> None:
    """A caller cannot choose a secret: ``{"secret": …}`` is 422 and nothing changes."""
    await expose(memory_client)
    key = await create(memory_client, "Globex", "external")
    path = f"/apis/orders/keys/{key['client_id']}/secret"
    response = await memory_client.put(path, json={"secret": "chosen-by-me"})
    assert_problem(response, 422, "invalid_request", "secret")
    fetched = (await memory_client.get(f"/apis/orders/keys/{key['client_id']}")).json()
    assert fetched["has_secret"] is False


async def test_set_secret_accepts_an_empty_form_body(memory_client: httpx.AsyncClient) -> None:
    """An empty body is no body, whatever its Content-Type (``curl -X PUT -d ''``)."""
    await expose(memory_client)
    key = await create(memory_client, "Globex", "external")
    response = await memory_client.put(
        f"/apis/orders/keys/{key['client_id']}/secret",
        content=b"",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200


# -- unknown routes and methods ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/apis/", "/apis/orders/keys/abc/extra", "/apis/x/"])
async def test_unknown_route_is_404_problem(memory_client: httpx.AsyncClient, path: str) -> None:
    """An unknown route (a trailing slash included) is a 404 ``not_found`` problem."""
    assert_problem(await memory_client.get(path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/apis", {"GET", "HEAD"}),
        ("POST", "/apis/orders", {"GET", "HEAD", "PUT", "DELETE"}),
        ("POST", "/apis/orders/keys/abc", {"GET", "HEAD", "PATCH", "DELETE"}),
        ("GET", "/apis/orders/keys/abc/secret", {"PUT"}),
    ],
)
async def test_wrong_method_is_405_problem_with_allow(
    memory_client: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    """A wrong method is a 405 ``method_not_allowed`` problem whose Allow lists every method."""
    response = await memory_client.request(method, path)
    assert_problem(response, 405, "method_not_allowed", method)
    assert set(response.headers["allow"].split(", ")) == allowed


# -- failures ---------------------------------------------------------------------------------


class DownStore(MemoryStore):
    """A store whose every call fails as an unreachable server would."""

    def __getattribute__(self, name: str) -> Any:
        if name in (
            "lookup",
            "get_api",
            "list_apis",
            "upsert_api",
            "insert_key",
            "get_key",
            "list_keys",
            "page_keys",
            "set_secret_hash",
            "update_key",
            "delete_key",
        ):

            async def fail(*args: object, **kwargs: object) -> None:
                raise StoreUnavailable("connection refused to db.internal:5432 as admin")

            return fail
        return super().__getattribute__(name)


class BrokenStore(MemoryStore):
    """A store with a bug: it raises something other than ``StoreUnavailable``."""

    async def list_apis(self) -> Any:
        raise RuntimeError("bug in /srv/app/store.py line 12")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/apis", None),
        ("GET", "/apis/orders", None),
        ("PUT", "/apis/orders", {"exposed": True}),
        ("GET", "/apis/orders/keys", None),
        ("POST", "/apis/orders/keys", {"name": "Acme", "kind": "internal"}),
        ("GET", "/apis/orders/keys/" + "0" * 32, None),
        ("PATCH", "/apis/orders/keys/" + "0" * 32, {"enabled": False}),
        ("PUT", "/apis/orders/keys/" + "0" * 32 + "/secret", None),
        ("DELETE", "/apis/orders/keys/" + "0" * 32, None),
    ],
)
async def test_store_outage_is_503_with_retry_after(method: str, path: str, body: object) -> None:
    """Every route answers a store outage with 503 ``store_unavailable`` and Retry-After."""
    async with client_for(management_app(DownStore(), token=TOKEN)) as client:
        response = await client.request(method, path, json=body)
    problem = assert_problem(response, 503, "store_unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert "db.internal" not in problem["detail"]


async def test_unexpected_error_is_a_500_problem_without_traceback() -> None:
    """A bug below the API is a 500 ``internal_error`` problem that reveals nothing of it."""
    app = management_app(BrokenStore(), token=TOKEN)
    async with client_for(app, raise_app_exceptions=False) as client:
        response = await client.get("/apis")
    assert_problem(response, 500, "internal_error")
    assert "store.py" not in response.text
    assert "Traceback" not in response.text


# -- the OpenAPI document ---------------------------------------------------------------------


def _app_operations(app: Starlette) -> set[tuple[str, str]]:
    operations = set()
    for route in app.routes:
        assert isinstance(route, Route)
        assert route.methods is not None
        if route.path in CONSOLE_PATHS:
            continue  # the web console's static files, not JSON routes (tests/test_console.py)
        operations |= {(route.path, m.lower()) for m in route.methods if m != "HEAD"}
    return operations


async def test_openapi_lists_exactly_the_app_routes(memory_client: httpx.AsyncClient) -> None:
    """Every route of the app is in ``/openapi.json``, and every operation there is a route."""
    response = await memory_client.get("/openapi.json")
    document = response.json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    assert documented == _app_operations(management_app(MemoryStore(), token=TOKEN))


def test_openapi_references_resolve() -> None:
    """Every ``$ref`` of the document points at a schema it defines."""

    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    schemas = DOCUMENT["components"]["schemas"]
    found = list(refs(DOCUMENT))
    assert found
    for ref in found:
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas


def test_openapi_documents_every_error_code_the_routes_can_send() -> None:
    """Every operation documents 401, and every ``{api}`` route 422 and 503."""
    for path, operations in DOCUMENT["paths"].items():
        for operation in operations.values():
            assert "401" in operation["responses"]
            if "{api}" in path:
                assert {"422", "503"} <= set(operation["responses"])


async def test_mounted_app_knows_its_prefix() -> None:
    """Mounted under a prefix, Location headers and the document's server use the prefix."""
    outer = Starlette(routes=[Mount("/keyguard", management_app(MemoryStore(), token=TOKEN))])
    async with client_for(outer) as client:
        await client.put("/keyguard/apis/orders", json={"exposed": True})
        response = await client.post(
            "/keyguard/apis/orders/keys", json={"name": "Acme", "kind": "external"}
        )
        document = (await client.get("/keyguard/openapi.json")).json()
    assert response.headers["location"].startswith("http://testserver/keyguard/apis/orders/keys/")
    assert document["servers"] == [{"url": "/keyguard"}]


async def test_wrapped_mount_still_creates_keys() -> None:
    """Wrapped in plain ASGI middleware under a mount (which hides its routes from the outer
    router), creating a key still answers 201 with the right Location, never a 500."""
    inner = management_app(MemoryStore(), token=TOKEN)

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        await inner(scope, receive, send)

    outer = Starlette(routes=[Mount("/keyguard", wrapper)])
    async with client_for(outer) as client:
        await client.put("/keyguard/apis/orders", json={"exposed": True})
        response = await client.post(
            "/keyguard/apis/orders/keys", json={"name": "Acme", "kind": "external"}
        )
    assert response.status_code == 201
    client_id = response.json()["client_id"]
    assert response.headers["location"] == (
        f"http://testserver/keyguard/apis/orders/keys/{client_id}"
    )


def test_validator_rejects_a_wrong_body() -> None:
    """The document check used by every test fails on a body that breaks its schema."""
    key = {"client_id": "x", "name": "A", "kind": "internal", "has_secret": True}
    with pytest.raises(AssertionError, match="created_at"):
        validate(key, {"$ref": "#/components/schemas/Key"})
    with pytest.raises(AssertionError, match="secret"):
        validate(
            {**key, "created_at": "2026-01-01T00:00:00Z", "secret": "s"},
            {"$ref": "#/components/schemas/Key"},
        )
