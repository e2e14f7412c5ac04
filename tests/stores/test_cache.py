"""CachedStore: per-API snapshots with bounded staleness and memory, on every store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import anyio
import pytest

from keyguard import KeyStore, MemoryStore
from keyguard.errors import ConfigurationError, StoreUnavailable
from keyguard.models import Api, KeyKind, KeyRecord, utcnow
from keyguard.secrets import new_client_id
from keyguard.stores import CachedStore
from keyguard.stores.base import Snapshots
from tests.helpers import CountingStore, expose, record

pytestmark = pytest.mark.anyio


class Clock:
    """A hand-driven monotonic clock: no test here waits for real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(api: str = "orders", name: str = "Acme", secret_hash: str | None = None) -> KeyRecord:
    return KeyRecord(api, new_client_id(), name, KeyKind.EXTERNAL, secret_hash, utcnow())


def round_trips(counting: CountingStore) -> int:
    """Calls that reached the wrapped store."""
    return sum(counting.calls.values())


async def cached_with_key(
    store: KeyStore, **options: Any
) -> tuple[CachedStore, CountingStore, KeyRecord]:
    """A cache over a counting view of ``store``, whose exposed API 'orders' has one key."""
    counting = CountingStore(store)
    cached = CachedStore(counting, **options)
    await cached.upsert_api(
        "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    rec = key()
    await cached.insert_key(rec)
    counting.calls.clear()
    return cached, counting, rec


def hold_snapshot(
    counting: CountingStore, *, first_only: bool = False
) -> tuple[anyio.Event, anyio.Event]:
    """Make the store's snapshot read, then signal ``started`` and wait for ``release``
    (only on its first call if ``first_only``): a refresh caught in flight."""
    started, release = anyio.Event(), anyio.Event()
    inner = cast("Snapshots", counting.inner)
    inner_snapshot = inner.snapshot
    calls = 0

    async def held(api: str, *, max_keys: int) -> tuple[Api | None, list[KeyRecord] | None]:
        nonlocal calls
        calls += 1
        answer = await inner_snapshot(api, max_keys=max_keys)
        if calls == 1 or not first_only:
            started.set()
            await release.wait()
        return answer

    inner.snapshot = held  # type: ignore[method-assign]
    return started, release


@pytest.fixture
async def setup(store: KeyStore) -> tuple[CachedStore, CountingStore, Clock, KeyRecord]:
    """A cache of 5 s over a counting view of each store, with one exposed API and one key."""
    clock = Clock()
    cached, counting, rec = await cached_with_key(store, ttl=5, clock=clock)
    return cached, counting, clock, rec


async def test_repeat_lookups_hit_the_cache(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """Within the TTL, one refresh of the API answers every lookup, known or unknown id alike."""
    cached, counting, _, rec = setup
    unknown = new_client_id()
    for _ in range(3):
        assert await cached.lookup("orders", rec.client_id) == (True, rec)
        assert await cached.lookup("orders", unknown) == (True, None)
        assert await cached.lookup("orders", None) == (True, None)
    assert dict(counting.calls) == {"list_apis": 1, "snapshot": 1}


async def test_flood_of_random_ids_costs_one_refresh_per_ttl(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """Thousands of made-up client ids reach the store once per API per TTL, and the cache
    stays small."""
    cached, counting, clock, _ = setup
    for _ in range(2000):
        assert await cached.lookup("orders", new_client_id()) == (True, None)
    assert round_trips(counting) == 2  # the API names, the API with its keys
    clock.now += 6
    for _ in range(2000):
        await cached.lookup("orders", new_client_id())
    assert round_trips(counting) == 3  # a known API is refreshed without the names
    assert len(cached) == 2  # the API and its one key


async def test_concurrent_misses_share_one_refresh(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """Many lookups missing at once for one API cause a single refresh, not a stampede."""
    cached, counting, _, rec = setup
    answers: list[tuple[bool, KeyRecord | None]] = []

    async def look() -> None:
        answers.append(await cached.lookup("orders", rec.client_id))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(look)
    assert answers == [(True, rec)] * 50
    assert dict(counting.calls) == {"list_apis": 1, "snapshot": 1}


async def test_own_writes_are_visible_at_once(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """A change made through the cache is seen by the very next lookup (R7 in-process)."""
    cached, _, _, rec = setup
    assert (await cached.lookup("orders", rec.client_id))[1] == rec
    await cached.set_secret_hash("orders", rec.client_id, "new-hash")
    found = (await cached.lookup("orders", rec.client_id))[1]
    assert found is not None
    assert found.secret_hash == "new-hash"
    await cached.delete_key("orders", rec.client_id)
    assert await cached.lookup("orders", rec.client_id) == (True, None)
    fresh = key(name="Fresh")
    assert await cached.lookup("orders", fresh.client_id) == (True, None)  # cached absence
    await cached.insert_key(fresh)
    assert await cached.lookup("orders", fresh.client_id) == (True, fresh)
    await cached.upsert_api(
        "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    assert await cached.lookup("orders", fresh.client_id) == (False, fresh)
    assert await cached.lookup("orders", None) == (False, None)


async def test_changes_elsewhere_seen_within_ttl(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """A change made behind the cache's back (another process) shows once the TTL passes."""
    cached, counting, clock, rec = setup
    assert (await cached.lookup("orders", rec.client_id))[1] == rec
    await counting.inner.delete_key("orders", rec.client_id)  # "another process"
    clock.now += 4.9
    assert (await cached.lookup("orders", rec.client_id))[1] == rec  # stale, within bound
    clock.now += 0.2
    assert await cached.lookup("orders", rec.client_id) == (True, None)


async def test_key_created_elsewhere_is_refused_no_longer_than_the_ttl(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """A key created a moment ago by another process, while made-up ids flood in, is
    answered 'not registered' at most until the TTL passes, then found."""
    cached, counting, clock, _ = setup
    fresh = key(name="Fresh")
    for _ in range(100):
        await cached.lookup("orders", new_client_id())
    await counting.inner.insert_key(fresh)  # "another process"
    assert await cached.lookup("orders", fresh.client_id) == (True, None)
    clock.now += 5.01
    assert await cached.lookup("orders", fresh.client_id) == (True, fresh)


async def test_memory_is_bounded(store: KeyStore) -> None:
    """However many APIs are looked up, the cache holds at most max_entries entries."""
    counting = CountingStore(store)
    cached = CachedStore(counting, ttl=60, max_entries=5)
    for i in range(8):
        await store.upsert_api(
            f"api-{i}", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
    for i in range(8):
        await cached.lookup(f"api-{i}", new_client_id())
    assert len(cached) == 5
    assert counting.calls["snapshot"] == 8  # each real API read once


async def test_made_up_api_names_cost_one_read_per_ttl(store: KeyStore) -> None:
    """A flood of invented API names reaches the store once per TTL, and fills no cache."""
    clock = Clock()
    counting = CountingStore(store)
    cached = CachedStore(counting, ttl=1, clock=clock)
    await cached.upsert_api(
        "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    counting.calls.clear()
    for i in range(2000):
        assert await cached.lookup(f"made-up-{i}", new_client_id()) == (False, None)
    assert dict(counting.calls) == {"list_apis": 1}
    assert len(cached) == 0
    clock.now += 1.5
    for i in range(2000):
        await cached.lookup(f"again-{i}", None)
    assert dict(counting.calls) == {"list_apis": 2}
    assert (await cached.lookup("orders", None))[0] is True  # a real API still answers


async def test_new_api_elsewhere_is_seen_within_the_ttl(store: KeyStore) -> None:
    """An API created behind the cache's back is found once the names are a TTL old."""
    clock = Clock()
    cached = CachedStore(store, ttl=1, clock=clock)
    assert await cached.lookup("later", None) == (False, None)
    await store.upsert_api(
        "later", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    clock.now += 1.5
    assert await cached.lookup("later", None) == (True, None)


async def test_failures_are_not_cached(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """A failed lookup raises and leaves nothing behind: the next one asks the store again."""
    cached, counting, _, rec = setup
    counting.fail_with = StoreUnavailable("down")
    with pytest.raises(StoreUnavailable):
        await cached.lookup("orders", rec.client_id)
    counting.fail_with = None
    assert await cached.lookup("orders", rec.client_id) == (True, rec)
    assert counting.calls["list_apis"] == 2


async def test_failed_write_still_invalidates(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """A write that failed may or may not have happened: its entries are dropped anyway."""
    cached, counting, _, rec = setup
    await cached.lookup("orders", rec.client_id)
    counting.fail_with = StoreUnavailable("down mid-write")
    with pytest.raises(StoreUnavailable):
        await cached.delete_key("orders", rec.client_id)
    counting.fail_with = None
    await cached.lookup("orders", rec.client_id)
    assert counting.calls["snapshot"] == 2


async def test_lookup_racing_a_write_is_not_cached(store: KeyStore) -> None:
    """An answer read before a concurrent write finished is not kept in the cache."""
    cached, counting, rec = await cached_with_key(store, ttl=60)
    started, release = hold_snapshot(counting)
    results: list[tuple[bool, KeyRecord | None]] = []

    async def look() -> None:
        results.append(await cached.lookup("orders", rec.client_id))

    async with anyio.create_task_group() as tg:
        tg.start_soon(look)
        await started.wait()
        await cached.delete_key("orders", rec.client_id)
        release.set()
    assert results == [(True, rec)]  # the in-flight answer predates the delete ...
    assert await cached.lookup("orders", rec.client_id) == (True, None)  # ... and was not kept


@pytest.mark.parametrize(
    ("options", "match"),
    [({"ttl": 0}, "ttl"), ({"ttl": -1}, "ttl"), ({"max_entries": 0}, "max_entries")],
)
def test_bad_cache_options(options: dict[str, float], match: str) -> None:
    """A TTL or size that would disable or break the cache is refused."""
    with pytest.raises(ConfigurationError, match=match):
        CachedStore(MemoryStore(), **options)  # type: ignore[arg-type]


async def test_lookup_after_a_write_never_shares_an_older_refresh(store: KeyStore) -> None:
    """R7 in-process: a lookup made after a delete returned does not wait for, nor reuse, a
    refresh that started before the delete."""
    cached, counting, rec = await cached_with_key(store, ttl=60)
    started, release = hold_snapshot(counting, first_only=True)
    early: list[tuple[bool, KeyRecord | None]] = []
    async with anyio.create_task_group() as tg:

        async def look_early() -> None:
            early.append(await cached.lookup("orders", rec.client_id))

        tg.start_soon(look_early)
        await started.wait()
        await cached.delete_key("orders", rec.client_id)
        with anyio.fail_after(5):  # must not wait for the refresh that began before
            assert await cached.lookup("orders", rec.client_id) == (True, None)
        release.set()
    assert early == [(True, rec)]  # the early lookup began before the delete
    assert await cached.lookup("orders", rec.client_id) == (True, None)


async def test_a_cancelled_lookup_does_not_fail_the_others(store: KeyStore) -> None:
    """When the lookup that started a shared refresh is cancelled (its client went away),
    the lookups waiting on the same refresh still get their answer."""
    cached, counting, rec = await cached_with_key(store, ttl=60)
    started, release = hold_snapshot(counting)
    answers: list[tuple[bool, KeyRecord | None]] = []
    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as leader:
            leader.start_soon(cached.lookup, "orders", rec.client_id)
            await started.wait()

            async def follow() -> None:
                answers.append(await cached.lookup("orders", rec.client_id))

            outer.start_soon(follow)
            await anyio.sleep(0.01)
            leader.cancel_scope.cancel()
        release.set()
        outer.cancel_scope.deadline = anyio.current_time() + 5
    assert answers == [(True, rec)]


async def test_snapshot_age_counts_from_before_the_reads(store: KeyStore) -> None:
    """A slow refresh does not stretch the staleness bound: the TTL runs from when the
    store was read, not from when the answer arrived."""
    counting = CountingStore(store)
    clock = Clock()
    cached = CachedStore(counting, ttl=5, clock=clock)
    await cached.upsert_api(
        "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    inner = cast("Snapshots", counting.inner)
    inner_snapshot = inner.snapshot

    async def slow_snapshot(
        api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        clock.now += 4  # the store took four seconds to answer
        return await inner_snapshot(api, max_keys=max_keys)

    inner.snapshot = slow_snapshot  # type: ignore[method-assign]
    await cached.lookup("orders", None)
    clock.now += 1.5  # 5.5 s after the read began: past the TTL
    await cached.lookup("orders", None)
    assert counting.calls["snapshot"] == 2


class FeedStore(MemoryStore):
    """A memory store with a change feed whose notices the test sends by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[str, str | None], None]] = []
        self.reads = 0

    async def snapshot(
        self, api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        self.reads += 1
        return await super().snapshot(api, max_keys=max_keys)

    async def watch(
        self, on_change: Callable[[str, str | None], None], *, on_ready: Callable[[], None]
    ) -> None:
        self.listeners.append(on_change)
        on_ready()
        try:
            await anyio.sleep_forever()
        finally:
            self.listeners.remove(on_change)


def test_change_feed_is_watched_in_each_event_loop() -> None:
    """A cache used from one event loop and then from another listens for changes in each:
    a notice drops the snapshot at once in both."""
    feed = FeedStore()
    cached = CachedStore(feed, ttl=60)

    async def reads_after_a_notice() -> int:
        await feed.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        await cached.lookup("orders", None)
        await anyio.sleep(0.05)  # the watcher starts listening
        before = feed.reads
        for listener in list(feed.listeners):
            listener("orders", None)  # another process changed the API
        await cached.lookup("orders", None)
        return feed.reads - before

    assert anyio.run(reads_after_a_notice) == 1
    assert anyio.run(reads_after_a_notice) == 1


async def test_delete_api_is_seen_at_once() -> None:
    """Deleting an API through the cache drops its snapshot: its keys stop working at once."""
    cached = CachedStore(MemoryStore(), ttl=60)
    await expose(cached)
    key = record(name="Acme")
    await cached.insert_key(key)
    assert (await cached.lookup("orders", key.client_id))[1] is not None  # now cached
    assert await cached.delete_api("orders", force=True) is True
    assert await cached.lookup("orders", key.client_id) == (False, None)


async def test_refresh_ahead_answers_without_waiting(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """In its TTL's last quarter, a snapshot in use is refreshed in the background: the lookup
    answers from it at once, even while the store is held, and the refresh then replaces it."""
    cached, counting, clock, rec = setup
    assert (await cached.lookup("orders", rec.client_id))[1] == rec
    await counting.inner.delete_key("orders", rec.client_id)  # "another process"
    counting.calls.clear()
    started, release = hold_snapshot(counting)
    clock.now += 3.0  # 2 s left of 5: not yet refreshed ahead
    assert (await cached.lookup("orders", rec.client_id))[1] == rec
    assert counting.calls["snapshot"] == 0
    clock.now += 1.0  # 1 s left: the next use starts a refresh and does not wait for it
    with anyio.fail_after(5):  # (a deadlock guard: the held store never answers by itself)
        assert (await cached.lookup("orders", rec.client_id))[1] == rec
        await started.wait()
        # Still held: every lookup meanwhile answers from the valid snapshot, and shares
        # the one refresh.
        for _ in range(3):
            assert (await cached.lookup("orders", rec.client_id))[1] == rec
        assert counting.calls["snapshot"] == 1
        refresh = cached._refreshing["orders"].task
        release.set()
        await refresh
    assert await cached.lookup("orders", rec.client_id) == (True, None)
    assert counting.calls["snapshot"] == 1


async def test_a_slow_refresh_is_valid_from_when_its_read_started(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """A refresh that took longer than the TTL is expired when it lands: it answers the
    lookups that waited for it, and the next one reads again (SPEC §11)."""
    cached, counting, clock, rec = setup
    started, release = hold_snapshot(counting, first_only=True)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(cached.lookup, "orders", rec.client_id)
            await started.wait()
            clock.now += 6.0  # the store answers 6 s after the read started
            release.set()
    before = counting.calls["snapshot"]
    assert (await cached.lookup("orders", rec.client_id))[1] == rec
    assert counting.calls["snapshot"] == before + 1


async def test_a_lookup_a_ttl_after_a_stuck_refresh_began_reads_afresh(
    setup: tuple[CachedStore, CountingStore, Clock, KeyRecord],
) -> None:
    """A refresh started a TTL ago and still under way is not waited for: its answer would be
    expired before it lands, so a later lookup reads afresh and sees a change made meanwhile
    (valid-from-read-start, SPEC §11)."""
    cached, counting, clock, rec = setup
    started, release = hold_snapshot(counting, first_only=True)
    early: list[tuple[bool, KeyRecord | None]] = []

    async def look_early() -> None:
        early.append(await cached.lookup("orders", rec.client_id))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(look_early)
            await started.wait()
            await counting.inner.delete_key("orders", rec.client_id)  # "another process"
            clock.now += 5.5
            assert await cached.lookup("orders", rec.client_id) == (True, None)
            release.set()
    assert early == [(True, rec)]  # it arrived before the change: the old answer is in bound
    assert counting.calls["snapshot"] == 2
    assert await cached.lookup("orders", rec.client_id) == (True, None)
