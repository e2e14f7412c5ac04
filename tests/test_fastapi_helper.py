"""``keyguard.fastapi``: security schemes in the OpenAPI document and the caller as a dependency."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Security

from keyguard import IssuedKey, KeyGuard, KeyInfo, KeyManager, MemoryStore
from keyguard.errors import ConfigurationError
from keyguard.fastapi import CurrentKey, current_key, key_dependency

pytestmark = pytest.mark.anyio

# Module level, so FastAPI can resolve the (postponed) annotation.
CustomKey = Annotated[
    KeyInfo, Depends(key_dependency(client_id_header="X-Api-Id", client_secret_header="X-Api-Key"))
]


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    """A memory store (the helper never touches the store itself)."""
    opened = MemoryStore()
    yield opened
    await opened.aclose()


async def issue(store: MemoryStore, kind: str = "internal") -> IssuedKey:
    """Expose ``orders`` and create a key of ``kind`` for it."""
    manager = KeyManager(store)
    await manager.expose("orders")
    return await manager.create_key("orders", name=f"Acme {kind}", kind=kind)


def build(store: MemoryStore, **guard: Any) -> FastAPI:
    """A FastAPI app behind KeyGuard using the helper, with an excluded /open route."""
    app = FastAPI()
    app.add_middleware(
        KeyGuard, store=store, api="orders", exclude_paths=["/openapi.json", "/open"], **guard
    )

    @app.get("/whoami")
    async def whoami(key: CurrentKey) -> dict[str, str]:
        return {"name": key.name, "client_id": key.client_id, "kind": key.kind.value}

    @app.get("/plan")
    async def plan(key: CurrentKey) -> dict[str, Any]:
        return {"plan": key.meta.get("plan"), "enabled": key.enabled}

    @app.get("/guarded", dependencies=[Depends(current_key)])
    async def guarded() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/open")
    async def open_route(key: CurrentKey) -> dict[str, str]:
        return {"name": key.name}

    @app.get("/public")
    async def public() -> dict[str, str]:
        return {"ok": "yes"}

    return app


def client(app: FastAPI, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """An in-process client of ``app``."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_openapi_declares_both_headers_as_security_schemes(store: MemoryStore) -> None:
    """The document has apiKey schemes for both IBM headers (what Swagger UI's Authorize offers)."""
    async with client(build(store)) as c:
        document = (await c.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"] == {
        "ClientId": {
            "type": "apiKey",
            "in": "header",
            "name": "X-IBM-Client-Id",
            "description": "The key's client id.",
        },
        "ClientSecret": {
            "type": "apiKey",
            "in": "header",
            "name": "X-IBM-Client-Secret",
            "description": "The key's secret, for keys that have one.",
        },
    }


async def test_routes_using_the_dependency_declare_security(store: MemoryStore) -> None:
    """Routes that take the key (as a parameter or a dependency) require the schemes; others not."""
    async with client(build(store)) as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
    expected: list[dict[str, list[str]]] = [{"ClientId": []}, {"ClientSecret": []}]
    assert paths["/whoami"]["get"]["security"] == expected
    assert paths["/guarded"]["get"]["security"] == expected
    assert "security" not in paths["/public"]["get"]
    # The headers are security, not ordinary parameters the handler must be sent.
    assert "parameters" not in paths["/whoami"]["get"]


async def test_document_keyguard_states_the_requirement_and_refusals(store: MemoryStore) -> None:
    """document_keyguard makes the requirement "id and secret, or id alone" and lists the
    400/401/404/429/503 refusals with IBM's body schema (and the 429's headers) on protected
    operations only."""
    from keyguard.fastapi import document_keyguard

    app = build(store)
    document_keyguard(app)
    async with client(app) as c:
        document = (await c.get("/openapi.json")).json()
    paths = document["paths"]
    expected: list[dict[str, list[str]]] = [{"ClientId": [], "ClientSecret": []}, {"ClientId": []}]
    assert paths["/whoami"]["get"]["security"] == expected
    assert paths["/guarded"]["get"]["security"] == expected
    responses = paths["/whoami"]["get"]["responses"]
    assert set(responses["429"]["headers"]) == {
        "Retry-After",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
    }
    assert set(responses["503"]["headers"]) == {"Retry-After"}
    assert set(responses["401"]["headers"]) == {"WWW-Authenticate"}  # SPEC §4: every 401
    await issue(store)
    async with client(app) as c:
        refused = await c.get("/whoami")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"] == 'APIKey realm="orders"'
    for status in ("400", "401", "404", "429", "503"):
        content = paths["/whoami"]["get"]["responses"][status]["content"]
        ref = content["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/KeyGuardRefusal"
    assert "401" not in paths["/public"]["get"]["responses"]
    schema = document["components"]["schemas"]["KeyGuardRefusal"]
    assert schema["required"] == ["httpCode", "httpMessage", "moreInformation"]


async def test_document_keyguard_rewrites_a_document_built_already(store: MemoryStore) -> None:
    """document_keyguard called after the app's document was first built (by a startup
    hook, a test, a docs page) still rewrites it, rather than leaving FastAPI's."""
    from keyguard.fastapi import document_keyguard

    app = build(store)
    app.openapi()
    document_keyguard(app)
    operation = app.openapi()["paths"]["/whoami"]["get"]
    assert operation["security"] == [{"ClientId": [], "ClientSecret": []}, {"ClientId": []}]
    assert "401" in operation["responses"]


async def test_document_keyguard_keeps_the_routes_other_requirements(store: MemoryStore) -> None:
    """A route that also needs a credential of the app's own (a bearer token, OAuth2 with
    scopes) keeps it, required along with the key in both alternatives; it is not dropped
    (which would tell clients that the key alone is enough)."""
    from fastapi.security import HTTPBearer, OAuth2PasswordBearer

    from keyguard.fastapi import document_keyguard

    app = FastAPI()
    bearer = HTTPBearer()
    oauth = OAuth2PasswordBearer(tokenUrl="token", scopes={"read": "Read", "write": "Write"})

    @app.get("/both", dependencies=[Depends(bearer)])
    async def both(key: CurrentKey) -> dict[str, str]:
        return {"name": key.name}

    @app.get("/scoped", dependencies=[Security(oauth, scopes=["read"])])
    async def scoped(key: CurrentKey) -> dict[str, str]:
        return {"name": key.name}

    document_keyguard(app)
    paths = app.openapi()["paths"]
    assert paths["/both"]["get"]["security"] == [
        {"HTTPBearer": [], "ClientId": [], "ClientSecret": []},
        {"HTTPBearer": [], "ClientId": []},
    ]
    assert paths["/scoped"]["get"]["security"] == [
        {"OAuth2PasswordBearer": ["read"], "ClientId": [], "ClientSecret": []},
        {"OAuth2PasswordBearer": ["read"], "ClientId": []},
    ]


async def test_handler_receives_the_authenticated_key(store: MemoryStore) -> None:
    """A ``CurrentKey`` parameter is the ``KeyInfo`` KeyGuard authenticated."""
    key = await issue(store)
    assert key.secret is not None
    headers = {"X-IBM-Client-Id": key.client_id, "X-IBM-Client-Secret": key.secret}
    async with client(build(store)) as c:
        response = await c.get("/whoami", headers=headers)
        guarded = await c.get("/guarded", headers=headers)
    assert response.json() == {
        "name": "Acme internal",
        "client_id": key.client_id,
        "kind": "internal",
    }
    assert guarded.json() == {"ok": "yes"}


async def test_handler_receives_the_keys_meta(store: MemoryStore) -> None:
    """The dependency's KeyInfo carries the key's lifecycle fields, meta included."""
    manager = KeyManager(store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external", meta={"plan": "gold"})
    async with client(build(store)) as c:
        response = await c.get("/plan", headers={"X-IBM-Client-Id": key.client_id})
        await manager.update_key("orders", key.client_id, enabled=False)
        refused = await c.get("/plan", headers={"X-IBM-Client-Id": key.client_id})
    assert response.json() == {"plan": "gold", "enabled": True}
    assert refused.status_code == 401
    assert refused.json()["moreInformation"] == "Client id disabled."


async def test_external_key_without_secret_passes(store: MemoryStore) -> None:
    """An external key without a secret needs only its client id, also through the dependency."""
    key = await issue(store, "external")
    async with client(build(store)) as c:
        response = await c.get("/whoami", headers={"X-IBM-Client-Id": key.client_id})
    assert response.json()["kind"] == "external"


async def test_keyguard_still_refuses_before_the_handler(store: MemoryStore) -> None:
    """Without a key the middleware answers 401 in IBM's format before any handler runs."""
    await issue(store)
    async with client(build(store)) as c:
        response = await c.get("/whoami")
    assert response.status_code == 401
    assert response.json()["moreInformation"] == "Client id missing."


async def test_route_without_keyguard_fails_loudly(store: MemoryStore) -> None:
    """Asking for the key where KeyGuard did not run is a configuration error, never a pass."""
    async with client(build(store), raise_app_exceptions=True) as c:
        with pytest.raises(ConfigurationError, match="exclude_paths"):
            await c.get("/open")


async def test_custom_header_names(store: MemoryStore) -> None:
    """``key_dependency`` declares the header names KeyGuard was configured with."""
    key = await issue(store)
    assert key.secret is not None
    app = FastAPI()
    app.add_middleware(
        KeyGuard,
        store=store,
        api="orders",
        client_id_header="X-Api-Id",
        client_secret_header="X-Api-Key",
        exclude_paths=["/openapi.json"],
    )

    @app.get("/whoami")
    async def whoami(key: CustomKey) -> dict[str, str]:
        return {"name": key.name}

    async with client(app) as c:
        schemes = (await c.get("/openapi.json")).json()["components"]["securitySchemes"]
        response = await c.get(
            "/whoami", headers={"X-Api-Id": key.client_id, "X-Api-Key": key.secret}
        )
    assert {scheme["name"] for scheme in schemes.values()} == {"X-Api-Id", "X-Api-Key"}
    assert response.json() == {"name": "Acme internal"}


def test_missing_fastapi_names_the_extra(tmp_path: Path) -> None:
    """Without FastAPI installed, importing the helper says which extra to install."""
    (tmp_path / "fastapi").mkdir()
    (tmp_path / "fastapi" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    code = (
        "from keyguard.errors import ConfigurationError\n"
        "try:\n    import keyguard.fastapi\n"
        "except ConfigurationError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path)},
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "keyguard.fastapi needs: pip install 'keyguard[fastapi]'"


def fresh(module: str) -> ModuleType:
    """A freshly imported example (each import opens its own memory store)."""
    return importlib.reload(importlib.import_module(module))


async def test_example_app_works(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The example prints a key that opens /orders, serves /docs, and documents the schemes
    as KeyGuard requires them (the id, with the secret or alone) and its refusals."""
    monkeypatch.setenv("KEYGUARD_STORE", "memory://")
    app = fresh("examples.fastapi_security").app
    async with app.router.lifespan_context(app):
        printed = capsys.readouterr().out
        client_id = printed.split("ClientId:")[1].split()[0]
        secret = printed.split("ClientSecret:")[1].split()[0]
        async with client(app) as c:
            ok = await c.get(
                "/orders", headers={"X-IBM-Client-Id": client_id, "X-IBM-Client-Secret": secret}
            )
            docs = await c.get("/docs")
            document = (await c.get("/openapi.json")).json()
    assert ok.json() == {"orders": [], "caller": "example", "kind": "internal"}
    assert docs.status_code == 200
    assert set(document["components"]["securitySchemes"]) == {"ClientId", "ClientSecret"}
    orders = document["paths"]["/orders"]["get"]
    assert orders["security"] == [{"ClientId": [], "ClientSecret": []}, {"ClientId": []}]
    assert {"401", "429", "503"} <= set(orders["responses"])
