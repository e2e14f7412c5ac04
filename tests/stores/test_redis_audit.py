"""The Redis store's audit log: events live in the API's slot and prune themselves."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
from redis.crc import key_slot

from keyguard.audit import cutoff_id, new_event
from keyguard.errors import ConfigurationError
from keyguard.models import KeyChanges, utcnow
from keyguard.stores.redis import RedisStore
from tests.backends.redis import open_redis_test_store
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio


async def test_events_are_kept_in_the_apis_slot_and_expire(tmp_path: Path) -> None:
    """A key's change writes its event to the API's and the key's sorted sets, both in the
    slot of the API's hash (so one script touches one Cluster slot), each expiring no later
    than the retention after its last event."""
    async with open_redis_test_store("redis", tmp_path, audit_retention=2) as store:
        await expose(store)
        key = record(name="Acme")
        event = new_event(actor="t", action="key.create", api="orders", client_id=key.client_id)
        await store.insert_key(key, audit=event)
        redis = store.client
        found = [k async for k in redis.scan_iter(match=f"{store.prefix}*audit*")]
        names = sorted(k.decode() if isinstance(k, bytes) else k for k in found)
        api_hash = f"{store.prefix}{{orders}}"
        assert names == [
            f"{store.prefix}audit:apis",
            f"{api_hash}:audit",
            f"{api_hash}:audit:{key.client_id}",
        ]
        for name in names[1:]:
            assert key_slot(name.encode()) == key_slot(api_hash.encode())
            assert 0 < await redis.ttl(name) <= 2 * 86_400
            assert await redis.zcard(name) == 1


async def test_the_change_script_trims_events_past_retention(tmp_path: Path) -> None:
    """An event older than the retention is removed from the sorted sets by the next
    change's own script, not only hidden from listings."""
    async with open_redis_test_store("redis", tmp_path) as store:
        await expose(store)
        key = record(name="Acme")
        await store.insert_key(key)
        fresh = new_event(actor="t", action="key.update", api="orders", client_id=key.client_id)
        old_id = cutoff_id(timedelta(0), utcnow() - timedelta(days=401)) + "0" * 12
        old = dataclasses.replace(fresh, id=old_id)
        await store.update_key("orders", key.client_id, KeyChanges(enabled=False), audit=old)
        zset = f"{store.prefix}{{orders}}:audit"
        assert await store.client.zcard(zset) == 0  # trimmed in the very script that wrote it
        await store.update_key("orders", key.client_id, KeyChanges(enabled=True), audit=fresh)
        assert await store.client.zcard(zset) == 1
        assert [e.id for e in await store.list_audit(client_id=key.client_id)] == [fresh.id]


async def test_a_retention_reaching_before_1970_keeps_every_event(tmp_path: Path) -> None:
    """A retention longer than the time since 1970 ("keep them all": timedelta.max, a
    million days) writes, trims nothing and lists events; it raised OverflowError (a 500
    at the front doors) on every change and listing."""
    for retention in (timedelta.max, timedelta(days=10**6)):
        async with open_redis_test_store("redis", tmp_path, audit_retention=retention) as store:
            event = new_event(actor="t", action="api.expose", api="orders")
            await store.upsert_api(
                "orders",
                exposed=True,
                max_keys_per_kind=None,
                default_max_keys_per_kind=5,
                audit=event,
            )
            assert [e.id for e in await store.list_audit()] == [event.id]
            assert [e.id for e in await store.list_audit(api="orders")] == [event.id]


@pytest.mark.parametrize("retention", [1e12, float("inf")])
def test_a_retention_in_days_past_timedeltas_range_is_a_configuration_error(
    retention: float,
) -> None:
    """A number of days no ``timedelta`` holds is a ConfigurationError when the store is
    opened, not an OverflowError."""
    with pytest.raises(ConfigurationError, match="audit_retention"):
        RedisStore.from_url("redis://127.0.0.1:6379/0", audit_retention=retention)
