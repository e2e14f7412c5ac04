"""The request path in every host: root paths, mounts, preflights, HEAD, outer middleware,
floods of slow verifications and quiet 404s (issue 12, SPEC §4)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import httpx
import pytest
from passlib.context import CryptContext
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from keyguard import KeyGuard, KeyManager, MemoryStore, SecretHasher
from tests.helpers import http_scope, run_asgi

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"
SECRET = "X-IBM-Client-Secret"


async def echo(request: Request) -> JSONResponse:
    state = request.scope.get("state") or {}
    return JSONResponse(
        {
            "secret": request.headers.get(SECRET),
            "query": request.scope["query_string"].decode("latin-1"),
            "caller": getattr(state.get("keyguard"), "name", None),
        }
    )


def client(app: ASGIApp, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, **options), base_url="http://test"
    )


async def exposed_store() -> tuple[MemoryStore, str]:
    """A memory store whose API 'orders' has one secretless external key."""
    store = MemoryStore()
    manager = KeyManager(store)
    await manager.expose("orders")
    return store, (await manager.create_key("orders", name="Acme", kind="external")).client_id


async def test_preflight_to_a_mounted_asgi_app_needs_a_key() -> None:
    """Preflight headers no longer open a mounted plain ASGI app, and the secret is stripped."""
    store, _ = await exposed_store()
    seen: list[Scope] = []

    async def raw(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await JSONResponse({"data": "private"})(scope, receive, send)

    app = Starlette(routes=[Mount("/raw", raw)])
    app.add_middleware(KeyGuard, store=store, api="orders")
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "GET"}
    async with client(app) as c:
        r = await c.options("/raw/x", headers={**preflight, SECRET: "s"})
    assert r.status_code == 401
    assert seen == []


async def test_cors_middleware_outside_answers_preflights_and_labels_401s() -> None:
    """CORSMiddleware outside KeyGuard answers preflights itself and its headers reach 401s."""
    store, _ = await exposed_store()
    inner = Starlette(routes=[Route("/echo", echo)])
    guarded = KeyGuard(inner, store=store, api="orders")
    app = CORSMiddleware(guarded, allow_origins=["https://a.example"], allow_headers=[ID, SECRET])
    async with client(app) as c:
        pre = await c.options(
            "/echo",
            headers={"Origin": "https://a.example", "Access-Control-Request-Method": "GET"},
        )
        refused = await c.get("/echo", headers={"Origin": "https://a.example"})
    assert pre.status_code == 200
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://a.example"


@pytest.mark.parametrize("root_path", ["/prefix", "/a/b"])
async def test_exclusions_match_behind_a_root_path(root_path: str) -> None:
    """Under a server's --root-path, exclude_paths match the path the app routes on."""
    store, _ = await exposed_store()
    app = KeyGuard(
        Starlette(routes=[Route("/health", echo), Route("/echo", echo)]),
        store=store,
        api="orders",
        exclude_paths=["/health"],
    )
    async with client(app, root_path=root_path) as c:
        assert (await c.get(f"{root_path}/health")).status_code == 200
        assert (await c.get(f"{root_path}/echo")).status_code == 401


async def test_exclusions_match_in_a_mounted_app() -> None:
    """A Starlette app with KeyGuard mounted at /admin keeps its exclusions."""
    store, _ = await exposed_store()
    sub = Starlette(routes=[Route("/health", echo), Route("/echo", echo)])
    sub.add_middleware(KeyGuard, store=store, api="orders", exclude_paths=["/health"])
    app = Starlette(routes=[Mount("/admin", sub)])
    async with client(app) as c:
        assert (await c.get("/admin/health")).status_code == 200
        assert (await c.get("/admin/echo")).status_code == 401


async def test_secret_is_stripped_on_excluded_paths() -> None:
    """An excluded path never shows the app the secret header (or query parameter)."""
    store, _ = await exposed_store()
    app = KeyGuard(
        Starlette(routes=[Route("/health", echo)]),
        store=store,
        api="orders",
        exclude_paths=["/health"],
        query_credentials=True,
    )
    async with client(app) as c:
        r = await c.get("/health?a=1&client_secret=s&b", headers={SECRET: "top-secret"})
    assert r.json()["secret"] is None
    assert r.json()["query"] == "a=1&b"


async def test_query_secret_removal_keeps_every_other_byte() -> None:
    """Only the client_secret parameter's bytes leave the raw query string."""
    store, _ = await exposed_store()
    manager = KeyManager(store)
    issued = await manager.create_key("orders", name="Staff", kind="internal")
    assert issued.secret is not None
    app = KeyGuard(
        Starlette(routes=[Route("/echo", echo)]), store=store, api="orders", query_credentials=True
    )
    raw = f"flag&x=%20y&client_secret={issued.secret}&e=%E9&client_id={issued.client_id}"
    scope = http_scope("/echo", [])
    scope["query_string"] = raw.encode()
    sent = await run_asgi(app, scope)
    assert sent[0]["status"] == 200
    body = sent[1]["body"].decode()
    assert f'"query":"flag&x=%20y&e=%E9&client_id={issued.client_id}"' in body


async def test_percent_encoded_query_secret_is_removed_too() -> None:
    """A secret sent as ``client%5Fsecret`` is read like ``client_secret``, so it is removed too."""
    store, _ = await exposed_store()
    issued = await KeyManager(store).create_key("orders", name="Staff", kind="internal")
    assert issued.secret is not None
    app = KeyGuard(
        Starlette(routes=[Route("/echo", echo)]), store=store, api="orders", query_credentials=True
    )
    scope = http_scope("/echo", [])
    scope["query_string"] = f"client%5Fsecret={issued.secret}&client_id={issued.client_id}".encode()
    sent = await run_asgi(app, scope)
    assert sent[0]["status"] == 200
    assert issued.secret not in sent[1]["body"].decode()


async def test_outer_middleware_sees_the_caller_and_the_endpoints_state() -> None:
    """An access logger outside KeyGuard sees the key and what the endpoint put in state,
    while the lifespan's own state is unchanged across requests."""
    store, client_id = await exposed_store()

    async def mark(request: Request) -> JSONResponse:
        request.state.order = 42
        return JSONResponse({})

    guarded = KeyGuard(Starlette(routes=[Route("/m", mark)]), store=store, api="orders")
    logged: list[tuple[str, int]] = []
    lifespan_state = {"pool": "db"}

    async def access_log(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"] = dict(lifespan_state)  # what an ASGI server does per request
        await guarded(scope, receive, send)
        logged.append((scope["state"]["keyguard"].name, scope["state"]["order"]))

    async with client(access_log) as c:
        for _ in range(2):
            assert (await c.get("/m", headers={ID: client_id})).status_code == 200
    assert logged == [("Acme", 42), ("Acme", 42)]
    assert lifespan_state == {"pool": "db"}


async def test_head_refusal_has_no_body() -> None:
    """A refused HEAD has the GET refusal's status and headers, Content-Length included,
    and no body."""
    store, _ = await exposed_store()
    app = KeyGuard(Starlette(routes=[Route("/echo", echo)]), store=store, api="orders")
    get = await run_asgi(app, http_scope("/echo", []))
    scope = http_scope("/echo", [])
    scope["method"] = "HEAD"
    head = await run_asgi(app, scope)
    assert head[0] == get[0]
    assert head[1]["body"] == b""
    assert get[1]["body"] != b""


class SlowContext:
    """A passlib-like context whose verify blocks until released (a slow scheme)."""

    def __init__(self) -> None:
        self.real = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__default_rounds=1)
        self.release = threading.Event()

    def hash(self, secret: str) -> str:
        return str(self.real.hash(secret))

    def verify(self, secret: str, stored: str) -> bool:
        self.release.wait(30)
        return bool(self.real.verify(secret, stored))

    def default_scheme(self) -> str:
        return "slow"


async def test_verification_flood_is_refused_past_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Wrong secrets that cannot start verifying within the store's timeout get 503 with
    Retry-After; verifications that got a slot, and later valid callers, still succeed."""
    slow = SlowContext()
    hasher = SecretHasher(slow, offload=True, offload_threads=2)
    store = MemoryStore()
    store.timeout = 0.2  # type: ignore[attr-defined]
    manager = KeyManager(store, hasher=hasher)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    assert key.secret is not None
    app = KeyGuard(
        Starlette(routes=[Route("/echo", echo)]), store=store, api="orders", hasher=hasher
    )
    statuses: list[int] = []
    four_refused = anyio.Event()
    caplog.set_level(logging.DEBUG, logger="keyguard")

    async def wrong() -> None:
        sent = await run_asgi(
            app,
            http_scope(
                "/echo",
                [(b"x-ibm-client-id", key.client_id.encode()), (b"x-ibm-client-secret", b"wrong")],
            ),
        )
        statuses.append(sent[0]["status"])
        if statuses.count(503) == 4:
            four_refused.set()
        if sent[0]["status"] == 503:
            assert (b"retry-after", b"2") in sent[0]["headers"]

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(wrong)
        with anyio.fail_after(20):
            await four_refused.wait()
        slow.release.set()
    assert sorted(statuses) == [401, 401, 503, 503, 503, 503]
    busy = [r for r in caplog.records if "no secret verification could start" in r.getMessage()]
    assert len(busy) == 4
    valid = [
        (b"x-ibm-client-id", key.client_id.encode()),
        (b"x-ibm-client-secret", key.secret.encode()),
    ]
    assert (await run_asgi(app, http_scope("/echo", valid)))[0]["status"] == 200


async def test_quiet_404s_are_logged_once_per_api(caplog: pytest.LogCaptureFixture) -> None:
    """A 404 for an unknown or unexposed API is a WARNING naming the reason and the store,
    once per API per minute."""
    store = MemoryStore()
    await KeyManager(store).update_api("hidden", exposed=False)

    def api_of(scope: Scope) -> str:
        return str(scope["path"]).strip("/")

    app = KeyGuard(Starlette(routes=[Route("/{p}", echo)]), store=store, api=api_of)
    caplog.set_level(logging.WARNING, logger="keyguard")
    for _ in range(3):
        assert (await run_asgi(app, http_scope("/hidden", [])))[0]["status"] == 404
        assert (await run_asgi(app, http_scope("/nobody", [])))[0]["status"] == 404
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2, messages
    assert "hidden is not exposed in in-process memory store" in messages[0]
    assert "nobody is unknown in in-process memory store" in messages[1]


async def test_sqlite_store_is_named_by_absolute_path(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The 404 warning names a SQLite store by its absolute path (a relative URL resolved)."""
    from keyguard import open_store

    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///keys.db")
    try:
        app = KeyGuard(Starlette(routes=[Route("/", echo)]), store=store, api="orders")
        caplog.set_level(logging.WARNING, logger="keyguard")
        assert (await run_asgi(app, http_scope("/", [])))[0]["status"] == 404
    finally:
        await store.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"SQLite database {tmp_path / 'keys.db'}" in m for m in warnings), warnings
