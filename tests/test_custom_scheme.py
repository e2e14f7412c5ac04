"""A non-default passlib scheme, configured once, used alike by every front door."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import httpx
import pytest
from passlib.context import CryptContext
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from keyguard import KeyGuard, KeyManager, MemoryStore, SecretHasher, management_app, open_store

pytestmark = pytest.mark.anyio

TOKEN = "custom-scheme-token-0123456789-ab"


def sha256_crypt() -> CryptContext:
    return CryptContext(schemes=["sha256_crypt"], sha256_crypt__default_rounds=1000)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def test_management_api_issues_secrets_with_the_configured_scheme() -> None:
    """Keys issued through the management API with a custom hasher carry that scheme's hash
    and open the app guarded by the same hasher."""
    store = MemoryStore()
    hasher = SecretHasher(sha256_crypt())
    app = Starlette(
        routes=[
            Route("/hello", hello),
            Mount("/admin", management_app(store, token=TOKEN, hasher=hasher)),
        ]
    )
    app.add_middleware(
        KeyGuard, store=store, api="orders", hasher=hasher, exclude_paths=["/admin/*"]
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=auth
    ) as c:
        await c.put("/admin/apis/orders", json={"exposed": True})
        key = (
            await c.post("/admin/apis/orders/keys", json={"name": "S", "kind": "internal"})
        ).json()
        ok = await c.get(
            "/hello",
            headers={"X-IBM-Client-Id": key["client_id"], "X-IBM-Client-Secret": key["secret"]},
        )
        assert ok.status_code == 200
    record = await store.get_key("orders", key["client_id"])
    assert record is not None
    assert record.secret_hash is not None
    assert record.secret_hash.startswith("$5$rounds=1000$")


async def test_slow_hashing_runs_off_the_event_loop() -> None:
    """With a custom scheme, hashing a new secret (not only checking one) runs in a worker
    thread, so issuing keys never blocks the event loop."""
    context = sha256_crypt()
    threads: list[int] = []
    real_hash = context.hash

    def recording_hash(secret: str) -> str:
        threads.append(threading.get_ident())
        return str(real_hash(secret))

    context.hash = recording_hash
    manager = KeyManager(MemoryStore(), hasher=SecretHasher(context))
    threads.clear()  # the hasher's own dummy hash, made at construction
    await manager.expose("orders")
    await manager.create_key("orders", name="S", kind="internal")
    external = await manager.create_key("orders", name="E", kind="external")
    await manager.set_secret("orders", external.client_id)
    assert len(threads) == 2
    assert threading.get_ident() not in threads


def keyguard(tmp_path: Path, *args: str, scheme: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KEYGUARD_HASH_SCHEME": scheme,
        "KEYGUARD_STORE": f"sqlite:///{tmp_path / 'k.db'}",
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "keyguard"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def test_cli_uses_keyguard_hash_scheme(tmp_path: Path) -> None:
    """KEYGUARD_HASH_SCHEME makes the command line hash new secrets with that scheme; an
    unknown scheme is one clear line and exit code 1."""
    assert keyguard(tmp_path, "apis", "expose", "orders", scheme="sha256_crypt").returncode == 0
    made = keyguard(
        tmp_path,
        "--json",
        "keys",
        "create",
        "orders",
        "--name",
        "S",
        "--kind",
        "internal",
        scheme="sha256_crypt",
    )
    assert made.returncode == 0, made.stderr
    client_id = json.loads(made.stdout)["client_id"]

    async def stored_hash() -> str | None:
        store = open_store(f"sqlite:///{tmp_path / 'k.db'}", cache_ttl=0)
        try:
            record = await store.get_key("orders", client_id)
            return None if record is None else record.secret_hash
        finally:
            await store.aclose()

    assert str(anyio.run(stored_hash)).startswith("$5$")
    bad = keyguard(tmp_path, "keys", "list", "orders", scheme="no-such-scheme")
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
    assert "KEYGUARD_HASH_SCHEME" in bad.stderr
    assert "Traceback" not in bad.stderr
