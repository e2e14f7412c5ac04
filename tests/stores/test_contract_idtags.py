"""The KeyStore contract for the client id tag key (``IdTagKeys``): run against every store.

Every store keeps one tag key: 32 random bytes, made on first need, the same on every
call, the same for every store object over the same data (racing creators agree), and
never shown in a repr.
"""

from __future__ import annotations

import logging
import secrets

import anyio
import pytest
from sqlalchemy import text

from keyguard import KeyInfo, KeyManager, KeyStore, MemoryStore
from keyguard.idtags import IdTags
from keyguard.manager import Denial
from keyguard.secrets import CLIENT_ID_LENGTH, LEGACY_CLIENT_ID_LENGTH, new_client_id
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


async def lose_tag_key(store: KeyStore) -> None:
    """Delete ``store``'s tag key where it is kept, as an evicting Redis or a careless
    operator would."""
    if isinstance(store, SQLStore):
        async with store.engine.begin() as conn:
            await conn.execute(
                text(f"DELETE FROM {store.table_prefix}meta WHERE name = 'id_tag_key'")  # noqa: S608
            )
    elif isinstance(store, RedisStore | RedisClusterStore):
        assert await store.client.delete(f"{store.prefix}idtag") == 1
    else:
        raise AssertionError(f"no tag key to lose in {store!r}")


async def test_a_lost_tag_key_leaves_every_issued_key_working(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The tag key deleted (evicted) while the store holds tagged ids: a store object that
    starts afterwards makes a new key, marks the old one lost and logs an ERROR, and the
    keys issued under the old key are still admitted there — only a made-up id now costs
    a read, as a legacy id does. Later store objects read the mark (a WARNING)."""
    if isinstance(store, MemoryStore):
        pytest.skip("a memory store's tag key lives and dies with its keys")
    issued = await KeyManager(store).expose("orders")
    assert issued.exposed
    key = await KeyManager(store).create_key("orders", name="Acme", kind="internal")
    assert len(key.client_id) == CLIENT_ID_LENGTH
    await lose_tag_key(store)
    after = same_data(store)
    later = same_data(store)
    try:
        with caplog.at_level(logging.WARNING, logger="keyguard"):
            manager = KeyManager(after)
            assert isinstance(
                await manager.authenticate("orders", key.client_id, key.secret), KeyInfo
            )
            lost = [r for r in caplog.records if "tag key was missing" in r.getMessage()]
            assert [r.levelno for r in lost] == [logging.ERROR]
            assert tag_keys(after).id_tag_lost is True  # type: ignore[attr-defined]
            made_up = new_client_id(await tag_keys(store).id_tag_key(), "orders")  # old key's
            assert (
                await manager.authenticate("orders", made_up, None)
                is Denial.CLIENT_ID_NOT_REGISTERED
            )
            fresh = await manager.create_key("orders", name="Beta", kind="external")
            assert isinstance(await manager.authenticate("orders", fresh.client_id, None), KeyInfo)
            caplog.clear()
            assert isinstance(
                await KeyManager(later).authenticate("orders", key.client_id, key.secret), KeyInfo
            )
            assert [r.levelno for r in caplog.records if "lost once" in r.getMessage()] == [
                logging.WARNING
            ]
        for shown in (caplog.text, repr(after)):
            assert (await tag_keys(after).id_tag_key()).hex() not in shown
    finally:
        await after.aclose()
        await later.aclose()


async def test_a_first_tag_key_beside_legacy_ids_is_not_a_lost_one(store: KeyStore) -> None:
    """A store from before tags holds only untagged (legacy) ids and no tag key: making its
    first one is no loss, so a made-up tagged id is still refused without a read."""
    if isinstance(store, MemoryStore):
        pytest.skip("a memory store's tag key lives and dies with its keys")
    await expose(store)
    legacy = record(name="Old")
    assert len(legacy.client_id) == LEGACY_CLIENT_ID_LENGTH
    await store.insert_key(legacy)
    if await tag_key_exists(store):
        await lose_tag_key(store)  # made by the insert's set-up: as if from before tags
    other = same_data(store)
    try:
        made_up = new_client_id(secrets.token_bytes(ID_TAG_KEY_BYTES), "orders")
        assert await IdTags(other).worth_a_read("orders", made_up) is False
        assert tag_keys(other).id_tag_lost is False  # type: ignore[attr-defined]
        manager = KeyManager(other)
        assert isinstance(await manager.authenticate("orders", legacy.client_id, None), KeyInfo)
    finally:
        await other.aclose()


async def tag_key_exists(store: KeyStore) -> bool:
    if isinstance(store, SQLStore):
        async with store.engine.connect() as conn:
            found = await conn.execute(
                text(f"SELECT 1 FROM {store.table_prefix}meta WHERE name = 'id_tag_key'")  # noqa: S608
            )
            return found.first() is not None
    assert isinstance(store, RedisStore | RedisClusterStore)
    return bool(await store.client.exists(f"{store.prefix}idtag"))
