"""docs/redis-store.md's ACL is enough: a Redis user given exactly the commands the docs list
runs every store call a deployment makes (SPEC §3's writes, pages with a name filter, the
tag key, usage, the audit log, the change feed), on a private redis-server.

The ACL is read from the docs themselves, so a store call that starts using a command
they do not list (NOPERM: every such call a 503 in a locked-down deployment) fails here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from keyguard import KeyInfo, KeyManager
from keyguard.models import utcnow
from keyguard.stores import CachedStore
from keyguard.stores.redis import RedisStore
from keyguard.usage import UsageCount
from tests.helpers import eventually
from tests.stores.test_redis import PrivateRedis

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "redis-store.md"
PASSWORD = "acl-test-password"


def documented_rules() -> list[str]:
    """The rules of the ``ACL SETUSER keyguard …`` block in docs/redis-store.md."""
    found = re.search(r"ACL SETUSER keyguard (.*?)\n\s*```", DOCS.read_text(), re.S)
    assert found, "docs/redis-store.md has no ACL SETUSER keyguard block"
    rules = found.group(1).split()
    assert ">password" in rules
    return [f">{PASSWORD}" if rule == ">password" else rule for rule in rules]


@pytest.fixture
async def locked_down(tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a private Redis as the user ``keyguard`` with the documented rules."""
    server = PrivateRedis(tmp_path)
    await server.start()
    try:
        async with Redis.from_url(server.url) as admin:
            rules = ["keyguard", "reset", *documented_rules()]
            await admin.execute_command("ACL", "SETUSER", *rules)  # type: ignore[no-untyped-call,unused-ignore]
        yield f"redis://keyguard:{PASSWORD}@127.0.0.1:{server.port}/0"
    finally:
        await server.stop()


async def test_the_documented_acl_runs_every_store_call(locked_down: str) -> None:
    store = RedisStore.from_url(locked_down)  # the default prefix, keyguard:, as the ACL's
    cached = CachedStore(store, ttl=600)
    try:
        manager = KeyManager(cached)
        await manager.expose("orders")
        staff = await manager.create_key("orders", name="Staff", kind="internal")
        acme = await manager.create_key("orders", name="Acme", kind="external")
        assert isinstance(
            await manager.authenticate("orders", staff.client_id, staff.secret), KeyInfo
        )
        # The change feed: a 600 s cache hears another store object's change at once.
        other = RedisStore.from_url(locked_down)
        try:
            await KeyManager(other).update_key("orders", acme.client_id, enabled=False)

            async def refused() -> bool:
                return not isinstance(
                    await manager.authenticate("orders", acme.client_id, None), KeyInfo
                )

            with anyio.fail_after(30):
                await eventually(refused)
        finally:
            await other.aclose()
        await manager.set_secret("orders", acme.client_id, grace=60)
        await manager.update_key("orders", acme.client_id, name="Acme Corp", enabled=True)
        page = await manager.page_keys("orders", limit=1, name="corp")
        assert [key.name for key in page.keys] == ["Acme Corp"]
        assert len((await manager.page_keys("orders", limit=1)).keys) == 1
        hour = utcnow().replace(minute=0, second=0, microsecond=0)
        await store.record_usage([UsageCount("orders", staff.client_id, hour, 3, 1, utcnow())])
        usage = await store.read_usage("orders", None, hour - timedelta(hours=1))
        assert sum(count.requests for count in usage) == 3
        await store.prune_usage(hour - timedelta(days=40))
        assert len(await store.list_audit(limit=100)) >= 5
        await manager.delete_key("orders", acme.client_id)
        await manager.delete_api("orders", force=True)
        assert await store.list_apis() == []
    finally:
        await cached.aclose()
