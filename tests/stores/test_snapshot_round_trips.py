"""``snapshot`` is one round trip: one SQL statement, one Redis script — counted by the
driver's statement hook and by a private Redis server's command statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio import Redis

from keyguard.stores.redis import RedisStore
from tests.backends.sql import SQL_BACKENDS, open_sql_test_store
from tests.helpers import expose, record
from tests.stores.test_redis import PrivateRedis, command_calls, private_redis
from tests.stores.test_sql import counting_statements

pytestmark = pytest.mark.anyio

__all__ = ["private_redis"]  # (the fixture, imported to be used here)


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_snapshot_is_one_statement(backend: str, tmp_path: Path) -> None:
    """A snapshot sends exactly one SQL statement, for a small API (keys joined in), a large
    one (keys left out) and an unknown one alike."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        for i in range(3):
            await store.insert_key(record(name=f"Key {i}"))
        for api, max_keys, keys in (("orders", 10, 3), ("orders", 2, None), ("nobody", 10, None)):
            with counting_statements(store.engine) as sent:
                _, records = await store.snapshot(api, max_keys=max_keys)
            assert len(sent) == 1, sent
            assert (None if records is None else len(records)) == keys


async def test_snapshot_is_one_redis_script(private_redis: PrivateRedis) -> None:
    """A snapshot is one script call: HMGET of the API's fields, and HGETALL of its hash
    only when it is small — a large API's keys are never read."""
    await private_redis.start()
    store = RedisStore.from_url(private_redis.url)
    try:
        async with Redis.from_url(private_redis.url) as admin:
            await expose(store)
            for i in range(3):
                await store.insert_key(record(name=f"Key {i}"))
            await store.snapshot("orders", max_keys=10)  # the script is loaded: no retry below
            await admin.config_resetstat()
            _, small = await store.snapshot("orders", max_keys=10)
            assert small is not None
            assert len(small) == 3
            assert await command_calls(admin) == {"evalsha": 1, "hmget": 1, "hgetall": 1}
            await admin.config_resetstat()
            assert (await store.snapshot("orders", max_keys=2))[1] is None
            assert await command_calls(admin) == {"evalsha": 1, "hmget": 1}
    finally:
        await store.aclose()
