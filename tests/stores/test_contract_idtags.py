"""The KeyStore contract for the client id tag key (``IdTagKeys``): run against every store.

Every store keeps one tag key: 32 random bytes, made on first need, the same on every
call, the same for every store object over the same data (racing creators agree), and
never shown in a repr.
"""

from __future__ import annotations

import anyio
import pytest

from keyguard import KeyStore, MemoryStore
from keyguard.stores.base import ID_TAG_KEY_BYTES, IdTagKeys
from keyguard.stores.redis import RedisStore
from keyguard.stores.redis_cluster import RedisClusterStore
from keyguard.stores.sql import SQLStore
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio


def same_data(store: KeyStore) -> KeyStore:
    """Another store object over ``store``'s data (its engine or client, its prefix), as a
    second process would open it; closing it leaves ``store``'s connections open."""
    if isinstance(store, SQLStore):
        return SQLStore(store.engine, table_prefix=store.table_prefix)
    if isinstance(store, RedisStore):
        return RedisStore(store.client, prefix=store.prefix)
    if isinstance(store, RedisClusterStore):
        return RedisClusterStore(store.client, prefix=store.prefix)
    raise AssertionError(f"no second object for {store!r}")


def tag_keys(store: KeyStore) -> IdTagKeys:
    """``store`` as the ``IdTagKeys`` every keyguard store is."""
    assert isinstance(store, IdTagKeys)
    return store


async def test_every_store_keeps_a_tag_key(store: KeyStore) -> None:
    """A store's tag key is 32 bytes, the same on every call, and not all zeros."""
    first = await tag_keys(store).id_tag_key()
    assert isinstance(first, bytes)
    assert len(first) == ID_TAG_KEY_BYTES
    assert first != bytes(ID_TAG_KEY_BYTES)
    assert await tag_keys(store).id_tag_key() == first


async def test_tag_key_is_not_in_repr_or_listings(store: KeyStore) -> None:
    """The tag key shows in no repr and in no listing or record the store returns."""
    await expose(store)
    await store.insert_key(record(name="Acme"))
    key = await tag_keys(store).id_tag_key()
    shown = "\n".join(
        [
            repr(store),
            str(store),
            repr(await store.list_apis()),
            repr(await store.list_keys("orders")),
            repr(await store.list_audit(limit=100)),
        ]
    )
    assert key.hex() not in shown
    assert repr(key) not in shown


async def test_tag_key_is_shared_by_store_objects_over_one_store(store: KeyStore) -> None:
    """Store objects racing to make the key of one store agree on it, whoever wins; a
    later one reads the same key back."""
    if isinstance(store, MemoryStore):
        pytest.skip("each memory store is its own store: there is nothing to share")
    # The tables first: six store objects creating them at once is another test's race
    # (test_sql.py), and on a loaded machine it alone can take the whole timeout.
    await store.list_apis()
    racers = [same_data(store) for _ in range(6)]
    found: list[bytes] = []

    async def fetch(racer: KeyStore) -> None:
        found.append(await tag_keys(racer).id_tag_key())

    try:
        async with anyio.create_task_group() as group:
            for racer in racers:
                group.start_soon(fetch, racer)
        assert len(found) == len(racers)
        assert len(set(found)) == 1
        assert await tag_keys(store).id_tag_key() == found[0]
        later = same_data(store)
        assert await tag_keys(later).id_tag_key() == found[0]
        await later.aclose()
    finally:
        for racer in racers:
            await racer.aclose()


async def test_tag_key_is_read_once_per_store_object(store: KeyStore) -> None:
    """Once known, the tag key comes from memory: it stays the same even if the stored
    copy could no longer be read (the store object is closed)."""
    if isinstance(store, MemoryStore):
        pytest.skip("the memory store's key is in memory anyway")
    other = same_data(store)
    key = await tag_keys(other).id_tag_key()
    await other.aclose()  # every store call of a closed store raises StoreUnavailable
    assert await tag_keys(other).id_tag_key() == key


async def test_separate_memory_stores_have_their_own_keys() -> None:
    """Two memory stores are two stores: each has its own tag key."""
    first, second = MemoryStore(), MemoryStore()
    assert await first.id_tag_key() != await second.id_tag_key()
