"""The KeyStore contract for usage (SPEC §10): run against every store.

``record_usage`` adds counts to hourly buckets (so writers sum up) and only
ever raises a key's ``last_used_at``; ``read_usage`` gives them back from a
given hour on; ``prune_usage`` (or, on Redis, expiry) drops buckets older
than the 35 days kept.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

import anyio
import pytest

from keyguard import KeyStore
from keyguard.models import utcnow
from keyguard.usage import RETENTION, UsageCount, hour_start
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio


def totals(rows: list[UsageCount]) -> dict[tuple[str, datetime], tuple[int, int]]:
    """(client id, hour) -> (requests, rate limited), summed."""
    summed: dict[tuple[str, datetime], tuple[int, int]] = {}
    for row in rows:
        requests, limited = summed.get((row.client_id, row.hour), (0, 0))
        summed[(row.client_id, row.hour)] = (requests + row.requests, limited + row.rate_limited)
    return summed


async def test_counts_add_up_per_key_and_hour(store: KeyStore) -> None:
    """Two writes to the same bucket sum; other hours and keys stay apart; reads of one key
    hold only its buckets."""
    await expose(store)
    a, b = record(name="A"), record(name="B")
    await store.insert_key(a)
    await store.insert_key(b)
    now = hour_start(utcnow())
    before = now - timedelta(hours=1)
    await store.record_usage(
        [
            UsageCount("orders", a.client_id, now, 3, 1, utcnow()),
            UsageCount("orders", a.client_id, before, 2, 0, utcnow() - timedelta(hours=1)),
            UsageCount("orders", b.client_id, now, 0, 4),
        ]
    )
    await store.record_usage([UsageCount("orders", a.client_id, now, 5, 2, utcnow())])
    rows = await store.read_usage("orders", None, before)
    assert totals(rows) == {
        (a.client_id, now): (8, 3),
        (a.client_id, before): (2, 0),
        (b.client_id, now): (0, 4),
    }
    assert all(row.api == "orders" and row.last_used_at is None for row in rows)
    assert totals(await store.read_usage("orders", b.client_id, before)) == {
        (b.client_id, now): (0, 4)
    }
    # From the current hour only; and another API has none of it.
    assert totals(await store.read_usage("orders", a.client_id, now)) == {
        (a.client_id, now): (8, 3)
    }
    assert await store.read_usage("billing", None, before) == []


async def test_concurrent_writers_of_one_bucket_sum_exactly(store: KeyStore) -> None:
    """Twenty writes of the same bucket at once (as many processes flushing one hour): the
    bucket holds their sum."""
    await expose(store)
    key = record()
    await store.insert_key(key)
    now = hour_start(utcnow())
    async with anyio.create_task_group() as tg:
        for n in range(1, 21):
            tg.start_soon(
                store.record_usage, [UsageCount("orders", key.client_id, now, n, 1, utcnow())]
            )
    assert totals(await store.read_usage("orders", key.client_id, now)) == {
        (key.client_id, now): (210, 20)
    }


async def test_last_used_at_only_rises(store: KeyStore) -> None:
    """A key's last_used_at becomes the latest use written, never an earlier one; a count of
    429s only (no admitted request) leaves it alone."""
    await expose(store)
    key = record()
    await store.insert_key(key)
    now = utcnow()
    hour = hour_start(now)
    stored = await store.get_key("orders", key.client_id)
    assert stored is not None
    assert stored.last_used_at is None
    await store.record_usage([UsageCount("orders", key.client_id, hour, 1, 0, now)])
    for read in (
        await store.get_key("orders", key.client_id),
        (await store.lookup("orders", key.client_id))[1],
        (await store.list_keys("orders"))[0],
    ):
        assert read is not None
        assert read.last_used_at == now
    earlier = now - timedelta(minutes=1)
    await store.record_usage([UsageCount("orders", key.client_id, hour, 1, 0, earlier)])
    await store.record_usage([UsageCount("orders", key.client_id, hour, 0, 5)])
    stored = await store.get_key("orders", key.client_id)
    assert stored is not None
    assert stored.last_used_at == now
    later = now + timedelta(seconds=2, microseconds=3)
    await store.record_usage([UsageCount("orders", key.client_id, hour, 1, 0, later)])
    stored = await store.get_key("orders", key.client_id)
    assert stored is not None
    assert stored.last_used_at == later


async def test_last_used_at_survives_changes_and_goes_with_the_key(store: KeyStore) -> None:
    """Updating the key or rolling its secret keeps last_used_at; a deleted key's counts do not
    bring it back, and a new key with another id has none."""
    from keyguard.models import KeyChanges

    await expose(store)
    key = record()
    await store.insert_key(key)
    now = utcnow()
    await store.record_usage([UsageCount("orders", key.client_id, hour_start(now), 1, 0, now)])
    updated = await store.update_key("orders", key.client_id, KeyChanges(name="Renamed"))
    assert updated is not None
    assert updated.last_used_at == now
    rolled = await store.set_secret_hash("orders", key.client_id, "new-hash")
    assert rolled is not None
    assert rolled.last_used_at == now
    assert await store.delete_key("orders", key.client_id)
    await store.record_usage([UsageCount("orders", key.client_id, hour_start(now), 1, 0, now)])
    assert await store.get_key("orders", key.client_id) is None
    again = dataclasses.replace(record(), name="Renamed")
    await store.insert_key(again)
    fresh = await store.get_key("orders", again.client_id)
    assert fresh is not None
    assert fresh.last_used_at is None


async def test_a_key_written_with_last_used_at_keeps_the_later_one(store: KeyStore) -> None:
    """A record inserted with a last_used_at (copied from elsewhere) reads it back until a
    later use is written, and is not lowered by an earlier one."""
    await expose(store)
    then = utcnow() - timedelta(minutes=10)
    key = dataclasses.replace(record(), last_used_at=then)
    await store.insert_key(key)
    await store.record_usage(
        [UsageCount("orders", key.client_id, hour_start(then), 1, 0, then - timedelta(hours=1))]
    )
    stored = await store.get_key("orders", key.client_id)
    assert stored is not None
    assert stored.last_used_at == then


async def test_old_buckets_are_pruned(store: KeyStore) -> None:
    """Buckets older than the 35 days kept are gone after a prune; younger ones stay."""
    await expose(store)
    key = record()
    await store.insert_key(key)
    now = hour_start(utcnow())
    old = now - RETENTION - timedelta(hours=3)
    young = now - RETENTION + timedelta(hours=2)
    await store.record_usage(
        [
            UsageCount("orders", key.client_id, old, 7, 0),
            UsageCount("orders", key.client_id, young, 4, 1),
            UsageCount("orders", key.client_id, now, 1, 0),
        ]
    )
    await store.prune_usage(now - RETENTION)
    assert totals(await store.read_usage("orders", None, old - timedelta(hours=1))) == {
        (key.client_id, young): (4, 1),
        (key.client_id, now): (1, 0),
    }


async def test_an_empty_write_writes_nothing(store: KeyStore) -> None:
    """record_usage of nothing is allowed and leaves no bucket."""
    await store.record_usage([])
    assert await store.read_usage("orders", None, hour_start(utcnow())) == []
