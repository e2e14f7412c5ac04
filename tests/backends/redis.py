"""How the test suite opens a Redis store: the machine's Redis, a fresh key prefix per test.

The server is shared (by parallel runs, by other apps), so nothing is ever
flushed: each store writes under its own random prefix, and the keys under
it are deleted afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from keyguard.stores.redis import RedisStore
from tests.backends.servers import require_server


def unique_prefix() -> str:
    """A key prefix no other test uses: ``kgtest:<random>:``."""
    return f"kgtest:{secrets.token_hex(6)}:"


async def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` on the Redis at ``url`` (SCAN: test cleanup only)."""
    async with Redis.from_url(url) as client:
        doomed = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if doomed:
            await client.delete(*doomed)


@asynccontextmanager
async def open_redis_test_store(
    backend: str, tmp_path: Path, **options: Any
) -> AsyncIterator[RedisStore]:
    """An empty ``RedisStore`` on the test Redis under a unique prefix, cleaned up afterwards.

    ``options`` go to ``RedisStore.from_url`` (``timeout``, client options).
    """
    assert backend == "redis"
    url = require_server("redis")
    prefix = unique_prefix()
    store = RedisStore.from_url(url, prefix=prefix, **options)
    try:
        yield store
    finally:
        await store.aclose()
        await delete_prefixed(url, prefix)
