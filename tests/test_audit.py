"""The audit log through its front doors (SPEC §10, R12): ``KeyManager`` records every change
with its actor, and the management API's tokens (named, read-only) decide who that is."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyguard import KeyManager, KeyStore, MemoryStore, ReadOnly, management_app
from keyguard.errors import ConfigurationError, DuplicateName, InvalidRequest, KeyNotFound

pytestmark = pytest.mark.anyio

ADMIN = "audit-test-admin-token-0123456789ab"
OPS = "audit-test-ops-token-0123456789abcd"
VIEWER = "audit-test-viewer-token-0123456789a"


async def test_every_change_is_recorded_with_its_actor(store: KeyStore) -> None:
    """Each changing method records one event naming its action, actor (the manager's
    default or the call's own), API, key and changed fields; no secret, no hash."""
    manager = KeyManager(store, actor="deploy-script")
    await manager.expose("orders", max_keys_per_kind=3)
    staff = await manager.create_key("orders", name="Staff", kind="internal")
    acme = await manager.create_key(
        "orders", name="Acme", kind="external", meta={"plan": "gold"}, rate_limits=["5/second"]
    )
    await manager.update_key(
        "orders", acme.client_id, name="Acme Corp", enabled=False, actor="alice"
    )
    first = await manager.set_secret("orders", acme.client_id)
    second = await manager.set_secret("orders", acme.client_id, grace=60)
    await manager.set_rate_limits("orders", ["100/minute"])
    await manager.update_api("orders", max_keys_per_kind=4)
    await manager.unexpose("orders", actor="bob")
    await manager.delete_key("orders", staff.client_id)
    await manager.delete_api("orders", force=True)
    events = (await manager.audit(limit=100)).events
    assert [(e.action, e.actor) for e in reversed(events)] == [
        ("api.expose", "deploy-script"),
        ("key.create", "deploy-script"),
        ("key.create", "deploy-script"),
        ("key.update", "alice"),
        ("key.secret", "deploy-script"),
        ("key.secret", "deploy-script"),
        ("api.update", "deploy-script"),
        ("api.update", "deploy-script"),
        ("api.unexpose", "bob"),
        ("key.delete", "deploy-script"),
        ("api.delete", "deploy-script"),
    ]
    by_action = {e.action: e for e in reversed(events)}  # the last of each action
    assert all(e.api == "orders" for e in events)
    assert events[-1].changes == {"exposed": True, "max_keys_per_kind": 3}
    created = events[-3]
    assert created.client_id == acme.client_id
    assert created.name == "Acme"
    assert created.changes == {
        "kind": "external",
        "name": "Acme",
        "enabled": True,
        "expires_at": None,
        "meta": {"plan": "gold"},
        "rate_limits": [{"limit": 5, "per": "second"}],
    }
    renamed = by_action["key.update"]
    assert renamed.name == "Acme"  # as it was called when the change was made
    assert renamed.changes == {"name": "Acme Corp", "enabled": False}
    rolled = [e for e in events if e.action == "key.secret"]
    assert rolled[0].name == "Acme Corp"
    assert rolled[0].changes["previous_secret_expires_at"] is not None
    assert rolled[1].changes == {"previous_secret_expires_at": None}
    assert events[4].changes == {"rate_limits": [{"limit": 100, "per": "minute"}]}
    assert by_action["key.delete"].client_id == staff.client_id
    assert by_action["key.delete"].name == "Staff"
    # R12: nothing secret in the log.
    text = json.dumps([e.as_json() for e in events])
    assert staff.secret is not None
    for secret in (staff.secret, str(first), str(second)):
        assert secret not in text
    assert "$pbkdf2" not in text
    assert "secret_hash" not in text


async def test_refused_or_empty_changes_record_nothing(manager: KeyManager) -> None:
    """A change a rule refuses, one on a key that does not exist, or an update changing
    nothing (of a key, or of an API that exists) leaves the log as it was."""
    await manager.expose("orders")
    acme = await manager.create_key("orders", name="Acme", kind="external")
    beta = await manager.create_key("orders", name="Beta", kind="external")
    before = (await manager.audit()).events
    with pytest.raises(DuplicateName):
        await manager.create_key("orders", name="acme", kind="external")
    with pytest.raises(DuplicateName):
        await manager.update_key("orders", beta.client_id, name="ACME")
    with pytest.raises(KeyNotFound):
        await manager.delete_key("orders", "0" * 32)
    with pytest.raises(KeyNotFound):
        await manager.update_key("orders", "0" * 32, enabled=False)
    with pytest.raises(InvalidRequest):
        await manager.update_key("orders", acme.client_id, enabled=False, actor="")
    await manager.update_key("orders", acme.client_id)
    with pytest.raises(InvalidRequest):
        await manager.update_api("orders", actor="")
    assert (await manager.update_api("orders")).exposed  # PUT /apis/orders with {}
    assert (await manager.audit()).events == before
    assert (await manager.get_key("orders", acme.client_id)).enabled


async def test_an_api_created_with_no_fields_is_recorded(manager: KeyManager) -> None:
    """``update_api`` with no fields still creates an API never seen, and records that."""
    api = await manager.update_api("fresh", actor="ops")
    assert (api.exposed, api.max_keys_per_kind) == (False, 5)
    events = (await manager.audit("fresh")).events
    assert [(e.action, e.actor, dict(e.changes)) for e in events] == [("api.update", "ops", {})]


async def test_pages_and_filters(manager: KeyManager) -> None:
    """``audit`` pages newest first through ``next``/``before`` and filters by API and key;
    a bad cursor or limit is an invalid request."""
    await manager.expose("orders")
    await manager.expose("billing")
    keys = [await manager.create_key("orders", name=f"K{i}", kind="external") for i in range(5)]
    everything = (await manager.audit(limit=1000)).events
    assert len(everything) == 7
    seen: list[str] = []
    page = await manager.audit(limit=3)
    while True:
        seen += [e.id for e in page.events]
        if page.next is None:
            break
        page = await manager.audit(limit=3, before=page.next)
    assert seen == [e.id for e in everything]
    assert seen == sorted(seen, reverse=True)
    assert [e.action for e in (await manager.audit("billing")).events] == ["api.expose"]
    mine = await manager.audit(client_id=keys[2].client_id)
    assert [(e.action, e.name) for e in mine.events] == [("key.create", "K2")]
    assert mine.next is None
    for bad in ({"limit": 0}, {"limit": 1001}, {"before": "nope"}, {"limit": True}):
        with pytest.raises(InvalidRequest):
            await manager.audit(**bad)
    with pytest.raises(InvalidRequest):
        await manager.audit("not a name")


@asynccontextmanager
async def retaining(backend: str, tmp_path: Path, retention: timedelta) -> AsyncIterator[KeyStore]:
    """A store of kind ``backend`` keeping audit events for ``retention``."""
    if backend == "memory":
        yield MemoryStore(audit_retention=retention)
        return
    if backend == "sqlite":
        from tests.backends.sql import open_sql_test_store

        async with open_sql_test_store(backend, tmp_path, audit_retention=retention) as store:
            yield store
        return
    from tests.backends.redis import open_redis_test_store

    async with open_redis_test_store(backend, tmp_path, audit_retention=retention) as redis:
        yield redis


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
@pytest.mark.parametrize("retention", [timedelta(days=10**6), timedelta.max])
async def test_a_retention_reaching_before_1970_keeps_every_event(
    backend: str, retention: timedelta, tmp_path: Path
) -> None:
    """A retention longer than the time since the epoch ("keep everything") lets changes
    and audit reads work as usual, instead of each one failing (after the change was
    made, on memory and SQL) with an OverflowError."""
    async with retaining(backend, tmp_path, retention) as store:
        manager = KeyManager(store)
        await manager.expose("orders")
        await manager.create_key("orders", name="Acme", kind="external")
        events = (await manager.audit()).events
        assert [e.action for e in events] == ["key.create", "api.expose"]


@pytest.mark.parametrize("bad", [float("inf"), 1e10, 10**9, float("nan")])
def test_a_retention_no_timedelta_holds_is_a_configuration_error(bad: float) -> None:
    """A number of days past what a ``timedelta`` holds (or infinity) is refused at
    construction with a ConfigurationError, not an OverflowError."""
    with pytest.raises(ConfigurationError, match="audit_retention"):
        MemoryStore(audit_retention=bad)


def client(app: Any, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {token}"},
    )


async def test_named_tokens_are_the_actors_and_read_only_tokens_only_read() -> None:
    """Changes made with a named token are recorded as ``token:<name>``; a read-only token
    reads everything, the audit log included, and every change it asks for is 403
    ``forbidden`` and changes nothing."""
    app = management_app(MemoryStore(), tokens={"ops": OPS, "dashboard": ReadOnly(VIEWER)})
    async with client(app, OPS) as ops, client(app, VIEWER) as viewer:
        assert (await ops.put("/apis/orders", json={"exposed": True})).status_code == 200
        created = await ops.post("/apis/orders/keys", json={"name": "Acme", "kind": "external"})
        client_id = created.json()["client_id"]
        for method, path, body in (
            ("PUT", "/apis/orders", {"exposed": False}),
            ("DELETE", "/apis/orders", None),
            ("POST", "/apis/orders/keys", {"name": "X", "kind": "internal"}),
            ("PATCH", f"/apis/orders/keys/{client_id}", {"enabled": False}),
            ("PUT", f"/apis/orders/keys/{client_id}/secret", None),
            ("DELETE", f"/apis/orders/keys/{client_id}", None),
        ):
            refused = await viewer.request(method, path, json=body)
            assert refused.status_code == 403, (method, path)
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["code"] == "forbidden"
        assert (await viewer.get("/apis/orders")).json()["exposed"] is True
        assert (await viewer.get(f"/apis/orders/keys/{client_id}")).json()["enabled"] is True
        listing = (await viewer.get("/audit")).json()
        assert [(e["action"], e["actor"]) for e in listing["events"]] == [
            ("key.create", "token:ops"),
            ("api.expose", "token:ops"),
        ]
        assert listing["next"] is None
        assert (await viewer.get("/whoami")).json() == {
            "token": "dashboard",
            "actor": "token:dashboard",
            "read_only": True,
        }
        assert (await ops.get("/whoami")).json()["read_only"] is False


async def test_audit_route_pages_and_filters() -> None:
    """``GET /audit`` answers ``{"events", "next"}`` newest first, pages with ``before``,
    filters by ``api`` and ``client_id``, and refuses bad parameters with 422."""
    app = management_app(MemoryStore(), token=ADMIN)
    async with client(app, ADMIN) as admin:
        await admin.put("/apis/orders", json={"exposed": True})
        await admin.put("/apis/billing", json={"exposed": True})
        ids = []
        for name in ("A", "B", "C"):
            made = await admin.post("/apis/orders/keys", json={"name": name, "kind": "external"})
            ids.append(made.json()["client_id"])
        first = (await admin.get("/audit", params={"limit": 2})).json()
        assert [e["name"] for e in first["events"]] == ["C", "B"]
        assert all(e["actor"] == "token:admin" for e in first["events"])
        second = (await admin.get("/audit", params={"limit": 2, "before": first["next"]})).json()
        assert [e["name"] for e in second["events"]] == ["A", None]
        assert [e["api"] for e in second["events"]] == ["orders", "billing"]
        billing = (await admin.get("/audit", params={"api": "billing"})).json()
        assert [e["action"] for e in billing["events"]] == ["api.expose"]
        one = (await admin.get("/audit", params={"client_id": ids[1]})).json()
        assert [e["name"] for e in one["events"]] == ["B"]
        for bad in (
            {"limit": "0"},
            {"limit": "x"},
            {"before": "zz"},
            {"api": "no such/api"},
            {"sort": "asc"},
        ):
            answer = await admin.get("/audit", params=bad)
            assert answer.status_code == 422, bad
            assert answer.json()["code"] == "invalid_request"
        repeated = await admin.get("/audit?limit=1&limit=2")
        assert repeated.status_code == 422


async def test_every_token_is_checked() -> None:
    """Tokens shorter than 32 characters, read-only ones included, unnamed or shared ones,
    or token= with tokens=, are refused at start-up; a wrong token is 401 whichever names
    exist, and ReadOnly hides its token in its repr."""
    bad: dict[str, Any]
    for bad in (
        {"tokens": {"ops": OPS, "dashboard": ReadOnly("short")}},
        {"tokens": {"ops": "x" * 31}},
        {"tokens": {}},
        {"tokens": {"": OPS}},
        {"tokens": {"a b": OPS}},
        {"tokens": {"ops": OPS, "ops2": OPS}},
        {"token": ADMIN, "tokens": {"ops": OPS}},
    ):
        with pytest.raises(ConfigurationError) as caught:
            management_app(MemoryStore(), **bad)
        assert OPS not in str(caught.value)
    assert VIEWER not in repr(ReadOnly(VIEWER))
    app = management_app(MemoryStore(), tokens={"ops": OPS, "dashboard": ReadOnly(VIEWER)})
    for wrong in (OPS + "x", VIEWER[:-1], ADMIN):
        async with client(app, wrong) as c:
            answer = await c.get("/apis")
            assert answer.status_code == 401
            assert answer.json()["code"] == "unauthorized"
    async with client(app, OPS) as c:
        assert (await c.get("/apis")).status_code == 200


async def test_console_files_need_no_token() -> None:
    """The console's page is served without a token, as before, whatever tokens exist."""
    app = management_app(MemoryStore(), tokens={"dashboard": ReadOnly(VIEWER)})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/audit")).status_code == 401


async def test_every_token_is_compared_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The presented token is compared with every configured token, whichever matches and
    whether any does: no early exit tells which one it was."""
    import hmac

    compared: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared[-1] += 1
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # the module auth.py calls into
    third = "audit-test-third-token-0123456789a"
    app = management_app(
        MemoryStore(), tokens={"ops": OPS, "dashboard": ReadOnly(VIEWER), "third": third}
    )
    for presented in (OPS, VIEWER, third, ADMIN):
        compared.append(0)
        async with client(app, presented) as c:
            await c.get("/apis")
    assert compared == [3, 3, 3, 3]
