"""The ``snapshot`` contract (``keyguard.stores.base.Snapshots``), on every store.

An API's state and, when it holds few keys, all of them, in one round trip:
what ``CachedStore`` refreshes an API with.
"""

from __future__ import annotations

import pytest

from keyguard import KeyStore
from keyguard.models import Api, KeyKind, KeyRecord, RateLimit
from keyguard.stores.base import Snapshots
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio


def snapshots(store: KeyStore) -> Snapshots:
    assert isinstance(store, Snapshots), f"{store!r} has no snapshot()"
    return store


def by_id(records: list[KeyRecord] | None) -> dict[str, KeyRecord]:
    assert records is not None
    return {r.client_id: r for r in records}


async def test_unknown_api_has_no_snapshot(store: KeyStore) -> None:
    """An API nobody created answers (None, None), whatever max_keys."""
    assert await snapshots(store).snapshot("nobody", max_keys=1000) == (None, None)
    assert await snapshots(store).snapshot("x" * 500, max_keys=1000) == (None, None)


async def test_small_api_comes_with_all_its_keys(store: KeyStore) -> None:
    """An API holding at most max_keys keys is answered with its state and every key of
    it, each field as stored, and no key of another API."""
    await expose(store)
    await expose(store, "other")
    await store.upsert_api(
        "orders",
        exposed=None,
        max_keys_per_kind=None,
        default_max_keys_per_kind=5,
        rate_limits=(RateLimit(10, "second"),),
    )
    keys = [
        record(name="One"),
        record(name="Two", kind=KeyKind.INTERNAL, secret_hash="$h$two"),
        record(name="Three", offset=1),
    ]
    for rec in keys:
        await store.insert_key(rec)
    await store.insert_key(record(api="other", name="Elsewhere"))
    api, records = await snapshots(store).snapshot("orders", max_keys=3)
    assert api == await store.get_api("orders")
    assert api is not None
    assert (api.exposed, api.internal_keys, api.external_keys) == (True, 1, 2)
    assert api.rate_limits == (RateLimit(10, "second"),)
    stored = {r.client_id: await store.get_key("orders", r.client_id) for r in keys}
    assert by_id(records) == stored


async def test_api_without_keys_has_an_empty_list(store: KeyStore) -> None:
    """An unexposed API with no key: its state, and an empty list (not None)."""
    await store.upsert_api(
        "orders", exposed=None, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    assert await snapshots(store).snapshot("orders", max_keys=10) == (
        Api("orders", exposed=False, max_keys_per_kind=5),
        [],
    )


async def test_large_api_comes_without_its_keys(store: KeyStore) -> None:
    """An API holding more than max_keys keys is answered with its state only: None for
    the keys (counting both kinds)."""
    await expose(store)
    await store.insert_key(record(name="One"))
    await store.insert_key(record(name="Two", kind=KeyKind.INTERNAL))
    api, records = await snapshots(store).snapshot("orders", max_keys=1)
    assert records is None
    assert api == await store.get_api("orders")
    api, records = await snapshots(store).snapshot("orders", max_keys=0)
    assert records is None
    assert len(by_id((await snapshots(store).snapshot("orders", max_keys=2))[1])) == 2


async def test_snapshot_sees_changes(store: KeyStore) -> None:
    """A snapshot reads the store as it is now: a deleted key is gone, a new one is in."""
    await expose(store)
    first, second = record(name="One"), record(name="Two")
    await store.insert_key(first)
    await store.delete_key("orders", first.client_id)
    await store.insert_key(second)
    await store.upsert_api(
        "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    api, records = await snapshots(store).snapshot("orders", max_keys=10)
    assert api is not None
    assert api.exposed is False
    assert set(by_id(records)) == {second.client_id}
