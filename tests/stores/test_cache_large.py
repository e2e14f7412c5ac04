"""CachedStore on large APIs: per-key entries, their bounds, the miss budget, on every store.

An API holding more than ``snapshot_keys`` keys is cached key by key; these tests make
an API "large" cheaply by setting ``snapshot_keys=2`` and giving it three keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from keyguard import KeyStore, MemoryStore
from keyguard.errors import ConfigurationError
from keyguard.models import Api, KeyChanges, KeyRecord
from keyguard.secrets import new_client_id
from keyguard.stores import CachedStore
from tests.helpers import CountingStore, expose
from tests.stores.test_cache import Clock, key

pytestmark = pytest.mark.anyio

Large = tuple[CachedStore, CountingStore, Clock, list[KeyRecord]]


async def large_api(store: KeyStore, **options: Any) -> Large:
    """A 5 s cache (snapshots up to 2 keys) over a counting view of ``store``, whose
    exposed API 'orders' has three keys: a large API for this cache."""
    clock = Clock()
    counting = CountingStore(store)
    cached = CachedStore(counting, ttl=5, snapshot_keys=2, clock=clock, **options)
    await expose(cached, limit=20)
    keys = [key(name=f"Key {i}") for i in range(3)]
    for rec in keys:
        await cached.insert_key(rec)
    counting.calls.clear()
    return cached, counting, clock, keys


@pytest.fixture
async def large(store: KeyStore) -> Large:
    """A large API behind a cache, on each store."""
    return await large_api(store)


async def test_large_api_is_cached_key_by_key(large: Large) -> None:
    """A large API is read without its keys (one snapshot, no key in it), then each id asked
    for costs one lookup, once per TTL: known and unknown ids alike."""
    cached, counting, _, keys = large
    unknown = new_client_id()
    for _ in range(3):
        for rec in keys:
            assert await cached.lookup("orders", rec.client_id) == (True, rec)
        assert await cached.lookup("orders", unknown) == (True, None)
        assert await cached.lookup("orders", None) == (True, None)
    assert dict(counting.calls) == {"list_apis": 1, "snapshot": 1, "lookup": 4}
    assert len(cached) == 5  # the API entry, three keys, one negative entry
    assert cached.cached_rate_limits("orders") == ()


async def test_a_refresh_is_one_round_trip(large: Large) -> None:
    """Past the TTL, refreshing the API is one store call and refreshing a key is one more:
    never a listing of the API's keys."""
    cached, counting, clock, keys = large
    await cached.lookup("orders", keys[0].client_id)
    counting.calls.clear()
    clock.now += 6
    assert await cached.lookup("orders", keys[0].client_id) == (True, keys[0])
    assert dict(counting.calls) == {"snapshot": 1, "lookup": 1}


async def test_negative_entries_expire_with_the_ttl(large: Large) -> None:
    """An id found to have no key is answered from the cache for the TTL, then read again:
    a key created elsewhere meanwhile is found once the TTL has passed."""
    cached, counting, clock, _ = large
    fresh = key(name="Fresh")
    assert await cached.lookup("orders", fresh.client_id) == (True, None)
    await counting.inner.insert_key(fresh)  # "another process"
    clock.now += 4.9
    assert await cached.lookup("orders", fresh.client_id) == (True, None)
    assert counting.calls["lookup"] == 1
    clock.now += 0.2
    assert await cached.lookup("orders", fresh.client_id) == (True, fresh)
    assert counting.calls["lookup"] == 2


async def test_own_writes_drop_the_key_entries_at_once(large: Large) -> None:
    """A change through the cache is seen by the next lookup, on a large API too (R7): a
    deleted key, a new key, an un-exposed API."""
    cached, _, _, keys = large
    first, second, _ = keys
    assert await cached.lookup("orders", first.client_id) == (True, first)
    assert await cached.lookup("orders", second.client_id) == (True, second)
    await cached.delete_key("orders", first.client_id)
    assert await cached.lookup("orders", first.client_id) == (True, None)
    fresh = key(name="Fresh")
    assert await cached.lookup("orders", fresh.client_id) == (True, None)  # negative entry
    await cached.insert_key(fresh)
    assert await cached.lookup("orders", fresh.client_id) == (True, fresh)
    await cached.update_key("orders", second.client_id, KeyChanges(enabled=False))
    found = (await cached.lookup("orders", second.client_id))[1]
    assert found is not None
    assert found.enabled is False
    await cached.upsert_api(
        "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    assert (await cached.lookup("orders", fresh.client_id))[0] is False
    assert await cached.delete_api("orders", force=True) is True
    assert await cached.lookup("orders", fresh.client_id) == (False, None)


async def test_key_entries_are_valid_from_when_their_read_started(large: Large) -> None:
    """A key read that took longer than the TTL lands expired: it answers the lookup that
    waited for it, and the next lookup reads again (SPEC §11)."""
    cached, counting, clock, keys = large
    await cached.lookup("orders", None)  # the API entry
    inner_lookup = counting.inner.lookup

    async def slow_lookup(api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        clock.now += 6  # the store answered six seconds after the read began
        return await inner_lookup(api, client_id)

    counting.inner.lookup = slow_lookup  # type: ignore[method-assign]
    assert await cached.lookup("orders", keys[0].client_id) == (True, keys[0])
    counting.inner.lookup = inner_lookup  # type: ignore[method-assign]
    assert await cached.lookup("orders", keys[0].client_id) == (True, keys[0])
    assert counting.calls["lookup"] == 2


async def test_a_key_entry_that_expires_while_the_api_refreshes_is_read_again(
    large: Large,
) -> None:
    """A lookup that waited for its API's refresh does not answer from a key entry that
    expired meanwhile: a key disabled elsewhere after that entry's read is not seen enabled
    later than a TTL from the read's start (SPEC §11)."""
    cached, counting, clock, keys = large
    rec = keys[0]
    start = clock.now
    await cached.lookup("orders", None)  # the API entry, read at 0: valid until 5
    clock.now = start + 3
    assert await cached.lookup("orders", rec.client_id) == (True, rec)  # valid until 8
    clock.now = start + 4
    await counting.inner.update_key(  # "another process"
        "orders", rec.client_id, KeyChanges(enabled=False)
    )
    inner_snapshot = counting.inner.snapshot  # type: ignore[attr-defined]

    async def slow_snapshot(api: str, *, max_keys: int) -> Any:
        clock.now += 3  # the API's refresh answers at 9, past the key entry's 8
        return await inner_snapshot(api, max_keys=max_keys)

    counting.inner.snapshot = slow_snapshot  # type: ignore[attr-defined]
    clock.now = start + 6
    exposed, found = await cached.lookup("orders", rec.client_id)
    assert exposed is True
    assert found is not None
    assert found.enabled is False


def hold_lookup(counting: CountingStore) -> tuple[anyio.Event, anyio.Event]:
    """Make the store's key lookups read, then signal ``started`` and wait for ``release``."""
    started, release = anyio.Event(), anyio.Event()
    inner_lookup = counting.inner.lookup

    async def held(api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        answer = await inner_lookup(api, client_id)
        started.set()
        await release.wait()
        return answer

    counting.inner.lookup = held  # type: ignore[method-assign]
    return started, release


@pytest.mark.parametrize("change", ["delete_key", "unexpose"])
async def test_a_key_read_racing_a_change_is_not_kept(large: Large, change: str) -> None:
    """A key read under way when the key (or its API) changes answers the lookup that started
    it, is not kept, and is not shared with a lookup made after the change."""
    cached, counting, _, keys = large
    rec = keys[0]
    await cached.lookup("orders", None)
    started, release = hold_lookup(counting)
    early: list[tuple[bool, KeyRecord | None]] = []

    async def look_early() -> None:
        early.append(await cached.lookup("orders", rec.client_id))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(look_early)
            await started.wait()
            if change == "delete_key":
                await cached.delete_key("orders", rec.client_id)
            else:
                await cached.upsert_api(
                    "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
                )
            late: list[tuple[bool, KeyRecord | None]] = []

            async def look_late() -> None:
                late.append(await cached.lookup("orders", rec.client_id))

            group.start_soon(look_late)
            await anyio.sleep(0.05)
            release.set()
    assert early == [(True, rec)]  # it began before the change
    expected = (True, None) if change == "delete_key" else (False, rec)
    assert late == [expected]
    assert await cached.lookup("orders", rec.client_id) == expected


async def test_concurrent_misses_of_one_id_share_one_read(large: Large) -> None:
    """Fifty lookups of one uncached id at once cost one store lookup."""
    cached, counting, _, keys = large
    await cached.lookup("orders", None)
    answers: list[tuple[bool, KeyRecord | None]] = []

    async def look(client_id: str) -> None:
        answers.append(await cached.lookup("orders", client_id))

    unknown = new_client_id()
    async with anyio.create_task_group() as group:
        for _ in range(50):
            group.start_soon(look, keys[1].client_id)
            group.start_soon(look, unknown)
    assert (
        sorted(answers, key=lambda a: a[1] is None) == [(True, keys[1])] * 50 + [(True, None)] * 50
    )
    assert counting.calls["lookup"] == 2


async def test_key_entries_are_refreshed_ahead(large: Large) -> None:
    """In its TTL's last quarter, a key entry in use is re-read in the background while it
    answers; a negative entry is not (it simply expires)."""
    cached, counting, clock, keys = large
    rec, unknown = keys[0], new_client_id()
    await cached.lookup("orders", rec.client_id)
    await cached.lookup("orders", unknown)
    await counting.inner.delete_key("orders", rec.client_id)  # "another process"
    counting.calls.clear()
    clock.now += 4.0  # 1 s left of 5
    assert await cached.lookup("orders", rec.client_id) == (True, rec)  # answered at once
    assert await cached.lookup("orders", unknown) == (True, None)
    for _ in range(100):
        if counting.calls["lookup"] and not cached._reading:
            break
        await anyio.sleep(0.01)
    assert counting.calls["lookup"] == 1  # the known key only
    assert await cached.lookup("orders", rec.client_id) == (True, None)  # the refreshed entry


async def test_key_entries_are_bounded_least_recently_used_first(store: KeyStore) -> None:
    """However many keys are asked for, the cache holds at most max_entries; the key in use
    stays cached while the others come and go, the least recently used first."""
    cached, counting, _, keys = await large_api(store, max_entries=8)
    for i in range(9):
        rec = key(name=f"More {i}")
        await cached.insert_key(rec)
        keys.append(rec)
    favourite, others = keys[0], keys[1:]
    await cached.lookup("orders", favourite.client_id)
    counting.calls.clear()
    for rec in others:
        assert await cached.lookup("orders", rec.client_id) == (True, rec)
        assert await cached.lookup("orders", favourite.client_id) == (True, favourite)
        assert len(cached) <= 8
    assert counting.calls["lookup"] == len(others)  # the favourite was never read again
    assert len(cached) == 8
    await cached.lookup("orders", others[0].client_id)  # the oldest: dropped, read again
    assert counting.calls["lookup"] == len(others) + 1
    await cached.lookup("orders", others[-1].client_id)  # the newest: still cached
    assert counting.calls["lookup"] == len(others) + 1


async def test_made_up_ids_cannot_push_out_real_keys(store: KeyStore) -> None:
    """Negative entries hold at most a quarter of the cache: a flood of made-up ids leaves
    the real keys' entries cached."""
    cached, counting, _, keys = await large_api(store, max_entries=12)
    for rec in keys:
        await cached.lookup("orders", rec.client_id)
    for _ in range(50):
        await cached.lookup("orders", new_client_id())
    before = counting.calls["lookup"]
    for rec in keys:
        assert await cached.lookup("orders", rec.client_id) == (True, rec)
    assert counting.calls["lookup"] == before  # all still cached
    # The API's entry, the three keys' and negative entries for a quarter of the cache:
    # the rest of the room stays free for real keys.
    assert len(cached) == 1 + 3 + 12 // 4


async def test_a_flood_of_made_up_ids_is_held_to_the_miss_budget(store: KeyStore) -> None:
    """Made-up ids beyond miss_reads_per_second are answered 'not registered' without a
    read; a caller whose key is cached is not affected, one whose key is not cached is
    refused until the budget refills, then found."""
    cached, counting, clock, keys = await large_api(store, miss_reads_per_second=5)
    cached_key, uncached_key = keys[0], keys[1]
    await cached.lookup("orders", cached_key.client_id)  # one read of the budget
    for _ in range(1000):
        assert await cached.lookup("orders", new_client_id()) == (True, None)
    assert counting.calls["lookup"] == 5  # the budget: 5 reads (one second's worth)
    assert cached.refused_misses == 996
    assert await cached.lookup("orders", cached_key.client_id) == (True, cached_key)
    assert await cached.lookup("orders", uncached_key.client_id) == (True, None)  # documented
    clock.now += 0.5  # the budget refills: 2.5 reads
    assert await cached.lookup("orders", uncached_key.client_id) == (True, uncached_key)
    assert counting.calls["lookup"] == 6


async def test_a_known_key_is_read_again_outside_the_budget(store: KeyStore) -> None:
    """A key whose entry has expired (but is still held) is re-read even while a flood has
    used up the budget: the flood cannot lock out a caller the cache knows."""
    cached, counting, clock, keys = await large_api(store, miss_reads_per_second=5)
    await cached.lookup("orders", keys[0].client_id)
    clock.now += 6  # the key's entry and the API's have expired; the budget is full again
    for _ in range(100):
        await cached.lookup("orders", new_client_id())
    assert cached.refused_misses > 0
    before = counting.calls["lookup"]
    assert await cached.lookup("orders", keys[0].client_id) == (True, keys[0])
    assert counting.calls["lookup"] == before + 1


async def test_precheck_runs_before_any_read(store: KeyStore) -> None:
    """An id the precheck refuses is answered 'not registered' with no read and no budget
    spent; ids it passes are looked up as usual."""
    seen: list[tuple[str, str]] = []

    def precheck(api: str, client_id: str) -> bool:
        seen.append((api, client_id))
        return not client_id.startswith("x")

    cached, counting, _, keys = await large_api(store, precheck=precheck, miss_reads_per_second=2)
    for i in range(100):
        assert await cached.lookup("orders", f"x{i}") == (True, None)
    assert counting.calls["lookup"] == 0
    assert cached.refused_misses == 0
    assert await cached.lookup("orders", keys[2].client_id) == (True, keys[2])
    assert len(seen) == 101


class FeedStore(MemoryStore):
    """A memory store with a change feed whose notices the test sends by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[str, str | None], None]] = []

    async def watch(
        self, on_change: Callable[[str, str | None], None], *, on_ready: Callable[[], None]
    ) -> None:
        self.listeners.append(on_change)
        on_ready()
        try:
            await anyio.sleep_forever()
        finally:
            self.listeners.remove(on_change)


class CountingFeed(CountingStore):
    """A counting view of a ``FeedStore`` that passes its change feed on."""

    async def watch(
        self, on_change: Callable[[str, str | None], None], *, on_ready: Callable[[], None]
    ) -> None:
        assert isinstance(self.inner, FeedStore)
        await self.inner.watch(on_change, on_ready=on_ready)


async def test_feed_notices_drop_the_right_key_entries() -> None:
    """A notice about one key drops that key's entry only; a notice about the API drops
    every entry of it."""
    feed = FeedStore()
    clock = Clock()
    counting = CountingFeed(feed)
    cached = CachedStore(counting, ttl=5, snapshot_keys=2, clock=clock)
    await expose(cached)
    keys = [key(name=f"Key {i}") for i in range(4)]  # large even after one is deleted
    for rec in keys:
        await cached.insert_key(rec)
    for rec in keys:
        await cached.lookup("orders", rec.client_id)
    for _ in range(100):
        if feed.listeners:
            break
        await anyio.sleep(0.01)
    for rec in keys:  # cached afresh once the watcher listens
        await cached.lookup("orders", rec.client_id)
    counting.calls.clear()
    await feed.delete_key("orders", keys[0].client_id)  # "another process" ...
    for listener in feed.listeners:
        listener("orders", keys[0].client_id)  # ... and its notice
    assert await cached.lookup("orders", keys[0].client_id) == (True, None)
    assert await cached.lookup("orders", keys[1].client_id) == (True, keys[1])
    assert dict(counting.calls) == {"lookup": 1}
    for listener in feed.listeners:
        listener("orders", None)
    assert await cached.lookup("orders", keys[1].client_id) == (True, keys[1])
    assert await cached.lookup("orders", keys[2].client_id) == (True, keys[2])
    # The API is read again (and the set of names: the API itself changed).
    assert dict(counting.calls) == {"lookup": 3, "snapshot": 1, "list_apis": 1}
    await cached.aclose()


class NoSnapshotStore(CountingStore):
    """A store of someone else's without ``snapshot``: only the KeyStore protocol."""

    snapshot = None  # type: ignore[assignment]


async def test_a_store_without_snapshot_is_read_with_get_api_and_list_keys() -> None:
    """A third-party store lacking ``snapshot`` still works: a small API is read with
    get_api then list_keys, a large one with get_api alone."""
    inner = MemoryStore()
    store = NoSnapshotStore(inner)
    cached = CachedStore(store, ttl=60, snapshot_keys=1)
    await expose(cached)
    first = key(name="One")
    await cached.insert_key(first)
    store.calls.clear()
    assert await cached.lookup("orders", first.client_id) == (True, first)
    assert dict(store.calls) == {"list_apis": 1, "get_api": 1, "list_keys": 1}
    await cached.insert_key(key(name="Two"))
    store.calls.clear()
    assert await cached.lookup("orders", first.client_id) == (True, first)
    assert dict(store.calls) == {"get_api": 1, "lookup": 1}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"snapshot_keys": -1}, "snapshot_keys"),
        ({"snapshot_keys": True}, "snapshot_keys"),
        ({"miss_reads_per_second": 0}, "miss_reads_per_second"),
        ({"miss_reads_per_second": "5"}, "miss_reads_per_second"),
        ({"precheck": 5}, "precheck"),
    ],
)
def test_bad_large_api_options(options: dict[str, object], match: str) -> None:
    """A snapshot size, miss budget or precheck that would break the cache is refused."""
    with pytest.raises(ConfigurationError, match=match):
        CachedStore(MemoryStore(), **options)  # type: ignore[arg-type]


def test_a_snapshot_never_takes_more_than_a_quarter_of_the_cache() -> None:
    """A small cache caches smaller snapshots: an API whole must leave room for others."""
    assert CachedStore(MemoryStore(), max_entries=100).snapshot_keys == 25
    assert CachedStore(MemoryStore()).snapshot_keys == 1000


async def test_api_entry_of_a_large_api_holds_no_keys(store: KeyStore) -> None:
    """The API entry of a large API counts one, whatever its keys: the cache's memory does
    not grow with the API."""
    cached, _, _, _ = await large_api(store)
    await cached.lookup("orders", None)
    assert len(cached) == 1
    found: Api | None = await cached.get_api("orders")
    assert found is not None
    assert found.external_keys == 3
