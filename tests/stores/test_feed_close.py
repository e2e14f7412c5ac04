"""A store closed while a cache watches its change feed (SPEC §11's feed, on every store
that has one): the feed ends with ``StoreClosed``, the cache's watcher stops instead of
retrying for ever, and nothing the feed opened is left open.

redis-py 8.2's pub/sub reconnects a connection it finds closed and subscribes again; a
feed still reading when its store closed the client did so on the closed client, whose
fresh connections nobody closed (a ResourceWarning when collected, in a later test).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from keyguard import KeyStore
from keyguard.errors import StoreClosed
from keyguard.stores import CachedStore, ChangeFeed
from keyguard.stores.redis import RedisStore
from keyguard.stores.redis_cluster import RedisClusterStore
from keyguard.stores.sql import SQLStore
from tests.backends import open_test_store
from tests.backends.sql import same_tables
from tests.helpers import eventually, expose, record

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def second_store(store: KeyStore) -> AsyncIterator[KeyStore]:
    """Another store object over ``store``'s data, closed by the test (the fixture's own
    store stays open to clean up)."""
    if isinstance(store, SQLStore):
        async with same_tables(store) as other:
            yield other
        return
    assert isinstance(store, RedisStore | RedisClusterStore)
    url = store.counter_url
    assert url is not None
    redis = type(store).from_url(url, prefix=store.prefix)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.mark.parametrize("backend", ["postgres", "redis", "cluster"])
async def test_closing_a_watched_store_ends_its_feed_and_the_caches_watcher(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_test_store(backend, tmp_path) as store, second_store(store) as watched:
        await expose(store)
        cached = CachedStore(watched, ttl=600)
        assert await cached.lookup("orders", "made-up") == (True, None)  # starts watching
        key = record()
        await store.insert_key(key)

        async def heard() -> bool:  # a 600 s cache learns of it by the feed only
            return (await cached.lookup("orders", key.client_id))[1] is not None

        await eventually(heard)
        watcher = cached._watcher
        assert watcher is not None
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            await watched.aclose()
            await asyncio.wait_for(asyncio.shield(watcher), 30)
            assert watcher.exception() is None  # it returned: no retrying a closed store
            with contextlib.suppress(StoreClosed):  # (if it reads: the store is closed)
                await cached.lookup("orders", key.client_id)
            assert cached._watcher is watcher  # no watcher started again
            assert isinstance(watched, ChangeFeed)
            with pytest.raises(StoreClosed):
                await watched.watch(lambda api, client_id: None, on_ready=lambda: None)
            gc.collect()
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
        # Closed, not lost: the cache says nothing of a feed lost and retried.
        assert [r.getMessage() for r in caplog.records if "feed" in r.getMessage()] == []


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_a_watch_begun_while_its_store_closes_ends_with_store_closed(
    backend: str, tmp_path: Path
) -> None:
    """A watch that starts while ``aclose()`` waits for the feeds it is ending (a cache's
    watcher retrying just then, say) ends with StoreClosed too: it used to subscribe and
    listen on, on a connection of the closed store's client that nobody closed."""
    async with open_test_store(backend, tmp_path) as store, second_store(store) as watched:
        assert isinstance(watched, ChangeFeed)
        ready = asyncio.Event()
        first = asyncio.create_task(watched.watch(lambda api, cid: None, on_ready=ready.set))
        await asyncio.wait_for(ready.wait(), 30)
        # Runs once aclose() below first waits: for the first feed to end.
        late = asyncio.create_task(watched.watch(lambda api, cid: None, on_ready=lambda: None))
        await watched.aclose()
        for task in (first, late):
            with pytest.raises(StoreClosed):
                await asyncio.wait_for(task, 10)
