"""Client id tags (keyguard.idtags): made-up client ids are refused without a store read.

Issued ids carry a 40-bit HMAC tag under the store's tag key; the request path checks it
before asking the store for the key, so a flood of made-up well-formed ids costs no key
reads on any store. Ids issued before tags (32 hex characters) keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import httpx
import pytest
from sqlalchemy import event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyManager, KeyStore, MemoryStore, open_store
from keyguard.errors import StoreUnavailable
from keyguard.idtags import _MAX_VERIFIED, IdTags, tag_key_source
from keyguard.manager import Denial
from keyguard.models import KeyInfo, KeyRecord
from keyguard.secrets import (
    CLIENT_ID_LENGTH,
    CLIENT_ID_TAG_LENGTH,
    LEGACY_CLIENT_ID_LENGTH,
    client_id_tag,
    could_be_client_id,
    new_client_id,
)
from keyguard.stores import CachedStore
from keyguard.stores.base import IdTagKeys
from keyguard.stores.redis import RedisStore
from keyguard.stores.sql import SQLStore
from tests.backends.redis import delete_prefixed
from tests.backends.redis import unique_prefix as redis_prefix
from tests.backends.servers import require_server
from tests.backends.sql import drop_tables, sql_url
from tests.backends.sql import unique_prefix as sql_prefix
from tests.helpers import CountingStore, record
from tests.stores.test_upgrades import OPENERS, load_redis, load_sql, manifest

pytestmark = pytest.mark.anyio

FLOOD = 300
READS = ("lookup_key", "get_key", "list_keys", "get_api", "list_apis", "read_usage")
NOT_REGISTERED = {
    "httpCode": "401",
    "httpMessage": "Unauthorized",
    "moreInformation": "Client id not registered.",
}


class TagCountingStore(CountingStore):
    """``CountingStore`` that also passes the tag key through, counting key reads apart:
    ``calls["lookup_key"]`` counts lookups that ask for a key, ``calls["lookup"]`` all."""

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        if client_id is not None:
            self.calls["lookup_key"] += 1
        return await super().lookup(api, client_id)

    async def id_tag_key(self) -> bytes:
        self._enter("id_tag_key")
        assert isinstance(self.inner, IdTagKeys)
        return await self.inner.id_tag_key()


def made_up_tagged() -> str:
    """A well-formed tagged-length client id nobody issued."""
    return secrets.token_hex(CLIENT_ID_LENGTH // 2)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.state.keyguard.name)


def guarded(store: KeyStore) -> httpx.AsyncClient:
    """An HTTP client for an app behind ``KeyGuard`` over ``store`` (API ``orders``)."""
    app = KeyGuard(Starlette(routes=[Route("/hello", hello)]), store=store, api="orders")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


# -- the tag ------------------------------------------------------------------------------


async def test_issued_ids_carry_a_tag_that_verifies(manager: KeyManager) -> None:
    """Every key a manager issues has a 42-hex id: 32 random characters, then the HMAC tag
    of its API and those characters under the store's tag key."""
    await manager.expose("orders")
    store = manager.store
    assert isinstance(store, IdTagKeys)
    tag_key = await store.id_tag_key()
    tags = IdTags(store)
    for kind in ("internal", "external"):
        key = await manager.create_key("orders", name=f"Acme {kind}", kind=kind)
        client_id = key.client_id
        assert len(client_id) == CLIENT_ID_LENGTH == LEGACY_CLIENT_ID_LENGTH + CLIENT_ID_TAG_LENGTH
        assert could_be_client_id(client_id)
        random_part, tag = client_id[:LEGACY_CLIENT_ID_LENGTH], client_id[LEGACY_CLIENT_ID_LENGTH:]
        assert tag == client_id_tag(tag_key, "orders", random_part)
        assert await tags.worth_a_read("orders", client_id)
        # The same id for another API, or with one tag character changed, does not verify.
        assert not await tags.worth_a_read("billing", client_id)
        flipped = tag[:-1] + ("0" if tag[-1] != "0" else "1")
        assert not await tags.worth_a_read("orders", random_part + flipped)


async def test_made_up_ids_fail_the_tag() -> None:
    """Of many made-up tagged-length ids none passes (each would with p = 2**-40); wrong
    shapes never do; legacy-shaped ids are left to the store."""
    store = MemoryStore()
    tags = IdTags(store)
    passed = [
        cid
        for cid in (made_up_tagged() for _ in range(20_000))
        if await tags.worth_a_read("orders", cid)
    ]
    assert passed == []
    for bad in ("", "x" * CLIENT_ID_LENGTH, "A" * CLIENT_ID_LENGTH, "0" * 41, "0" * 43, "é" * 42):
        assert not await tags.worth_a_read("orders", bad)
    assert await tags.worth_a_read("orders", new_client_id())  # legacy shape: looked up


def test_tag_depends_on_key_api_and_random_part() -> None:
    """The tag changes with the tag key, the API and the random part, and an API name cannot
    be shifted into the random part (the name is length-prefixed)."""
    key, other_key = secrets.token_bytes(32), secrets.token_bytes(32)
    random_part = secrets.token_hex(16)
    tag = client_id_tag(key, "orders", random_part)
    assert len(tag) == CLIENT_ID_TAG_LENGTH
    assert all(c in "0123456789abcdef" for c in tag)
    assert client_id_tag(other_key, "orders", random_part) != tag
    assert client_id_tag(key, "orders2", random_part) != tag
    assert client_id_tag(key, "orders", secrets.token_hex(16)) != tag
    assert client_id_tag(key, "ab", "c" + random_part[1:]) != client_id_tag(
        key, "a", "bc" + random_part[2:]
    )
    assert (
        tag
        == hmac.new(
            key, b"\x00\x00\x00\x06orders" + random_part.encode(), hashlib.sha256
        ).hexdigest()[:10]
    )


async def test_tags_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The presented tag is compared with ``hmac.compare_digest``, never with ``==``."""
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("keyguard.idtags.hmac.compare_digest", spy)
    tags = IdTags(MemoryStore())
    made_up = made_up_tagged()
    assert not await tags.worth_a_read("orders", made_up)
    assert compared
    assert compared[0][1] == made_up[LEGACY_CLIENT_ID_LENGTH:].encode()


def test_tag_key_source_sees_through_a_cache() -> None:
    """A ``CachedStore`` (which keeps no tag key itself) gives the key of the store it wraps."""
    inner = MemoryStore()
    assert tag_key_source(inner) is inner
    assert tag_key_source(CachedStore(inner, ttl=1)) is inner
    assert tag_key_source(CountingStore(inner)) is None


async def test_open_store_with_its_cache_issues_tagged_ids(tmp_path: Path) -> None:
    """A store opened by URL, cache and all, issues tagged ids, and its middleware admits
    them and refuses a made-up one."""
    store = open_store(sql_url("sqlite", tmp_path))
    try:
        assert isinstance(store, CachedStore)
        manager = KeyManager(store)
        await manager.expose("orders")
        key = await manager.create_key("orders", name="Real", kind="external")
        assert len(key.client_id) == CLIENT_ID_LENGTH
        async with guarded(store) as client:
            ok = await client.get("/hello", headers={"X-IBM-Client-Id": key.client_id})
            assert (ok.status_code, ok.text) == (200, "Real")
            refused = await client.get("/hello", headers={"X-IBM-Client-Id": made_up_tagged()})
            assert refused.json() == NOT_REGISTERED
    finally:
        await store.aclose()


# -- the flood ----------------------------------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
async def test_flood_of_made_up_ids_reads_no_key(store: KeyStore, cached: bool) -> None:
    """A flood of made-up well-formed tagged ids through KeyGuard is answered "not
    registered" (SPEC §4's body) with no read of a key on any store; through a cache, with
    no store call at all once the API's state is cached."""
    counting = TagCountingStore(store)
    front: KeyStore = CachedStore(counting, ttl=600) if cached else counting
    manager = KeyManager(front)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Real", kind="external")
    async with guarded(front) as client:
        ok = await client.get("/hello", headers={"X-IBM-Client-Id": key.client_id})
        assert (ok.status_code, ok.text) == (200, "Real")
        counting.calls.clear()
        counting.lookups.clear()
        for _ in range(FLOOD):
            answer = await client.get("/hello", headers={"X-IBM-Client-Id": made_up_tagged()})
            assert answer.status_code == 401
            assert answer.json() == NOT_REGISTERED
        ok = await client.get("/hello", headers={"X-IBM-Client-Id": key.client_id})
        assert (ok.status_code, ok.text) == (200, "Real")
    reads = {name: counting.calls[name] for name in READS if counting.calls[name]}
    assert counting.calls["id_tag_key"] == 0  # loaded once, before the flood
    if cached:
        # The real caller's second request was served from the cache too.
        assert counting.calls["lookup"] == 0, counting.calls
        assert reads == {}
    else:
        # Each request reads the API's state (a 404 comes before a 401), never a key —
        # but the real caller's, once (whose API rate limits may be read again, get_api).
        reads.pop("get_api", None)
        assert reads == {"lookup_key": 1}, reads
        assert counting.calls["lookup"] == FLOOD + 1
        assert [cid for _, cid in counting.lookups] == [None] * FLOOD + [key.client_id]


async def test_made_up_id_of_another_api_is_refused_without_a_key_read(store: KeyStore) -> None:
    """A real id of one API, sent for another, fails its tag there: "not registered"
    without a key read."""
    counting = TagCountingStore(store)
    manager = KeyManager(counting)
    await manager.expose("orders")
    await manager.expose("billing")
    key = await manager.create_key("billing", name="Elsewhere", kind="external")
    counting.calls.clear()
    assert await manager.authenticate("orders", key.client_id, None) is (
        Denial.CLIENT_ID_NOT_REGISTERED
    )
    assert counting.calls["lookup_key"] == 0
    assert isinstance(await manager.authenticate("billing", key.client_id, None), KeyInfo)


async def test_an_api_name_no_api_can_have_fails_the_tag_without_raising(
    store: KeyStore,
) -> None:
    """An API name holding a lone surrogate (``KeyManager.authenticate`` called directly,
    not through the middleware, which checks names) and a tagged-shape id: the tag check
    answers "no read", never a ``UnicodeEncodeError``."""
    manager = KeyManager(store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    tags = IdTags(store)
    for client_id in (key.client_id, made_up_tagged()):
        assert await tags.worth_a_read("orders\ud800", client_id) is False
    assert await tags.worth_a_read("orders", key.client_id) is True


async def test_the_memo_of_verified_ids_is_bounded() -> None:
    """More real ids than the memo holds: it never grows past its bound, and an id it
    has forgotten still verifies (with an HMAC)."""
    store = MemoryStore()
    tags = IdTags(store)
    tag_key = await store.id_tag_key()
    ids = [new_client_id(tag_key, "orders") for _ in range(_MAX_VERIFIED + 5)]
    for client_id in ids:
        assert await tags.worth_a_read("orders", client_id)
        assert len(tags.verified) <= _MAX_VERIFIED
    assert ids[0] not in tags.verified
    assert await tags.worth_a_read("orders", ids[0])


async def test_sql_flood_runs_no_statement(tmp_path: Path) -> None:
    """Counted at the database: behind the cache, a flood of made-up tagged ids runs not one
    SQL statement on SQLite once the API's state and the tag key are known."""
    store = SQLStore.from_url(sql_url("sqlite", tmp_path), table_prefix=sql_prefix())
    statements: Counter[str] = Counter()

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements[statement.split()[0].upper()] += 1

    try:
        cached = CachedStore(store, ttl=600)
        manager = KeyManager(cached)
        await manager.expose("orders")
        key = await manager.create_key("orders", name="Real", kind="external")
        async with guarded(cached) as client:
            assert (
                await client.get("/hello", headers={"X-IBM-Client-Id": key.client_id})
            ).status_code == 200
            event.listen(store.engine.sync_engine, "before_cursor_execute", count)
            for _ in range(FLOOD):
                answer = await client.get("/hello", headers={"X-IBM-Client-Id": made_up_tagged()})
                assert answer.json() == NOT_REGISTERED
            event.remove(store.engine.sync_engine, "before_cursor_execute", count)
        assert statements.get("SELECT", 0) == 0, statements
    finally:
        await store.aclose()


# -- legacy ids and stores without a tag key ------------------------------------------------


async def test_legacy_ids_still_admitted(store: KeyStore) -> None:
    """A key whose id was issued before tags (32 hex characters, no tag) still gets in;
    a made-up legacy-shaped id is looked up as before and refused "not registered"."""
    counting = TagCountingStore(store)
    manager = KeyManager(counting)
    await manager.expose("orders")
    legacy = record(name="Old timer")  # new_client_id() without a key: the old shape
    assert len(legacy.client_id) == LEGACY_CLIENT_ID_LENGTH
    await store.insert_key(legacy)
    async with guarded(counting) as client:
        ok = await client.get("/hello", headers={"X-IBM-Client-Id": legacy.client_id})
        assert (ok.status_code, ok.text) == (200, "Old timer")
        made_up = new_client_id()
        answer = await client.get("/hello", headers={"X-IBM-Client-Id": made_up})
        assert answer.json() == NOT_REGISTERED
    assert ("orders", made_up) in counting.lookups


async def test_store_without_a_tag_key_issues_untagged_ids() -> None:
    """A custom store that keeps no tag key keeps working: its ids are untagged, and every
    well-formed id is looked up."""
    plain = CountingStore(MemoryStore())  # no id_tag_key
    manager = KeyManager(plain)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    assert len(key.client_id) == LEGACY_CLIENT_ID_LENGTH
    assert isinstance(await manager.authenticate("orders", key.client_id, None), KeyInfo)
    made_up = made_up_tagged()
    assert await manager.authenticate("orders", made_up, None) is Denial.CLIENT_ID_NOT_REGISTERED
    assert ("orders", made_up) in plain.lookups


# -- the tag key --------------------------------------------------------------------------


async def test_tag_key_read_once_per_store_object(tmp_path: Path) -> None:
    """A SQL store reads its tag key from the database once; later calls, and every
    manager over the store, use the copy in memory."""
    prefix = sql_prefix()
    store = SQLStore.from_url(sql_url("sqlite", tmp_path), table_prefix=prefix)
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if f"{prefix}meta" in statement:
            statements.append(statement)

    try:
        await store.list_apis()  # tables created
        event.listen(store.engine.sync_engine, "before_cursor_execute", count)
        first = await store.id_tag_key()
        seen = len(statements)
        assert seen >= 1
        for n in range(5):
            assert await store.id_tag_key() == first
            manager = KeyManager(store)
            await manager.expose("orders")
            await manager.create_key("orders", name=f"K{n}", kind="external")
        assert len(statements) == seen
    finally:
        await store.aclose()


async def test_damaged_tag_key_is_an_outage_without_its_value(tmp_path: Path) -> None:
    """A tag key row that is not 32 bytes of hex makes the store unavailable (503 on the
    request path), and the error does not quote the stored value."""
    url = sql_url("sqlite", tmp_path)
    prefix = sql_prefix()
    writer = SQLStore.from_url(url, table_prefix=prefix)
    damaged = "not-a-key-" + secrets.token_hex(8)
    try:
        await writer.id_tag_key()
        async with writer.engine.begin() as conn:
            await conn.exec_driver_sql(
                f"UPDATE {prefix}meta SET value = ? WHERE name = 'id_tag_key'",  # noqa: S608
                (damaged,),
            )
        reader = SQLStore.from_url(url, table_prefix=prefix)
        try:
            with pytest.raises(StoreUnavailable) as info:
                await reader.id_tag_key()
            assert damaged not in str(info.value) + repr(info.value)
            manager = KeyManager(reader)
            with pytest.raises(StoreUnavailable):
                await manager.authenticate("orders", made_up_tagged(), None)
        finally:
            await reader.aclose()
    finally:
        await writer.aclose()


RACER = """
import asyncio, hashlib, os, sys
from keyguard import open_store

async def main() -> None:
    options = {os.environ["KG_OPTION"]: os.environ["KG_PREFIX"]}
    store = open_store(os.environ["KG_URL"], cache_ttl=0, **options)
    try:
        print(hashlib.sha256(await store.id_tag_key()).hexdigest())
    finally:
        await store.aclose()

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql", "redis"])
async def test_racing_processes_agree_on_the_tag_key(backend: str, tmp_path: Path) -> None:
    """Processes starting together on one store, each making the tag key if it is missing,
    all end up with the same key (compared by digest: the key is never printed)."""
    sql = backend != "redis"
    if sql:
        url, option, prefix = sql_url(backend, tmp_path), "table_prefix", sql_prefix()
        store: KeyStore = SQLStore.from_url(url, table_prefix=prefix)
    else:
        url, option, prefix = require_server("redis"), "prefix", redis_prefix()
        store = RedisStore.from_url(url, prefix=prefix)
    if sql:
        await store.list_apis()  # the tables first: the race is for the key, not the schema
    env = {**os.environ, "KG_URL": url, "KG_OPTION": option, "KG_PREFIX": prefix}

    def race() -> list[tuple[int, str]]:
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER], env=env, stdout=subprocess.PIPE, text=True
            )
            for _ in range(4)
        ]
        return [(racer.wait(timeout=120), racer.communicate()[0].strip()) for racer in racers]

    try:
        results = await anyio.to_thread.run_sync(race)
        assert [code for code, _ in results] == [0] * 4
        digests = {digest for _, digest in results}
        assert isinstance(store, IdTagKeys)
        assert digests == {hashlib.sha256(await store.id_tag_key()).hexdigest()}
    finally:
        if isinstance(store, SQLStore) and backend != "sqlite":
            await drop_tables(store.engine, prefix)
        await store.aclose()
        if backend == "redis":
            await delete_prefixed(url, prefix)


# -- upgraded stores ------------------------------------------------------------------------


async def check_upgraded_store_tags(stores: list[KeyStore]) -> None:
    """On a store written before tags: every store object agrees on the (new) tag key, old
    keys authenticate, new keys get tagged ids that authenticate, made-up tagged ids cost
    no key read."""
    keys = set()
    for opened in stores:
        assert isinstance(opened, IdTagKeys)
        keys.add(await opened.id_tag_key())
    assert len(keys) == 1
    counting = TagCountingStore(stores[0])
    manager = KeyManager(counting)
    orders = next(api for api in manifest()["apis"] if api["name"] == "orders")
    await manager.expose("orders", max_keys_per_kind=1000)
    for old in orders["keys"]:
        assert len(old["client_id"]) == LEGACY_CLIENT_ID_LENGTH
        outcome = await manager.authenticate("orders", old["client_id"], old["secret"])
        assert isinstance(outcome, KeyInfo), old["name"]
    new = await manager.create_key("orders", name="After the upgrade", kind="internal")
    assert len(new.client_id) == CLIENT_ID_LENGTH
    assert isinstance(await manager.authenticate("orders", new.client_id, new.secret), KeyInfo)
    other = KeyManager(stores[-1])  # another "process" over the same data
    assert isinstance(await other.authenticate("orders", new.client_id, new.secret), KeyInfo)
    counting.calls.clear()
    for _ in range(50):
        assert await manager.authenticate("orders", made_up_tagged(), None) is (
            Denial.CLIENT_ID_NOT_REGISTERED
        )
    assert counting.calls["lookup_key"] == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
async def test_upgraded_sql_store_keeps_old_ids_and_tags_new_ones(
    backend: str, tmp_path: Path
) -> None:
    """A schema-version-1 SQL store (the legacy fixture) gets a tag key on first need; its
    old ids keep working and its new ones are tagged."""
    url = sql_url(backend, tmp_path)
    prefix = sql_prefix()
    loader = SQLStore.from_url(url, table_prefix=prefix)
    stores: list[KeyStore] = [SQLStore.from_url(url, table_prefix=prefix) for _ in range(OPENERS)]
    try:
        await load_sql(loader.engine, backend, prefix)
        await check_upgraded_store_tags(stores)
    finally:
        for opened in stores:
            await opened.aclose()
        try:
            if backend != "sqlite":
                await drop_tables(loader.engine, prefix)
        finally:
            await loader.aclose()


async def test_upgraded_redis_store_keeps_old_ids_and_tags_new_ones() -> None:
    """Redis data of the first layout gets a tag key on first need; its old ids keep
    working and its new ones are tagged."""
    url = require_server("redis")
    prefix = redis_prefix()
    stores: list[KeyStore] = [RedisStore.from_url(url, prefix=prefix) for _ in range(OPENERS)]
    try:
        await load_redis(url, prefix)
        await check_upgraded_store_tags(stores)
    finally:
        for opened in stores:
            await opened.aclose()
        await delete_prefixed(url, prefix)


def test_manifest_ids_are_legacy_shaped() -> None:
    """The legacy fixtures' ids are all 32 hex characters: what tags treat as legacy."""
    ids = [key["client_id"] for api in manifest()["apis"] for key in api["keys"]]
    assert ids
    assert all(len(cid) == LEGACY_CLIENT_ID_LENGTH and could_be_client_id(cid) for cid in ids)


async def test_a_verified_id_is_remembered_and_made_up_ids_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An id whose tag verified costs no HMAC the next time (for the same API only); ids
    whose tag fails are never remembered, so a flood of them cannot fill the memory."""
    store = MemoryStore()
    manager = KeyManager(store)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    tags = IdTags(store)
    assert await tags.worth_a_read("orders", key.client_id)
    for _ in range(1000):
        assert not await tags.worth_a_read("orders", made_up_tagged())
    assert tags.verified == {key.client_id: "orders"}
    computed: list[str] = []
    real = client_id_tag

    def spy(tag_key: bytes, api: str, random_part: str) -> str:
        computed.append(api)
        return real(tag_key, api, random_part)

    monkeypatch.setattr("keyguard.idtags.client_id_tag", spy)
    assert tags.plausible("orders", key.client_id) is True
    assert computed == []
    assert tags.plausible("billing", key.client_id) is False  # another API: computed, fails
    assert computed == ["billing"]
