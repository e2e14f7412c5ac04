"""KeyGuard, the request path: every row of SPEC §4, on every store."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from passlib.context import CryptContext
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from keyguard import KeyGuard, KeyInfo, KeyManager, KeyStore, MemoryStore, SecretHasher
from keyguard.errors import ConfigurationError, StoreUnavailable
from tests.helpers import CountingStore, http_scope, run_asgi

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"
SECRET = "X-IBM-Client-Secret"


async def whoami(request: Request) -> JSONResponse:
    if request.method == "OPTIONS" and "keyguard" not in request.scope.get("state", {}):
        return JSONResponse({"preflight": True})
    info: KeyInfo = request.state.keyguard
    return JSONResponse(
        {
            "api": info.api,
            "client_id": info.client_id,
            "name": info.name,
            "kind": info.kind.value,
            "secret_header": request.headers.get(SECRET),
            "query": request.url.query,
        }
    )


async def open_endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("open")


async def echo_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    info: KeyInfo = websocket.state.keyguard
    await websocket.send_text(info.name)
    await websocket.close()


ROUTES = [
    Route("/whoami", whoami, methods=["GET", "POST", "OPTIONS"]),
    Route("/health", open_endpoint),
    Route("/health-admin", open_endpoint),
    Route("/docs", open_endpoint),
    Route("/docs/{rest:path}", open_endpoint),
    Route("/docs-admin", open_endpoint),
    Route("/{api}/whoami", whoami),
    WebSocketRoute("/ws", echo_socket),
]


def protected(store: KeyStore, **options: Any) -> Starlette:
    """A Starlette app whose every route sits behind KeyGuard(**options)."""
    app = Starlette(routes=ROUTES)
    options.setdefault("api", "orders")
    app.add_middleware(KeyGuard, store=store, **options)
    return app


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@dataclass
class Keys:
    """The keys of the ``keys`` fixture, with their secrets as issued."""

    internal_id: str
    internal_secret: str
    external_id: str  # no secret
    secured_id: str  # external key with a secret set
    secured_secret: str


@pytest.fixture
async def keys(manager: KeyManager) -> Keys:
    """An exposed API 'orders' with an internal key, a secretless external key and an
    external key with a secret."""
    await manager.expose("orders")
    internal = await manager.create_key("orders", name="Staff", kind="internal")
    external = await manager.create_key("orders", name="Acme", kind="external")
    secured = await manager.create_key("orders", name="Globex", kind="external")
    secured_secret = await manager.set_secret("orders", secured.client_id)
    assert internal.secret is not None
    return Keys(
        internal.client_id, internal.secret, external.client_id, secured.client_id, secured_secret
    )


@pytest.fixture
async def http(store: KeyStore, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the protected app with default options."""
    async with client(protected(store)) as c:
        yield c


def assert_refusal(response: httpx.Response, status: int, message: str) -> None:
    """``response`` is an IBM-format refusal with the headers SPEC §4 requires."""
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    reasons = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}
    reasons[503] = "Service Unavailable"
    assert response.json() == {
        "httpCode": str(status),
        "httpMessage": reasons[status],
        "moreInformation": message,
    }
    if status == 401:
        assert response.headers["www-authenticate"] == 'APIKey realm="orders"'
    else:
        assert "www-authenticate" not in response.headers


# -- success --------------------------------------------------------------------------------


async def test_internal_key_with_secret_passes(http: httpx.AsyncClient, keys: Keys) -> None:
    """Id and secret of an internal key reach the app, which sees who called and no secret."""
    r = await http.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
    assert r.status_code == 200
    assert r.json() == {
        "api": "orders",
        "client_id": keys.internal_id,
        "name": "Staff",
        "kind": "internal",
        "secret_header": None,
        "query": "",
    }


async def test_external_key_without_secret_passes(http: httpx.AsyncClient, keys: Keys) -> None:
    """An external key that has no secret needs only its client id."""
    r = await http.get("/whoami", headers={ID: keys.external_id})
    assert r.status_code == 200
    assert r.json()["name"] == "Acme"


async def test_external_key_with_secret_needs_it(http: httpx.AsyncClient, keys: Keys) -> None:
    """Once an external key has a secret, the id alone is refused and id + secret pass."""
    assert_refusal(
        await http.get("/whoami", headers={ID: keys.secured_id}),
        401,
        "Invalid client id or secret.",
    )
    r = await http.get("/whoami", headers={ID: keys.secured_id, SECRET: keys.secured_secret})
    assert r.status_code == 200
    assert r.json()["name"] == "Globex"


async def test_repeat_requests_keep_passing(http: httpx.AsyncClient, keys: Keys) -> None:
    """The same valid credentials pass again and again (the verified-secret memo is right)."""
    headers = {ID: keys.internal_id, SECRET: keys.internal_secret}
    for _ in range(3):
        assert (await http.get("/whoami", headers=headers)).status_code == 200
    bad = {ID: keys.internal_id, SECRET: keys.internal_secret[:-1] + "x"}
    assert (await http.get("/whoami", headers=bad)).status_code == 401


async def test_header_names_are_case_insensitive(store: KeyStore, keys: Keys) -> None:
    """Header names match whatever their case on the wire."""
    scope = http_scope(
        "/whoami",
        [
            (b"x-ibm-client-id", keys.internal_id.encode()),
            (b"x-ibm-client-secret", keys.internal_secret.encode()),
        ],
    )
    # ASGI servers lowercase header names; configuring them in any case must still match.
    app = protected(store, client_id_header="X-Ibm-CLIENT-id", client_secret_header=SECRET.upper())
    sent = await run_asgi(app, scope, [{"type": "http.request", "body": b""}])
    assert sent[0]["status"] == 200


# -- each refusal -------------------------------------------------------------------------------


async def test_unknown_api_is_404(store: KeyStore, keys: Keys) -> None:
    """An API nobody created answers 404, whatever the credentials."""
    async with client(protected(store, api="nosuchapi")) as c:
        r = await c.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
    assert_refusal(r, 404, "No resources match requested URI")


async def test_unexposed_api_is_404_and_comes_back(
    http: httpx.AsyncClient, manager: KeyManager, keys: Keys
) -> None:
    """R8: un-exposing answers 404 and keeps the keys; re-exposing makes them work again."""
    await manager.unexpose("orders")
    assert_refusal(
        await http.get("/whoami", headers={ID: keys.external_id}),
        404,
        "No resources match requested URI",
    )
    assert_refusal(await http.get("/whoami"), 404, "No resources match requested URI")
    await manager.expose("orders")
    assert (await http.get("/whoami", headers={ID: keys.external_id})).status_code == 200


@pytest.mark.parametrize("value", [None, "", "   ", "\t"])
async def test_missing_client_id(http: httpx.AsyncClient, value: str | None) -> None:
    """No client id, or an empty or blank one, is 'Client id missing.'."""
    headers = {} if value is None else {ID: value}
    assert_refusal(await http.get("/whoami", headers=headers), 401, "Client id missing.")


async def test_unknown_client_id(http: httpx.AsyncClient) -> None:
    """A well-formed id that no key has is 'Client id not registered.'."""
    r = await http.get("/whoami", headers={ID: "0" * 32, SECRET: "whatever"})
    assert_refusal(r, 401, "Client id not registered.")


@pytest.mark.parametrize(
    "bad_id", ["short", "g" * 32, "0" * 33, "é" * 32, "0" * 31 + "\x7f", "x" * 4000]
)
async def test_impossible_client_id_is_not_looked_up(
    store: KeyStore, keys: Keys, bad_id: str
) -> None:
    """An id keyguard could never issue is 'not registered' and no key is looked up for it."""
    counting = CountingStore(store)
    async with client(protected(counting)) as c:
        r = await c.get("/whoami", headers=[(ID.encode(), bad_id.encode("utf-8"))])
    assert_refusal(r, 401, "Client id not registered.")
    assert counting.lookups == [("orders", None)]


async def test_client_id_compares_exactly(http: httpx.AsyncClient, keys: Keys) -> None:
    """R6: the same id in upper case is another (unregistered) id."""
    r = await http.get("/whoami", headers={ID: keys.external_id.upper()})
    assert_refusal(r, 401, "Client id not registered.")


async def test_key_of_another_api_is_not_registered(
    store: KeyStore, manager: KeyManager, keys: Keys
) -> None:
    """A key issued for one API does not open another."""
    await manager.expose("billing")
    async with client(protected(store, api="billing")) as c:
        r = await c.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
    assert r.status_code == 401
    assert r.json()["moreInformation"] == "Client id not registered."


@pytest.mark.parametrize("secret", [None, "", "  ", "wrong", "WRONG" * 20])
async def test_wrong_or_missing_secret(
    http: httpx.AsyncClient, keys: Keys, secret: str | None
) -> None:
    """A key with a secret refuses a missing, blank or wrong secret alike."""
    headers = {ID: keys.internal_id}
    if secret is not None:
        headers[SECRET] = secret
    assert_refusal(await http.get("/whoami", headers=headers), 401, "Invalid client id or secret.")


async def test_secret_sent_to_secretless_key(http: httpx.AsyncClient, keys: Keys) -> None:
    """A key with no secret refuses a request that sends one anyway."""
    r = await http.get("/whoami", headers={ID: keys.external_id, SECRET: "anything"})
    assert_refusal(r, 401, "Invalid client id or secret.")


async def test_secret_of_another_key_is_wrong(http: httpx.AsyncClient, keys: Keys) -> None:
    """One key's valid secret does not open another key."""
    r = await http.get("/whoami", headers={ID: keys.secured_id, SECRET: keys.internal_secret})
    assert_refusal(r, 401, "Invalid client id or secret.")


@pytest.mark.parametrize(
    "headers",
    [
        [(ID, "a" * 32), (ID, "a" * 32)],
        [(ID, "a" * 32), (ID, "b" * 32)],
        [(ID, "a" * 32), (SECRET, "s"), (SECRET, "s")],
        [(ID.lower(), "a" * 32), (ID.upper(), "a" * 32)],
        [(ID, ""), (ID, "a" * 32)],
    ],
)
async def test_repeated_credential_header_is_400(
    http: httpx.AsyncClient, headers: list[tuple[str, str]]
) -> None:
    """A client id or secret header sent twice (even with one value) is a 400."""
    r = await http.get("/whoami", headers=headers)
    assert_refusal(r, 400, "Multiple client id or secret values in the request.")


async def test_repeated_header_refused_before_store_lookup(store: KeyStore, keys: Keys) -> None:
    """The 400 for repeated headers comes first: the store is not even asked."""
    counting = CountingStore(store)
    async with client(protected(counting)) as c:
        r = await c.get("/whoami", headers=[(ID, keys.external_id), (ID, keys.external_id)])
    assert r.status_code == 400
    assert counting.calls["lookup"] == 0


async def test_deleted_key_fails_on_next_request(
    http: httpx.AsyncClient, manager: KeyManager, keys: Keys
) -> None:
    """R7: the request after a delete is refused as not registered."""
    assert (await http.get("/whoami", headers={ID: keys.external_id})).status_code == 200
    await manager.delete_key("orders", keys.external_id)
    assert_refusal(
        await http.get("/whoami", headers={ID: keys.external_id}), 401, "Client id not registered."
    )


async def test_replaced_secret(http: httpx.AsyncClient, manager: KeyManager, keys: Keys) -> None:
    """Setting a new secret makes the old one fail and the new one pass."""
    old = {ID: keys.secured_id, SECRET: keys.secured_secret}
    assert (await http.get("/whoami", headers=old)).status_code == 200
    new_secret = await manager.set_secret("orders", keys.secured_id)
    assert (await http.get("/whoami", headers=old)).status_code == 401
    new = {ID: keys.secured_id, SECRET: new_secret}
    assert (await http.get("/whoami", headers=new)).status_code == 200


# -- store failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error", [StoreUnavailable("down"), RuntimeError("driver bug"), OSError("reset")]
)
async def test_store_failure_is_503(store: KeyStore, keys: Keys, error: Exception) -> None:
    """Any store failure is a 503 with Retry-After, never a 500, and passes once it is over."""
    counting = CountingStore(store)
    async with client(protected(counting)) as c:
        counting.fail_with = error
        r = await c.get("/whoami", headers={ID: keys.external_id})
        assert_refusal(r, 503, "Key store unavailable.")
        assert int(r.headers["retry-after"]) > 0
        counting.fail_with = None
        assert (await c.get("/whoami", headers={ID: keys.external_id})).status_code == 200


# -- options -------------------------------------------------------------------------------


async def test_custom_header_names(store: KeyStore, keys: Keys) -> None:
    """Configured header names replace IBM's; IBM's are then ignored."""
    app = protected(store, client_id_header="X-Api-Key", client_secret_header="X-Api-Secret")
    async with client(app) as c:
        ok = await c.get(
            "/whoami", headers={"X-Api-Key": keys.internal_id, "X-Api-Secret": keys.internal_secret}
        )
        assert ok.status_code == 200
        assert "x-api-secret" not in ok.text
        ibm = await c.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
        assert ibm.json()["moreInformation"] == "Client id missing."


async def test_query_credentials_off_by_default(http: httpx.AsyncClient, keys: Keys) -> None:
    """Credentials in the query string are ignored unless turned on."""
    r = await http.get("/whoami", params={"client_id": keys.external_id})
    assert_refusal(r, 401, "Client id missing.")


async def test_query_credentials_when_on(store: KeyStore, keys: Keys) -> None:
    """With query_credentials, client_id/client_secret parameters work and the secret is
    removed from the query the app sees."""
    async with client(protected(store, query_credentials=True)) as c:
        r = await c.get(
            "/whoami",
            params={
                "client_id": keys.internal_id,
                "client_secret": keys.internal_secret,
                "page": "2",
            },
        )
        assert r.status_code == 200
        assert r.json()["query"] == f"client_id={keys.internal_id}&page=2"
        both = await c.get(
            "/whoami", params={"client_id": keys.external_id}, headers={ID: keys.external_id}
        )
        assert_refusal(both, 400, "Multiple client id or secret values in the request.")
        twice = await c.get("/whoami", params=[("client_id", "a"), ("client_id", "b")])
        assert twice.status_code == 400


async def test_strip_secret_off_passes_header(store: KeyStore, keys: Keys) -> None:
    """With strip_secret=False the app still sees the secret header."""
    async with client(protected(store, strip_secret=False)) as c:
        r = await c.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
    assert r.json()["secret_header"] == keys.internal_secret


async def test_exclude_paths_exact_and_prefix(store: KeyStore, keys: Keys) -> None:
    """Excluded paths need no key: exact ones only themselves, '/*' ones their subtree."""
    async with client(protected(store, exclude_paths=["/health", "/docs/*"])) as c:
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/docs")).status_code == 200
        assert (await c.get("/docs/index.html")).status_code == 200
        for path in ("/health-admin", "/docs-admin", "/health/", "/whoami", "/docs/../whoami"):
            r = await c.get(path)
            assert r.status_code == 401, path


async def test_cors_preflight_needs_a_key_by_default(http: httpx.AsyncClient) -> None:
    """Anyone can send preflight headers, so by default a preflight is refused like any request."""
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "GET"}
    r = await http.options("/whoami", headers=preflight)
    assert r.status_code == 401


async def test_cors_preflight_passes_when_allowed(store: KeyStore, keys: Keys) -> None:
    """With allow_preflight=True a preflight (OPTIONS + Origin + Access-Control-Request-Method)
    passes, and an OPTIONS request without the request-method header still needs a key."""
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "GET"}
    async with client(protected(store, allow_preflight=True)) as http:
        r = await http.options("/whoami", headers={**preflight, SECRET: "s"})
        assert r.status_code == 200
        assert r.json() == {"preflight": True}
        # Without the request-method header it is an ordinary OPTIONS request: a key is needed.
        r = await http.options("/whoami", headers={"Origin": "https://a.example"})
        assert r.status_code == 401


async def test_api_from_a_callable(store: KeyStore, manager: KeyManager, keys: Keys) -> None:
    """api= may be a callable of the scope; an invalid name it returns answers 404."""

    def api_of(scope: Scope) -> str | None:
        return str(scope["path"]).split("/")[1] or None

    async with client(protected(store, api=api_of)) as c:
        good = await c.get("/orders/whoami", headers={ID: keys.external_id})
        assert good.status_code == 200
        assert good.json()["api"] == "orders"
        other = await c.get("/billing/whoami", headers={ID: keys.external_id})
        assert other.status_code == 404
        bad = await c.get("/-bad-/whoami", headers={ID: keys.external_id})
        assert bad.status_code == 404


async def test_api_callable_that_raises_is_404(store: KeyStore, keys: Keys) -> None:
    """A failing api= callable refuses the request (404) instead of crashing it."""

    def broken(scope: Scope) -> str:
        raise LookupError("no tenant")

    async with client(protected(store, api=broken)) as c:
        r = await c.get("/whoami", headers={ID: keys.external_id})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"api": "bad name"}, "api"),
        ({"api": ""}, "api"),
        ({"client_id_header": "Bad Header"}, "client_id_header"),
        ({"client_id_header": SECRET}, "differ"),
        ({"exclude_paths": ["health"]}, "exclude_paths"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], match: str) -> None:
    """Invalid options raise ConfigurationError when the middleware is built."""
    with pytest.raises(ConfigurationError, match=match):
        KeyGuard(Starlette(), store=MemoryStore(), **options)


# -- ASGI details ------------------------------------------------------------------------------


async def test_lifespan_passes_through(store: KeyStore) -> None:
    """Non-HTTP scopes reach the app untouched."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await run_asgi(KeyGuard(app, store=store), scope)
    assert seen == [scope]
    assert seen[0] is scope


async def test_state_is_set_in_the_requests_own_dict(store: KeyStore, keys: Keys) -> None:
    """The key info goes into the request's state dict in place (the server's per-request copy
    of the lifespan state), so outer middleware sees it; the lifespan's state is unchanged."""
    lifespan_state = {"db": "pool"}
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    scope = http_scope("/x", [(b"x-ibm-client-id", keys.external_id.encode())])
    request_state: dict[str, Any] = dict(lifespan_state)  # what ASGI servers do
    scope["state"] = request_state
    await run_asgi(KeyGuard(app, store=store, api="orders"), scope)
    assert lifespan_state == {"db": "pool"}
    assert request_state["keyguard"].client_id == keys.external_id
    assert seen[0]["state"] is request_state
    assert seen[0]["state"]["db"] == "pool"
    assert seen[0]["state"]["keyguard"].client_id == keys.external_id


async def test_secret_header_stripped_from_scope(store: KeyStore, keys: Keys) -> None:
    """The app's scope has no secret header; other headers are kept in order."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    headers = [
        (b"accept", b"*/*"),
        (b"x-ibm-client-secret", keys.internal_secret.encode()),
        (b"x-ibm-client-id", keys.internal_id.encode()),
    ]
    await run_asgi(KeyGuard(app, store=store, api="orders"), http_scope("/x", headers))
    assert seen[0]["headers"] == [headers[0], headers[2]]


def websocket_scope(headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> Scope:
    """A websocket handshake scope for /ws."""
    scope = http_scope("/ws", headers)
    del scope["method"]
    scope.update(type="websocket", scheme="ws", **extra)
    return scope


async def test_headers_as_lists(store: KeyStore, keys: Keys) -> None:
    """Servers may give headers as two-item lists instead of tuples; both work alike."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    headers = [
        [b"x-ibm-client-id", keys.internal_id.encode()],
        [b"x-ibm-client-secret", keys.internal_secret.encode()],
    ]
    await run_asgi(KeyGuard(app, store=store, api="orders"), http_scope("/x", headers))  # type: ignore[arg-type]
    assert seen[0]["headers"] == [headers[0]]


async def test_websocket_with_key_is_accepted(store: KeyStore, keys: Keys) -> None:
    """A websocket handshake with a valid key reaches the app, which sees the key."""
    scope = websocket_scope([(b"x-ibm-client-id", keys.external_id.encode())])
    sent = await run_asgi(protected(store), scope, [{"type": "websocket.connect"}])
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "Acme"


async def test_websocket_refused_with_http_response(store: KeyStore, keys: Keys) -> None:
    """Where the server supports the denial extension, a refused handshake gets the JSON 401."""
    scope = websocket_scope(extensions={"websocket.http.response": {}})
    sent = await run_asgi(protected(store), scope, [{"type": "websocket.connect"}])
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == 401
    assert json.loads(sent[1]["body"])["moreInformation"] == "Client id missing."


@pytest.mark.parametrize(("outage", "code"), [(False, 1008), (True, 1013)])
async def test_websocket_refused_with_close(
    store: KeyStore, keys: Keys, outage: bool, code: int
) -> None:
    """Without the extension, a refused handshake is closed before accept: 1008, or 1013
    when the store is unavailable."""
    counting = CountingStore(store)
    if outage:
        counting.fail_with = StoreUnavailable("down")
    scope = websocket_scope()
    sent: list[Message] = await run_asgi(
        protected(counting), scope, [{"type": "websocket.connect"}]
    )
    assert sent == [{"type": "websocket.close", "code": code, "reason": ""}]


async def test_content_length_matches_body(http: httpx.AsyncClient) -> None:
    """Refusals declare their exact length."""
    r = await http.get("/whoami")
    assert int(r.headers["content-length"]) == len(r.content)


# -- what the request path does ----------------------------------------------------------------


async def test_one_store_lookup_per_request(store: KeyStore, keys: Keys) -> None:
    """Each checked request costs exactly one store call, a lookup of state and key together;
    without a cache, the API's rate limits (which admitted keys inherit) are read once a second
    at most, however many requests."""
    counting = CountingStore(store)
    started = time.monotonic()
    async with client(protected(counting)) as c:
        await c.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
        await c.get("/whoami", headers={ID: keys.external_id})
        await c.get("/whoami", headers={ID: "1" * 32})
        await c.get("/whoami")
        for _ in range(20):
            await c.get("/whoami", headers={ID: keys.external_id})
    elapsed = time.monotonic() - started
    assert set(counting.calls) == {"lookup", "get_api"}
    assert counting.calls["lookup"] == 24
    assert 1 <= counting.calls["get_api"] <= 1 + int(elapsed)
    assert counting.lookups[:4] == [
        ("orders", keys.internal_id),
        ("orders", keys.external_id),
        ("orders", "1" * 32),
        ("orders", None),
    ]


async def test_refusals_cost_the_same_verification(store: KeyStore, keys: Keys) -> None:
    """A wrong secret and a secret sent to a secretless key (one message) each cost one full
    verification; an unknown id, whose message already says so, costs none."""
    context = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__default_rounds=1)
    verified: list[str] = []
    real_verify = context.verify

    def counting_verify(secret: str, hash: str) -> bool:
        verified.append(secret)
        return bool(real_verify(secret, hash))

    context.verify = counting_verify
    app = protected(store, hasher=SecretHasher(context, offload=False))
    async with client(app) as c:
        for headers in (
            {ID: "2" * 32, SECRET: "s1"},
            {ID: keys.internal_id, SECRET: "s2"},
            {ID: keys.external_id, SECRET: "s3"},
        ):
            assert (await c.get("/whoami", headers=headers)).status_code == 401
    assert verified == ["s2", "s3"]


async def test_no_secret_in_logs(
    store: KeyStore, manager: KeyManager, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """With every logger at DEBUG, neither secrets nor hashes appear in any log record,
    through successes, refusals and outages."""
    caplog.set_level(logging.DEBUG)
    counting = CountingStore(store)
    async with client(protected(counting)) as c:
        await c.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
        await c.get(
            "/whoami", headers={ID: keys.internal_id, SECRET: "nope-" + keys.internal_secret}
        )
        counting.fail_with = RuntimeError("boom")
        await c.get("/whoami", headers={ID: keys.internal_id, SECRET: keys.internal_secret})
    new_secret = await manager.set_secret("orders", keys.secured_id)
    record = await store.get_key("orders", keys.internal_id)
    assert record is not None
    assert record.secret_hash is not None
    text = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
    assert "503" in text  # the outage was logged ...
    for secret in (keys.internal_secret, new_secret, record.secret_hash):
        assert secret not in text  # ... but no secret or hash


def test_repr_shows_no_secret() -> None:
    """KeyGuard's repr names its store and API, nothing more."""
    guard = KeyGuard(Starlette(), store=MemoryStore(), api="orders")
    assert repr(guard) == "KeyGuard(store=MemoryStore(apis=0, keys=0), api='orders')"


def test_add_middleware_type_checks() -> None:
    """app.add_middleware(KeyGuard, store=..., api=...) builds (mypy checks this file too)."""
    app = Starlette()
    app.add_middleware(KeyGuard, store=MemoryStore(), api="orders", exclude_paths=["/health"])
    assert app.user_middleware[0].cls == KeyGuard  # type: ignore[comparison-overlap]


async def test_an_outage_is_logged_once_not_per_request(
    store: KeyStore, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request during an outage is a 503, but only the first is a WARNING (with the
    traceback); the rest go to DEBUG, so the log is not flooded."""
    caplog.set_level(logging.DEBUG, logger="keyguard")
    counting = CountingStore(store)
    counting.fail_with = StoreUnavailable("down")
    async with client(protected(counting)) as c:
        for _ in range(20):
            assert (await c.get("/whoami", headers={ID: keys.external_id})).status_code == 503
    failures = [r for r in caplog.records if "answering 503" in r.getMessage()]
    assert [r.levelname for r in failures] == ["WARNING"] + ["DEBUG"] * 19
    assert failures[0].exc_info is not None
