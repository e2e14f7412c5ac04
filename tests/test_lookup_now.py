"""``lookup_now``: the request path's lookup without a coroutine (a memory store, a cache
hit) answers as ``lookup`` does, and is used only where ``lookup`` is the store's own."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from keyguard import Denial, KeyGuard, KeyManager, MemoryStore
from keyguard.errors import StoreUnavailable
from keyguard.models import KeyRecord, RateLimit
from keyguard.stores.base import lookup_now_of
from keyguard.stores.cache import CachedStore
from tests.helpers import CountingStore, http_scope, run_asgi

pytestmark = pytest.mark.anyio

ID = b"x-ibm-client-id"


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class FailingLookups(MemoryStore):
    """A memory store whose lookups fail (as a subclass might replace them)."""

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        raise StoreUnavailable("down")


class Forwarding:
    """A wrapper forwarding every attribute to the store it wraps, but its own lookup."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        raise StoreUnavailable("down")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_lookup_now_is_taken_only_where_lookup_is_the_same_classs() -> None:
    memory = MemoryStore()
    assert lookup_now_of(memory) == memory.lookup_now
    cached = CachedStore(memory)
    assert lookup_now_of(cached) == cached.lookup_now
    assert lookup_now_of(FailingLookups()) is None  # a subclass's own lookup
    assert lookup_now_of(Forwarding(memory)) is None  # a wrapper's lookup_now is the inner's
    assert lookup_now_of(CountingStore(memory)) is None  # none at all
    replaced = MemoryStore()
    replaced.lookup = FailingLookups().lookup  # type: ignore[method-assign]
    assert lookup_now_of(replaced) is None  # an instance's own


@pytest.mark.parametrize("make", [FailingLookups, lambda: Forwarding(MemoryStore())])
async def test_a_replaced_lookup_is_the_one_the_middleware_awaits(make: Any) -> None:
    store = make()
    inner = store.inner if isinstance(store, Forwarding) else store
    manager = KeyManager(inner)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    guard = KeyGuard(ok, store=store, api="orders", usage_flush=None)
    for _ in range(2):  # the second with the tag key read, as every later one
        messages = await run_asgi(guard, http_scope(headers=[(ID, key.client_id.encode())]))
        assert messages[0]["status"] == 503  # the replaced lookup's outage, not the dict's key


async def test_memory_lookup_now_is_lookup_with_the_apis_limits() -> None:
    store = MemoryStore()
    manager = KeyManager(store)
    await manager.expose("orders")
    await manager.set_rate_limits("orders", ["5/minute"])
    key = await manager.create_key("orders", name="Acme", kind="external")
    found = await store.lookup("orders", key.client_id)
    assert store.lookup_now("orders", key.client_id) == (*found, (RateLimit(5, "minute"),))
    assert store.lookup_now("orders", None) == (True, None, (RateLimit(5, "minute"),))
    assert store.lookup_now("nothing", key.client_id) == (False, None, ())
    assert await store.lookup("nothing", key.client_id) == (False, None)


async def test_cache_lookup_now_answers_hits_only_and_counts_nothing_else() -> None:
    now = [0.0]
    counting = CountingStore(MemoryStore())
    cached = CachedStore(counting, ttl=10, clock=lambda: now[0])
    manager = KeyManager(cached)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    cached.clear()
    hits: list[bool] = []
    cached._count_lookup, cached._counting = hits.append, True
    assert cached.lookup_now("orders", key.client_id) is None  # nothing cached yet
    assert hits == []
    exposed, record = await cached.lookup("orders", key.client_id)  # the miss, read
    assert hits == [False]
    assert cached.lookup_now("orders", key.client_id) == (True, record, ())
    assert hits == [False, True]
    reads = dict(counting.calls)
    now[0] = 11.0  # expired
    assert cached.lookup_now("orders", key.client_id) is None
    assert hits == [False, True]  # counted nothing
    assert dict(counting.calls) == reads  # read nothing
    assert await cached.lookup("orders", key.client_id) == (exposed, record)
    assert hits == [False, True, False]


async def test_the_managers_lookup_now_waits_for_the_tag_key() -> None:
    store = MemoryStore()
    admin = KeyManager(store)
    await admin.expose("orders")
    assert admin.lookup_now is None
    key = await admin.create_key("orders", name="Acme", kind="external")
    assert admin.lookup_now == store.lookup_now  # the tag key read to issue an id
    manager = KeyManager(store)
    assert manager.lookup_now is None  # ids cannot be checked without the tag key yet
    assert await manager.lookup("orders", key.client_id) == await store.lookup(
        "orders", key.client_id
    )
    assert manager.lookup_now == store.lookup_now
    assert KeyManager(CountingStore(store)).lookup_now is None


def _wrong_tag(client_id: str) -> str:
    return client_id[:-1] + ("0" if client_id[-1] != "0" else "1")


async def test_a_stored_key_whose_tag_does_not_verify_is_not_registered() -> None:
    """lookup_now looks an id up before its tag is checked: judge refuses one found."""
    store = MemoryStore()
    manager = KeyManager(store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    record = await store.get_key("orders", key.client_id)
    assert record is not None
    forged = dataclasses.replace(record, client_id=_wrong_tag(key.client_id), name="Forged")
    await store.insert_key(forged)
    guard = KeyGuard(ok, store=store, api="orders", usage_flush=None)
    for client_id in (key.client_id, forged.client_id, forged.client_id):
        messages = await run_asgi(guard, http_scope(headers=[(ID, client_id.encode())]))
        assert messages[0]["status"] == (200 if client_id == key.client_id else 401)
    assert guard.manager.lookup_now is not None  # the last two were looked up at once
    exposed, found, _ = store.lookup_now("orders", forged.client_id)
    assert guard.manager.judge(forged.client_id, None, exposed, found) is (
        Denial.CLIENT_ID_NOT_REGISTERED
    )
