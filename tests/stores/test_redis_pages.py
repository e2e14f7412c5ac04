"""Redis and Redis Cluster: the listing order behind ``page_keys`` (``stores/redis/_pages.py``).

Each test runs on the machine's Redis and on the suite's cluster. It checks
that the sorted set ``<prefix>{<api>}:order`` follows the keys and is rebuilt
when older code wrote keys without it. (That a filtered page stops after
``scan_budget`` members is in ``test_contract_pages.py``, with the SQL stores.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyguard.models import KeyRecord, name_key, utcnow
from keyguard.stores.redis import RedisCore
from keyguard.stores.redis._common import _body, _dumps
from tests.backends import open_test_store
from tests.helpers import expose, record
from tests.stores.test_contract_pages import _LAST_CREATED, add, every_page, keys_of

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["redis", "cluster"])
async def redis_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """An empty Redis store, standalone or on the cluster."""
    async with open_test_store(request.param, tmp_path) as store:
        assert isinstance(store, RedisCore)
        yield store


def order_key(store: Any, api: str = "orders") -> str:
    return f"{store.prefix}{{{api}}}:order"


def api_key(store: Any, api: str = "orders") -> str:
    return f"{store.prefix}{{{api}}}"


async def insert_as_older_code(store: Any, rec: KeyRecord) -> None:
    """Write a key the way keyguard before issue 17 did: hash fields only, no listing order."""
    client, key = store.client, api_key(store, rec.api)
    seq = await client.hincrby(key, "seq", 1)
    folded = name_key(rec.name)
    body = _dumps(_body(rec, folded))
    await client.hset(
        key, mapping={f"k:{rec.client_id}": f"[{seq},{body[1:]}", f"n:{folded}": rec.client_id}
    )
    await client.hincrby(key, f"c:{rec.kind.value}", 1)


async def test_order_follows_inserts_and_deletes(redis_store: Any) -> None:
    """Each insert adds the key's member, each delete removes it, deleting the API drops
    the whole sorted set."""
    await expose(redis_store, limit=10)
    recs = await add(redis_store, ["a", "b", "c"])
    client = redis_store.client
    members = [m.decode() for m in await client.zrange(order_key(redis_store), 0, -1)]
    assert [m[28:] for m in members] == [r.client_id for r in recs]
    assert await redis_store.delete_key("orders", recs[1].client_id)
    members = [m.decode() for m in await client.zrange(order_key(redis_store), 0, -1)]
    assert [m[28:] for m in members] == [recs[0].client_id, recs[2].client_id]
    assert await redis_store.delete_api("orders", force=True)
    assert await client.exists(order_key(redis_store)) == 0


async def test_keys_of_older_code_are_listed(redis_store: Any) -> None:
    """A key inserted by older code (no member in the order) is listed by the next page
    call, which rebuilds the order from the hash, in its place."""
    await expose(redis_store, limit=10)
    first = await add(redis_store, ["new 1"])
    older = dataclasses.replace(record(name="older"), created_at=first[0].created_at)
    await insert_as_older_code(redis_store, older)
    last = await add(redis_store, ["new 2"])
    assert keys_of(await every_page(redis_store, limit=1)) == [first[0], older, last[0]]
    client = redis_store.client
    assert await client.zcard(order_key(redis_store)) == 3
    seq, ordered = await client.hmget(api_key(redis_store), ["seq", "ordered"])
    assert seq == ordered == b"3"


async def test_data_without_any_order_is_backfilled(redis_store: Any) -> None:
    """An API written before the order existed (no sorted set, no marker) pages in order."""
    await expose(redis_store, limit=10)
    recs = await add(redis_store, [f"k{i}" for i in range(5)])
    client = redis_store.client
    await client.delete(order_key(redis_store))
    await client.hdel(api_key(redis_store), "ordered")
    assert keys_of(await every_page(redis_store, limit=2)) == recs
    assert await client.zcard(order_key(redis_store)) == 5


async def test_keys_deleted_by_older_code_are_skipped(redis_store: Any) -> None:
    """A key deleted by older code (its member left behind) is not listed, and its member
    goes when a page meets it."""
    await expose(redis_store, limit=10)
    recs = await add(redis_store, ["a", "b", "c"])
    client, gone = redis_store.client, recs[1]
    await client.hdel(api_key(redis_store), f"k:{gone.client_id}", f"n:{name_key(gone.name)}")
    await client.hincrby(api_key(redis_store), "c:external", -1)
    assert keys_of(await every_page(redis_store, limit=5)) == [recs[0], recs[2]]
    assert await client.zcard(order_key(redis_store)) == 2


async def older_keys(store: Any, count: int) -> list[KeyRecord]:
    """``count`` keys inserted the way older code did (no members in the order), each
    created after the one before."""
    recs = []
    for i in range(count):
        moment = max(utcnow(), _LAST_CREATED[0] + timedelta(microseconds=1))
        _LAST_CREATED[0] = moment
        rec = dataclasses.replace(record(name=f"older {i}"), created_at=moment)
        await insert_as_older_code(store, rec)
        recs.append(rec)
    return recs


async def one_page_call(store: Any) -> Any:
    """The page script called once, as ``page_keys`` calls it (first page of 10)."""
    keys = [api_key(store), order_key(store)]
    args = ["-", 10, "", store.scan_budget, store.rebuild_step]
    return await store._page_keys(keys=keys, args=args, client=store.client)


async def test_a_rebuild_runs_in_bounded_steps(redis_store: Any) -> None:
    """Rebuilding the order of an API of older code's keys takes several script calls, each
    looking at about ``rebuild_step`` entries of the hash, so Redis serves others in
    between (one script over the whole hash blocked it: ~10 s for 200,000 keys); the
    pages then list every key in order."""
    await expose(redis_store, limit=100)
    recs = await older_keys(redis_store, 60)  # ~190 hash entries: not a small listpack
    redis_store.rebuild_step = 100
    client = redis_store.client
    rows, position = await one_page_call(redis_store)
    assert (rows, position) == ([], b"~")  # a step made, more to come
    assert 0 < await client.zcard(order_key(redis_store)) < 60
    seq, ordered, rebuild = await client.hmget(api_key(redis_store), ["seq", "ordered", "rebuild"])
    assert ordered != seq
    assert rebuild.startswith(seq + b":")
    assert keys_of(await every_page(redis_store, limit=7)) == recs
    assert await client.zcard(order_key(redis_store)) == 60
    seq, ordered, rebuild = await client.hmget(api_key(redis_store), ["seq", "ordered", "rebuild"])
    assert (ordered, rebuild) == (seq, None)


async def test_an_insert_during_a_rebuild_is_listed_and_the_rebuild_still_ends(
    redis_store: Any,
) -> None:
    """A key inserted by this code while a rebuild is under way adds its own member and moves
    the rebuild along with it: the rebuild ends (not started over for ever by a busy
    API's inserts) and the key is listed in its place."""
    await expose(redis_store, limit=100)
    recs = await older_keys(redis_store, 60)
    redis_store.rebuild_step = 100
    client = redis_store.client
    assert (await one_page_call(redis_store))[1] == b"~"
    _, before = await client.hmget(api_key(redis_store), ["seq", "rebuild"])
    recs += await add(redis_store, ["new"])
    seq, after = await client.hmget(api_key(redis_store), ["seq", "rebuild"])
    assert after == seq + before[before.index(b":") :]  # same scan, caught up with the insert
    assert keys_of(await every_page(redis_store, limit=7)) == recs
    seq, ordered = await client.hmget(api_key(redis_store), ["seq", "ordered"])
    assert ordered == seq


async def test_an_older_insert_during_a_rebuild_starts_it_over(redis_store: Any) -> None:
    """A key inserted by older code during a rebuild (which a scan under way may miss)
    makes the next step start over, and the key is listed."""
    await expose(redis_store, limit=100)
    recs = await older_keys(redis_store, 60)
    redis_store.rebuild_step = 100
    assert (await one_page_call(redis_store))[1] == b"~"
    recs += await older_keys(redis_store, 1)
    assert keys_of(await every_page(redis_store, limit=7)) == recs
    seq, ordered = await redis_store.client.hmget(api_key(redis_store), ["seq", "ordered"])
    assert ordered == seq
