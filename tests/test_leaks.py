"""Nothing leaks: secrets, hashes and the management token stay out of logs, reprs,
exception messages, problem details and listings — through whole flows, every logger at DEBUG."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from keyguard import KeyGuard, KeyManager, KeyStore, management_app
from keyguard.cli import main as cli_main
from keyguard.errors import KeyGuardError
from keyguard.idtags import IdTags
from keyguard.stores import CachedStore
from keyguard.stores.base import IdTagKeys

pytestmark = pytest.mark.anyio

TOKEN = "leak-test-admin-token-0123456789"
# Libraries set their own loggers' levels (SQLAlchemy's to WARNING), so the root logger's
# level alone does not reach them: each is set to DEBUG by name.
LOGGERS = (
    "",
    "keyguard",
    "sqlalchemy",
    "sqlalchemy.engine",
    "sqlalchemy.pool",
    "sqlalchemy.dialects",
    "aiosqlite",
    "asyncpg",
    "asyncmy",
    "redis",
)


def every_logger_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Every logger keyguard or its drivers may write to, at DEBUG, captured by ``caplog``."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def test_full_flow_leaks_nothing(store: KeyStore, caplog: pytest.LogCaptureFixture) -> None:
    """Create, secure, use, fail and delete keys over HTTP on every store: no secret, hash or
    token shows anywhere but in the one answer that issues a secret."""
    every_logger_at_debug(caplog)
    cached = CachedStore(store, ttl=5)
    app = Starlette(
        routes=[Route("/hello", hello), Mount("/admin", management_app(cached, token=TOKEN))]
    )
    app.add_middleware(KeyGuard, store=cached, api="orders", exclude_paths=["/admin/*"])
    seen: list[str] = []  # everything a client or operator could read, but the issuing answers
    issued: list[str] = []
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as c:
        assert (await c.put("/admin/apis/orders", json={"exposed": True})).status_code == 200
        created = await c.post(
            "/admin/apis/orders/keys", json={"name": "Staff", "kind": "internal"}
        )
        issued.append(created.json()["secret"])
        external = await c.post(
            "/admin/apis/orders/keys", json={"name": "Acme", "kind": "external"}
        )
        ext_id = external.json()["client_id"]
        set_secret = await c.put(f"/admin/apis/orders/keys/{ext_id}/secret")
        issued.append(set_secret.json()["secret"])
        # A roll with a grace period keeps the previous secret's hash: it must not show either.
        rolled = await c.put(f"/admin/apis/orders/keys/{ext_id}/secret", json={"grace_seconds": 60})
        issued.append(rolled.json()["secret"])
        rolled_record = await store.get_key("orders", ext_id)
        assert rolled_record is not None
        assert rolled_record.previous_secret_hash is not None
        patched = await c.patch(f"/admin/apis/orders/keys/{ext_id}", json={"meta": {"plan": "x"}})
        seen.append(patched.text)
        int_id = created.json()["client_id"]
        for headers in (
            {"X-IBM-Client-Id": int_id, "X-IBM-Client-Secret": issued[0]},
            {"X-IBM-Client-Id": int_id, "X-IBM-Client-Secret": issued[1]},
            {"X-IBM-Client-Id": ext_id, "X-IBM-Client-Secret": issued[1]},
            {"X-IBM-Client-Id": ext_id},
        ):
            seen.append((await c.get("/hello", headers=headers)).text)
        for path in ("/admin/apis", "/admin/apis/orders"):
            seen.append((await c.get(path)).text)
        listing = (await c.get("/admin/apis/orders/keys")).json()
        seen.append(json.dumps(listing))
        seen.append((await c.get(f"/admin/apis/orders/keys/{int_id}")).text)
        # Errors: rule broken, bad body (echoing a client-chosen secret), wrong token.
        seen.append((await c.put(f"/admin/apis/orders/keys/{int_id}/secret")).text)
        bad = await c.post(
            "/admin/apis/orders/keys", json={"name": "X", "kind": "internal", "secret": issued[0]}
        )
        assert bad.status_code == 422
        seen.append(bad.text)
        wrong = await c.get("/admin/apis", headers={"Authorization": f"Bearer {TOKEN}x"})
        seen.append(wrong.text + str(wrong.headers))
        seen.append((await c.delete(f"/admin/apis/orders/keys/{ext_id}")).text)
        # R12: the audit log records every change above, and none of its secrets or hashes.
        audit = await c.get("/admin/audit", params={"limit": 1000})
        actions = [event["action"] for event in audit.json()["events"]]
        assert actions.count("key.secret") == 2
        assert {"api.expose", "key.create", "key.update", "key.delete"} <= set(actions)
        seen.append(audit.text)
    records = [*await store.list_keys("orders"), rolled_record]  # (that one is deleted)
    hashes = [h for r in records for h in (r.secret_hash, r.previous_secret_hash) if h]
    assert hashes
    seen.append(repr(await store.list_keys("orders")) + repr(cached) + repr(store))
    seen.append(repr(await store.list_audit(limit=1000)))
    shown = "\n".join(seen)
    assert "secret_hash" not in shown  # logged SQL may name the column; nothing shown may
    logged = "\n".join(r.getMessage() + repr(r.args) + str(r.exc_info) for r in caplog.records)
    text = shown + "\n" + logged
    # The client id tag key (made by the first key creation above) shows nowhere either.
    assert isinstance(store, IdTagKeys)
    tag_key = await store.id_tag_key()
    for secret in [*issued, *hashes, TOKEN, tag_key.hex(), repr(tag_key)[2:-1]]:
        assert secret not in text
    assert "$pbkdf2" not in text
    assert set(listing["keys"][0]) == {
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
    }


async def test_errors_and_reprs_leak_nothing(manager: KeyManager) -> None:
    """Exceptions about keys never carry a secret or hash, whatever the operation."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    assert key.secret is not None
    record = await manager.store.get_key("orders", key.client_id)
    assert record is not None
    assert record.secret_hash is not None
    messages = [repr(key), str(key), repr(record), repr(manager), repr(manager.hasher)]
    messages.append(repr(IdTags(manager.store)) + repr(manager.store))
    for attempt in (
        manager.set_secret("orders", key.client_id),
        manager.create_key("orders", name="staff", kind="internal"),
        manager.delete_key("orders", "0" * 32),
        manager.get_key("elsewhere", key.client_id),
    ):
        with pytest.raises(KeyGuardError) as info:
            await attempt
        messages.append(str(info.value) + repr(info.value))
    text = "\n".join(messages)
    assert key.secret not in text
    assert record.secret_hash not in text
    assert isinstance(manager.store, IdTagKeys)
    tag_key = await manager.store.id_tag_key()
    assert tag_key.hex() not in text
    assert repr(tag_key)[2:-1] not in text


def test_cli_leaks_nothing_but_the_issued_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the command line, the secret is printed once on stdout when issued; it is in no
    other output and in no log record."""
    every_logger_at_debug(caplog)
    store = ["--store", f"sqlite:///{tmp_path / 'keys.db'}"]
    assert cli_main([*store, "apis", "expose", "orders"]) == 0
    capsys.readouterr()
    assert (
        cli_main(
            [*store, "--json", "keys", "create", "orders", "--name", "S", "--kind", "internal"]
        )
        == 0
    )
    issued = json.loads(capsys.readouterr().out)["secret"]
    for argv in (
        ["keys", "list", "orders"],
        ["--json", "keys", "list", "orders"],
        ["apis", "list"],
        ["keys", "create", "orders", "--name", "s", "--kind", "internal"],  # duplicate: exit 1
        ["audit"],
        ["--json", "audit"],
    ):
        cli_main([*store, *argv])
    out = capsys.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for text in (out.out, out.err, logs):
        assert issued not in text
        assert "$pbkdf2" not in text
