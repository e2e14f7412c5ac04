"""Usage writes that go only part of the way (SPEC §10): never a count lost, never one
counted twice.

A Redis or Redis Cluster write of several APIs' counts runs one script per API; when
some APIs' scripts ran and another's failed, only the failed API's counts are kept for
the next write. A recorder whose flush task was left pending in an event loop closed
without cancelling it still writes its counts from the next loop, and ``aclose`` there
raises nothing. An API's key totals are the sum of the hours it lists.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyguard import KeyManager, KeyStore, MemoryStore
from keyguard.errors import StoreUnavailable
from keyguard.models import utcnow
from keyguard.stores.redis import RedisStore
from keyguard.stores.redis_cluster import RedisClusterStore
from keyguard.usage import UsageCount, UsageNotWritten, UsageRecorder, hour_start
from tests.backends import open_test_store
from tests.helpers import CountingStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["redis", "cluster"])
async def redis_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    async with open_test_store(request.param, tmp_path) as store:
        yield store


async def hour_requests(manager: KeyManager, api: str, client_id: str) -> int:
    usage = await manager.usage(api, client_id, hours=1)
    return int(usage["hours"][-1]["requests"])


async def test_a_write_failing_for_one_api_keeps_only_that_apis_counts(
    redis_store: KeyStore,
) -> None:
    """Two APIs' counts in one flush; the script of ``billing`` fails (its hour's usage hash
    is made a string, so HINCRBY is refused), that of ``orders`` runs. Flushing again and
    again adds ``orders`` once, never again; ``billing``'s counts wait, and are written
    once the hash can take them."""
    assert isinstance(redis_store, (RedisStore, RedisClusterStore))
    manager = KeyManager(redis_store)
    ids = {}
    for api in ("orders", "billing"):
        await manager.expose(api)
        ids[api] = (await manager.create_key(api, name="K", kind="external")).client_id
    broken = redis_store._usage_key("billing", hour_start(utcnow()))
    client: Any = redis_store.client
    await client.set(broken, "not a hash")
    recorder = UsageRecorder(redis_store, interval=3600)
    for api, n in (("orders", 5), ("billing", 3)):
        for _ in range(n):
            recorder.admitted(api, ids[api])
    for _ in range(3):
        await recorder.flush()
    assert await hour_requests(manager, "orders", ids["orders"]) == 5
    assert [(c.api, c.requests) for c in recorder.batch()] == [("billing", 3)]
    # What the store says: the APIs not written, or (none written) plain StoreUnavailable.
    one_more = UsageCount("orders", ids["orders"], hour_start(utcnow()), 1, 0)
    with pytest.raises(UsageNotWritten) as raised:
        await redis_store.record_usage([*recorder.batch(), one_more])
    assert raised.value.apis == frozenset({"billing"})
    with pytest.raises(StoreUnavailable) as failed:
        await redis_store.record_usage(recorder.batch())
    assert not isinstance(failed.value, UsageNotWritten)
    await client.delete(broken)
    await recorder.aclose()
    assert await hour_requests(manager, "billing", ids["billing"]) == 3
    assert await hour_requests(manager, "orders", ids["orders"]) == 6
    assert recorder.batch() == []


def test_a_recorder_outlives_an_event_loop_closed_without_cancelling_its_task() -> None:
    """Counts made in a loop then closed as it was (its flush task still pending, never to
    run again): in the next loop a new key's count starts a new flush task, which writes
    everything; ``aclose`` there does not touch the dead loop's task (no RuntimeError)."""
    store = MemoryStore()

    async def keys() -> tuple[str, str]:
        manager = KeyManager(store)
        await manager.expose("orders")
        first = await manager.create_key("orders", name="A", kind="external")
        second = await manager.create_key("orders", name="B", kind="external")
        return first.client_id, second.client_id

    first, second = asyncio.run(keys())
    recorder = UsageRecorder(store, interval=0.01)

    async def count_first() -> None:
        recorder.admitted("orders", first)
        await asyncio.sleep(0)  # the flush task starts, and sleeps

    old = asyncio.new_event_loop()
    old.run_until_complete(count_first())
    old.close()  # without cancelling the task

    async def later() -> dict[str, int]:
        recorder.admitted("orders", second)
        manager = KeyManager(store)
        found: dict[str, int] = {}
        for _ in range(2000):  # written by the new task within a few of its 10 ms turns
            found = {
                row.client_id: row.requests
                for row in await store.read_usage("orders", None, hour_start(utcnow()))
            }
            if len(found) == 2:
                break
            await asyncio.sleep(0.01)
        recorder.admitted("orders", first)
        await recorder.aclose()
        return {
            client_id: await hour_requests(manager, "orders", client_id)
            for client_id in (first, second)
        } | {"written_by_task": len(found)}

    assert asyncio.run(later()) == {first: 2, second: 1, "written_by_task": 2}


async def test_an_apis_key_totals_count_the_hours_listed_only(store: KeyStore) -> None:
    """A bucket of the hour after the current one (a process whose clock runs ahead wrote
    it) is in neither the API's hours nor its keys' totals: the totals are the sum of the
    hours listed, on every store."""
    manager = KeyManager(store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="K", kind="external")
    now = hour_start(utcnow())
    await store.record_usage(
        [
            UsageCount("orders", key.client_id, now, 2, 1, utcnow()),
            UsageCount("orders", key.client_id, now + timedelta(hours=1), 7, 3, utcnow()),
        ]
    )
    usage = await manager.usage("orders", hours=2)
    listed = (
        sum(h["requests"] for h in usage["hours"]),
        sum(h["rate_limited"] for h in usage["hours"]),
    )
    assert listed == (2, 1)
    assert [(k["requests"], k["rate_limited"]) for k in usage["keys"]] == [listed]


async def test_aclose_with_the_store_down_tries_one_write_and_keeps_the_counts() -> None:
    """A Redis store nothing answers for: ``aclose`` stops the flush task and tries one
    write (one timeout at shutdown, not two), raises nothing, and keeps the count."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    down = CountingStore(RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=1.0))
    recorder = UsageRecorder(down, interval=3600)
    try:
        recorder.admitted("orders", "some-id")
        await asyncio.sleep(0)  # the flush task starts, and sleeps
        assert recorder._task is not None
        await recorder.aclose()
        assert down.calls["record_usage"] == 1
        assert recorder._task is None
        assert [(c.client_id, c.requests) for c in recorder.batch()] == [("some-id", 1)]
    finally:
        await down.aclose()


async def test_a_write_cancelled_midway_keeps_its_counts() -> None:
    """A flush cancelled while its write waits on the store (a timeout around ``flush``
    or ``aclose``): the counts it carried are kept for the next write, not dropped."""
    with socket.socket() as silent:
        # The kernel completes the handshake for a listening socket nobody accepts on.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        hanging = CountingStore(RedisStore.from_url(url, timeout=60.0))
        recorder = UsageRecorder(hanging, interval=3600)
        try:
            recorder.admitted("orders", "some-id")
            flushing = asyncio.ensure_future(recorder.flush())
            for _ in range(1000):
                if hanging.calls["record_usage"]:
                    break
                await asyncio.sleep(0.01)
            assert not flushing.done()  # in the write, waiting on the silent server
            flushing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await flushing
            assert [(c.client_id, c.requests) for c in recorder.batch()] == [("some-id", 1)]
        finally:
            await hanging.aclose()


class _SlowStore(MemoryStore):
    """A memory store whose first usage write takes ``takes`` seconds of ``now``."""

    def __init__(self, now: list[float], takes: float) -> None:
        super().__init__()
        self.now, self.takes, self.writes = now, takes, 0

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        self.writes += 1
        if self.writes == 1:
            self.now[0] += self.takes
        await super().record_usage(counts)


async def test_a_write_across_an_hour_boundary_is_followed_by_a_close_at_once() -> None:
    """A write that starts before an hour boundary and ends after it: the task closes the
    bucket again at once, so the requests after it count in the new hour, not in the
    last one until the next interval (an hour later here)."""
    boundary = hour_start(utcnow()).timestamp() + 3600
    now = [boundary - 0.2]
    store = _SlowStore(now, takes=1.0)
    manager = KeyManager(store)
    await manager.expose("orders")
    before = await manager.create_key("orders", name="Before", kind="external")
    after = await manager.create_key("orders", name="After", kind="external")
    recorder = UsageRecorder(store, interval=3600, clock=lambda: now[0])
    recorder.admitted("orders", before.client_id)  # the task wakes at the boundary
    new_hour = int(boundary // 3600)
    for _ in range(1000):
        if store.writes and recorder._hour == new_hour:
            break
        await asyncio.sleep(0.01)
    assert store.writes == 1
    assert recorder._hour == new_hour  # closed again once the write ended
    recorder.admitted("orders", after.client_id)
    await recorder.aclose()
    hours = {
        row.client_id: row.hour.timestamp()
        for row in await store.read_usage("orders", None, hour_start(utcnow()))
    }
    assert hours == {before.client_id: boundary - 3600, after.client_id: boundary}
