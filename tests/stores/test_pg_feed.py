"""PostgreSQL's change feed (SPEC §11): every change NOTIFYs, in its transaction, and a
``CachedStore`` over another store object hears it and drops what it cached at once.

On both drivers that listen, asyncpg and psycopg (the ``driver`` fixture), against the
machine's PostgreSQL (each test under its own table prefix, so its own channel), and a
private one the test starts where the server must restart or stop answering. "At once"
is shown, never timed: the reading cache's TTL is ten minutes, or its clock is the
test's and never moves, so only a notice can explain that a change is seen. How fast
it is, is measured in ``benchmarks/revocation.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from sqlalchemy import column, table, text, update
from sqlalchemy.engine import make_url

from keyguard.errors import DuplicateName, KeyLimitReached, StoreUnavailable
from keyguard.models import KeyChanges, KeyKind, utcnow
from keyguard.stores import CachedStore, ChangeFeed, open_store
from keyguard.stores.sql import SQLStore, _feed
from keyguard.stores.sql._store import _PostgreSQLStore
from tests.backends.servers import require_server
from tests.backends.sql import drop_tables, open_sql_test_store, unique_prefix
from tests.helpers import eventually, expose, record
from tests.test_outages import private_postgres

pytestmark = pytest.mark.anyio

LONG_TTL = 600.0  # a reading cache that only a notice can make forget, within a test
BOUND = 30  # seconds: generous, only there so that a hang fails instead of blocking the run
DRIVERS = ("asyncpg", "psycopg")  # the PostgreSQL drivers whose stores listen


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """Each PostgreSQL driver that has a change feed."""
    return str(request.param)


def on_driver(url: str, driver: str) -> str:
    """The PostgreSQL ``url`` through ``driver`` (``postgresql+<driver>://``)."""
    return make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(False)


def pg_url(driver: str) -> str:
    """The machine's PostgreSQL through ``driver``."""
    return on_driver(require_server("postgres"), driver)


async def tables_ready(store: SQLStore) -> None:
    """Wait until ``store``'s first call has made (or found) its tables: a call answering
    StoreUnavailable while that step goes on is asked again; fail after 30 seconds."""
    with anyio.fail_after(BOUND):
        while True:
            try:
                await store.list_apis()
                return
            except StoreUnavailable:
                await anyio.sleep(0.05)


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ReadyCountingStore(_PostgreSQLStore):
    """The PostgreSQL store, counting how often its feed started (or restarted) listening."""

    readies = 0

    async def watch(
        self,
        on_change: Callable[[str, str | None], None],
        *,
        on_ready: Callable[[], None],
    ) -> None:
        def ready() -> None:
            self.readies += 1
            on_ready()

        await super().watch(on_change, on_ready=ready)


@asynccontextmanager
async def writer_store(driver: str = "asyncpg", **options: Any) -> AsyncIterator[SQLStore]:
    """A store on the machine's PostgreSQL through ``driver`` under a fresh prefix, its
    tables dropped after."""
    if driver == "asyncpg":
        async with open_sql_test_store("postgres", Path("."), **options) as store:
            yield store
        return
    prefix = unique_prefix()
    store = SQLStore.from_url(pg_url(driver), table_prefix=prefix, **options)
    try:
        yield store
    finally:
        try:
            await drop_tables(store.engine, prefix)
        finally:
            await store.aclose()


@asynccontextmanager
async def reader_of(
    writer: SQLStore,
    *,
    driver: str = "asyncpg",
    ttl: float = LONG_TTL,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[CachedStore]:
    """A cache over a second store object on ``writer``'s tables (another process's, in
    all but the process), through ``driver``."""
    inner = SQLStore.from_url(pg_url(driver), table_prefix=writer.table_prefix)
    reader = CachedStore(inner, ttl=ttl, clock=clock or time.monotonic)
    try:
        yield reader
    finally:
        await reader.aclose()


@asynccontextmanager
async def heard_on(channel: str) -> AsyncIterator[list[tuple[str, str]]]:
    """Every (channel, payload) NOTIFYed on ``channel``, heard by a bare asyncpg connection
    of the test's own (not the store's feed)."""
    heard: list[tuple[str, str]] = []
    conn = await asyncpg.connect(require_server("postgres"))
    try:
        await conn.add_listener(channel, lambda _c, _p, ch, payload: heard.append((ch, payload)))
        yield heard
    finally:
        await conn.close()


async def until_listening(cache: CachedStore) -> None:
    """Wait until ``cache`` listens to its store's feed (and so has dropped, once, what it
    cached before: ``on_ready`` clears it)."""
    inner = cache.store
    assert isinstance(inner, _PostgreSQLStore)

    async def listening() -> bool:
        return inner._feed is not None and inner._feed.listener() is not None

    await eventually(listening)


async def forgotten(cache: CachedStore, client_id: str) -> bool:
    """Whether ``cache`` no longer finds ``client_id`` in ``orders``."""
    return await cache.lookup("orders", client_id) == (True, None)


async def disable_behind_the_back(store: SQLStore, client_id: str) -> None:
    """Disable a key with a plain UPDATE: a change that sends no notice (as if it was lost)."""
    keys = table(f"{store.table_prefix}keys", column("client_id"), column("enabled"))
    async with store.engine.begin() as conn:
        await conn.execute(update(keys).where(keys.c.client_id == client_id).values(enabled=False))


async def listening_connections(store: SQLStore, channel: str) -> int:
    """How many connections to ``store``'s database listen on ``channel``."""
    async with store.engine.connect() as conn:
        found = await conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE query = :listen AND datname = current_database()"
            ),
            {"listen": f'LISTEN "{channel}"'},
        )
        return int(found.scalar_one())


def feed_tasks() -> list[asyncio.Task[Any]]:
    """The running loop's tasks of a change feed (pinging or reading a listening
    connection)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("keyguard-sql-feed")]


async def mark_and_wait(store: SQLStore, heard: list[tuple[str, str]]) -> list[str]:
    """Make one last change (API ``zz-last``) and wait for its notice: every notice sent
    before it has arrived by then (PostgreSQL delivers in commit order). The payloads
    heard before it."""
    await store.upsert_api(
        "zz-last", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )

    async def arrived() -> bool:
        return any(payload == "zz-last" for _, payload in heard)

    await eventually(arrived)
    payloads = [payload for _, payload in heard]
    return payloads[: payloads.index("zz-last")]


# -- which stores have a feed -------------------------------------------------------------------


async def test_only_postgresql_has_a_change_feed(tmp_path: Path, driver: str) -> None:
    """A PostgreSQL store, through asyncpg or psycopg (by URL or over an app's engine), is
    a ChangeFeed and a SQLStore; SQLite and MariaDB stores are not feeds (their caches use
    the TTL alone)."""
    async with writer_store(driver) as pg:
        assert isinstance(pg, ChangeFeed)
        assert isinstance(pg, SQLStore)
        over_engine = SQLStore(pg.engine, table_prefix=pg.table_prefix)
        assert isinstance(over_engine, ChangeFeed)
        assert repr(over_engine).startswith("SQLStore(")
    sqlite = SQLStore.from_url(f"sqlite:///{tmp_path / 'k.db'}")
    mysql = SQLStore.from_url("mysql://root@127.0.0.1:3306/test")
    try:
        assert not isinstance(sqlite, ChangeFeed)
        assert not isinstance(mysql, ChangeFeed)
    finally:
        await sqlite.aclose()
        await mysql.aclose()


def test_a_psycopg_older_than_3_2_has_no_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A psycopg whose ``notifies()`` takes no ``timeout`` (before 3.2), which the feed's
    pings need, gives a store without a feed: its cache keeps the TTL bound."""
    import psycopg

    async def notifies(self: psycopg.AsyncConnection[Any]) -> AsyncIterator[psycopg.Notify]:
        yield psycopg.Notify("", "", 0)  # pragma: no cover - never called

    monkeypatch.setattr(psycopg.AsyncConnection, "notifies", notifies)
    store = SQLStore.from_url("postgresql+psycopg://u@db.example/app")
    assert not isinstance(store, ChangeFeed)


@pytest.mark.parametrize(("version", "feed"), [("3.2.3", False), ("3.2.4", True), ("3.3.9", True)])
def test_a_psycopg_that_loses_notices_between_reads_has_no_feed(
    monkeypatch: pytest.MonkeyPatch, version: str, feed: bool
) -> None:
    """psycopg 3.2.0 to 3.2.3 drop a notice that arrives while ``notifies()`` is not
    running (during the feed's ping; psycopg #962, fixed in 3.2.4), so a store on one
    has no feed and its cache keeps the TTL bound; 3.2.4 and later listen."""
    import psycopg

    monkeypatch.setattr(psycopg, "__version__", version)
    store = SQLStore.from_url("postgresql+psycopg://u@db.example/app")
    assert isinstance(store, ChangeFeed) is feed


# -- what is sent -------------------------------------------------------------------------------


async def test_each_change_notifies_its_api_and_key_and_nothing_else(driver: str) -> None:
    """Each write NOTIFYs ``<api>`` or ``<api>\\n<client_id>`` on ``<prefix>changes``; a
    write that changes nothing (a refused rename, a second delete, a missing key) or is
    refused (limit, unexposed API) notifies nothing; reads notify nothing."""
    async with writer_store(driver) as store:
        channel = f"{store.table_prefix}changes"
        async with heard_on(channel) as heard:
            key = record()
            await expose(store, limit=1)
            await store.insert_key(key)
            with pytest.raises(KeyLimitReached):
                await store.insert_key(record(name="Over"))
            await store.update_key("orders", key.client_id, KeyChanges(enabled=False))
            await store.update_key("orders", "0" * 32, KeyChanges(enabled=False))
            await store.set_secret_hash("orders", key.client_id, "h", previous_until=utcnow())
            await store.lookup("orders", key.client_id)
            await store.list_keys("orders")
            assert await store.delete_key("orders", key.client_id)
            assert not await store.delete_key("orders", key.client_id)
            assert await store.delete_api("orders", force=False)
            assert not await store.delete_api("orders", force=False)
            payloads = await mark_and_wait(store, heard)
        mine = f"orders\n{key.client_id}"
        assert payloads == ["orders", mine, mine, mine, mine, "orders"]
        assert {ch for ch, _ in heard} == {channel}


async def test_notices_carry_no_secret_and_stay_small(driver: str) -> None:
    """No notice contains a secret hash (the one a key is created with, or set, or rolled
    from), and each is at most an API name and a client id long."""
    hashes = ["$pbkdf2-sha256$29000$c2VjcmV0$first-hash", "$pbkdf2-sha256$29000$c2VjcmV0$second"]
    async with (
        writer_store(driver) as store,
        heard_on(f"{store.table_prefix}changes") as heard,
    ):
        await expose(store)
        key = record(kind=KeyKind.INTERNAL, secret_hash=hashes[0])
        await store.insert_key(key)
        external = record(name="Ext")
        await store.insert_key(external)
        await store.set_secret_hash("orders", external.client_id, hashes[1])
        await store.set_secret_hash(
            "orders", external.client_id, hashes[0], previous_until=utcnow()
        )
        payloads = await mark_and_wait(store, heard)
    assert len(payloads) == 5
    for payload in payloads:
        assert not any(h in payload or h[-10:] in payload for h in hashes)
        assert len(payload.encode()) <= 64 + 1 + 64


async def test_a_rolled_back_change_notifies_nothing(driver: str) -> None:
    """A refused insert (a duplicate name, found after its NOTIFY was queued) rolls the
    notice back with it; a notice is sent only when its transaction commits."""
    async with (
        writer_store(driver) as store,
        heard_on(f"{store.table_prefix}changes") as heard,
    ):
        await expose(store)
        taken = record(name="Acme")
        await store.insert_key(taken)
        clash = record(name="ACME")
        with pytest.raises(DuplicateName):
            await store.insert_key(clash)
        async with store.engine.connect() as conn:
            await conn.begin()
            await store._announce(conn, "orders", "rolled-back")
            await conn.rollback()
        async with store.engine.begin() as conn:
            await store._announce(conn, "orders", "committed")
        payloads = await mark_and_wait(store, heard)
    assert payloads == ["orders", f"orders\n{taken.client_id}", "orders\ncommitted"]


# -- heard by another store's cache ---------------------------------------------------------------


@pytest.mark.parametrize(("writing", "reading"), list(itertools.product(DRIVERS, DRIVERS)))
async def test_every_change_reaches_another_stores_cache_at_once(
    writing: str, reading: str
) -> None:
    """Through another store object on the same tables (a ten-minute cache), on either
    driver, whichever driver made the change: a disable, a secret roll, a delete, an
    unexposed API and a deleted API are each seen as soon as they are made — only the
    feed can explain it."""
    async with writer_store(writing) as writer, reader_of(writer, driver=reading) as reader:
        await expose(writer)
        key = record(kind=KeyKind.EXTERNAL)
        await writer.insert_key(key)
        assert await reader.lookup("orders", key.client_id) == (True, key)
        await until_listening(reader)
        assert await reader.lookup("orders", key.client_id) == (True, key)  # cached again

        def sees(expected: tuple[bool, object]) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await reader.lookup("orders", key.client_id) == expected

            return check

        disabled = await writer.update_key("orders", key.client_id, KeyChanges(enabled=False))
        await eventually(sees((True, disabled)))
        rolled = await writer.set_secret_hash("orders", key.client_id, "new-hash")
        assert rolled is not None
        await eventually(sees((True, rolled)))
        await writer.upsert_api(
            "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        await eventually(sees((False, rolled)))
        await expose(writer)
        await eventually(sees((True, rolled)))
        assert await writer.delete_key("orders", key.client_id)
        await eventually(sees((True, None)))
        assert await writer.delete_api("orders", force=True)
        await eventually(sees((False, None)))


async def test_watchers_of_one_store_share_one_listening_connection(driver: str) -> None:
    """Two ``watch`` calls on one store object, in one event loop, listen through a single
    connection (outside the pool) and both hear each change; it closes, and its task
    ends, when the last one stops."""
    async with writer_store() as writer:
        inner = SQLStore.from_url(pg_url(driver), table_prefix=writer.table_prefix)
        assert isinstance(inner, _PostgreSQLStore)
        channel = f"{writer.table_prefix}changes"
        heard: tuple[list[str | None], list[str | None]] = ([], [])
        listening = partial(listening_connections, writer, channel)

        async def watchers(n: int) -> bool:
            listener = None if inner._feed is None else inner._feed.listener()
            return (0 if listener is None else len(listener.watchers)) == n

        first = anyio.CancelScope()

        async def watch_first() -> None:
            with first:
                await inner.watch(lambda _a, c: heard[0].append(c), on_ready=lambda: None)

        try:
            await expose(writer)
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_first)
                tg.start_soon(
                    partial(inner.watch, lambda _a, c: heard[1].append(c), on_ready=lambda: None)
                )
                await eventually(partial(watchers, 2))
                assert await listening() == 1
                key = record()
                await writer.insert_key(key)

                async def both_heard() -> bool:
                    return all(key.client_id in mine for mine in heard)

                await eventually(both_heard)
                first.cancel()
                await eventually(partial(watchers, 1))
                assert await listening() == 1
                tg.cancel_scope.cancel()

            async def closed() -> bool:
                return await listening() == 0 and not feed_tasks()

            await eventually(closed)
        finally:
            await inner.aclose()


async def test_a_failing_watcher_does_not_keep_a_notice_from_the_others(driver: str) -> None:
    """When one ``watch``'s ``on_change`` raises, the other watchers of the shared
    connection still hear that notice (the failure is logged)."""
    async with writer_store() as writer:
        inner = SQLStore.from_url(pg_url(driver), table_prefix=writer.table_prefix)
        assert isinstance(inner, _PostgreSQLStore)
        heard: list[str | None] = []
        first_ready = anyio.Event()

        def broken(_api: str, _client_id: str | None) -> None:
            raise RuntimeError("a watcher's bug")

        async def second_joined() -> bool:
            listener = None if inner._feed is None else inner._feed.listener()
            return listener is not None and len(listener.watchers) == 2

        try:
            await expose(writer)
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(inner.watch, broken, on_ready=first_ready.set))
                with anyio.fail_after(BOUND):
                    await first_ready.wait()  # the broken one is told first
                tg.start_soon(
                    partial(inner.watch, lambda _a, c: heard.append(c), on_ready=lambda: None)
                )
                await eventually(second_joined)
                key = record()
                await writer.insert_key(key)

                async def told() -> bool:
                    return key.client_id in heard

                await eventually(told)
                tg.cancel_scope.cancel()
        finally:
            await inner.aclose()


async def test_the_listening_connection_has_the_stores_connection_parameters(
    driver: str,
) -> None:
    """The listening connection is opened as the pool's are: with the store's
    ``connect_args`` (an ``application_name`` here) and the URL's libpq TLS parameters
    (``sslmode=require`` against the machine's server, which has no TLS: refused, so
    ``watch`` fails with StoreUnavailable)."""
    name = f"kg-feed-{secrets.token_hex(4)}"
    connect_args: dict[str, Any] = (
        {"server_settings": {"application_name": name}}
        if driver == "asyncpg"
        else {"application_name": name}
    )
    async with writer_store() as writer:
        inner = SQLStore.from_url(
            pg_url(driver), table_prefix=writer.table_prefix, connect_args=connect_args
        )
        ready = anyio.Event()
        try:
            assert isinstance(inner, _PostgreSQLStore)
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(inner.watch, lambda _a, _c: None, on_ready=ready.set))
                with anyio.fail_after(BOUND):
                    await ready.wait()
                async with writer.engine.connect() as conn:
                    found = await conn.execute(
                        text("SELECT application_name FROM pg_stat_activity WHERE query = :q"),
                        {"q": f'LISTEN "{writer.table_prefix}changes"'},
                    )
                    assert list(found.scalars()) == [name]
                tg.cancel_scope.cancel()
        finally:
            await inner.aclose()
    tls = SQLStore.from_url(f"{pg_url(driver)}?sslmode=require", timeout=1.0)
    try:
        assert isinstance(tls, _PostgreSQLStore)
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable):
            await tls.watch(lambda _a, _c: None, on_ready=lambda: None)
    finally:
        await tls.aclose()


async def test_closing_a_listening_store_ends_its_watch_and_its_connection(driver: str) -> None:
    """``aclose`` of a store while it listens ends its ``watch`` with StoreUnavailable,
    closes the listening connection and ends the feed's task, leaving nothing unclosed
    behind (no ResourceWarning, which the suite turns into an error)."""
    async with writer_store() as writer:
        inner = SQLStore.from_url(pg_url(driver), table_prefix=writer.table_prefix)
        assert isinstance(inner, _PostgreSQLStore)
        channel = f"{writer.table_prefix}changes"
        ready = anyio.Event()
        ended: list[BaseException] = []

        async def watch() -> None:
            try:
                await inner.watch(lambda _a, _c: None, on_ready=ready.set)
            except StoreUnavailable as exc:
                ended.append(exc)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                with anyio.fail_after(BOUND):
                    await ready.wait()
                assert await listening_connections(writer, channel) == 1
                assert feed_tasks()
                await inner.aclose()
        finally:
            await inner.aclose()
        assert len(ended) == 1

        async def gone() -> bool:
            return await listening_connections(writer, channel) == 0 and not feed_tasks()

        await eventually(gone)
        gc.collect()  # a connection dropped unclosed would warn now


async def test_closing_a_store_while_its_feed_connects_leaves_no_listener(driver: str) -> None:
    """``aclose`` while a ``watch`` is still opening the listening connection ends that
    ``watch`` with StoreUnavailable once the connection is open, never ready, and closes
    the connection: nothing listens on for a closed store."""
    async with writer_store() as writer:
        inner = SQLStore.from_url(pg_url(driver), table_prefix=writer.table_prefix)
        assert isinstance(inner, _PostgreSQLStore)
        channel = f"{writer.table_prefix}changes"
        connecting, go_on = anyio.Event(), anyio.Event()
        opens = _feed.feed_connector(inner.engine, inner._connect_args)

        async def open_when_told() -> _feed._Listener:
            connecting.set()
            await go_on.wait()
            return await opens()

        assert inner._channel is not None
        inner._feed = _feed.PgFeed(
            channel=inner._channel,
            connect=open_when_told,
            timeout=BOUND,
            unavailable=inner._unavailable,
        )
        readies: list[None] = []
        watching = asyncio.ensure_future(
            inner.watch(lambda _a, _c: None, on_ready=lambda: readies.append(None))
        )
        try:
            with anyio.fail_after(BOUND):
                await connecting.wait()
            await inner.aclose()
            go_on.set()
            with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable):
                await watching
        finally:
            watching.cancel()
            with contextlib.suppress(BaseException):
                await watching
            await inner.aclose()
        assert readies == []

        async def gone() -> bool:
            return await listening_connections(writer, channel) == 0 and not feed_tasks()

        await eventually(gone)
        gc.collect()  # a connection dropped unclosed would warn now


async def test_closing_a_cut_psycopg_listener_leaves_its_reader_uncancelled() -> None:
    """A psycopg listening connection closed after its socket was already shut down (by a
    ping's timer or a first close) but before its reader ran: the second shutdown, refused
    once the server has closed its end too, does not cancel the reader, which fails on its
    own (psycopg meets a cancelled ping with a cancel request to the server)."""
    store = SQLStore.from_url(pg_url("psycopg"), table_prefix=unique_prefix())
    try:
        listener = await _feed.feed_connector(store.engine, store._connect_args)()
        assert isinstance(listener, _feed._PsycopgListener)
        await listener.listen(f"{unique_prefix()}changes", ping_every=BOUND, within=BOUND)
        reader = listener.reader
        assert reader is not None
        with socket.socket(fileno=os.dup(listener.conn.fileno())) as sock:
            assert listener.cut()
            # The loop stands still meanwhile, so the reader cannot run: wait for the
            # server's end to close (TCP_CLOSE, 7), when a shutdown fails with ENOTCONN.
            deadline = time.monotonic() + BOUND
            while sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 1)[0] != 7:
                assert time.monotonic() < deadline
                time.sleep(0.01)  # noqa: ASYNC251 - the loop must not run the reader yet
        listener.close()
        with anyio.fail_after(BOUND):
            await asyncio.wait([reader])
        assert not reader.cancelled()
    finally:
        await store.aclose()
    gc.collect()  # a connection dropped unclosed would warn now


async def test_closing_a_psycopg_listener_whose_socket_is_gone_closes_it() -> None:
    """A psycopg listening connection closed when its socket can no longer be shut down
    (the server closed both ends) before its reader first ran: the reader is cancelled,
    never to run its own cleanup, and the connection is closed all the same."""
    store = SQLStore.from_url(pg_url("psycopg"), table_prefix=unique_prefix())
    try:
        listener = await _feed.feed_connector(store.engine, store._connect_args)()
        assert isinstance(listener, _feed._PsycopgListener)
        await listener.listen(f"{unique_prefix()}changes", ping_every=BOUND, within=BOUND)
        reader = listener.reader
        assert reader is not None
        with socket.socket(fileno=os.dup(listener.conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)  # behind the listener's back: it may cut again
            deadline = time.monotonic() + BOUND
            while sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 1)[0] != 7:  # TCP_CLOSE
                assert time.monotonic() < deadline
                time.sleep(0.01)  # noqa: ASYNC251 - the loop must not run the reader yet
        listener.close()
        with anyio.fail_after(BOUND):
            await asyncio.wait([reader])
        assert listener.conn.closed
    finally:
        await store.aclose()
    gc.collect()  # a connection dropped unclosed would warn now


async def test_a_lost_notice_is_still_bounded_by_the_ttl(driver: str) -> None:
    """A change that sends no notice (written behind the store's back) stays unseen while
    the cache's entry is fresh, and is seen once its TTL has passed (the test's clock)."""
    clock = Clock()
    async with (
        writer_store() as writer,
        reader_of(writer, driver=driver, ttl=1.0, clock=clock) as reader,
    ):
        await expose(writer)
        key = record()
        await writer.insert_key(key)
        assert await reader.lookup("orders", key.client_id) == (True, key)
        await until_listening(reader)
        assert await reader.lookup("orders", key.client_id) == (True, key)  # cached again
        await disable_behind_the_back(writer, key.client_id)
        # Another change, announced, of another API, heard after the one above was made.
        await writer.upsert_api(
            "billing", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )

        async def billing_seen() -> bool:
            return (await reader.lookup("billing", None))[0]

        await eventually(billing_seen)
        assert await reader.lookup("orders", key.client_id) == (True, key)
        clock.now += 1.0
        assert await reader.lookup("orders", key.client_id) == (
            True,
            dataclasses.replace(key, enabled=False),
        )


# -- the server restarts ----------------------------------------------------------------------


async def test_feed_ends_and_comes_back_when_the_server_restarts(driver: str) -> None:
    """A private PostgreSQL stopped under a listening cache: ``watch`` ends with
    StoreUnavailable; once the server is back the feed listens again by itself, the cache
    forgets what it held (notices may have been lost) and hears the next change at once."""
    clock = Clock()  # never moves: only notices and the reconnect can refresh the cache
    with private_postgres() as (port, stop, start):
        url = on_driver(f"postgresql://postgres@127.0.0.1:{port}/postgres", driver)
        writer = SQLStore.from_url(url, timeout=1.0)
        inner = ReadyCountingStore.from_url(url, timeout=1.0)
        assert isinstance(inner, ReadyCountingStore)
        reader = CachedStore(inner, ttl=1.0, clock=clock)
        probe = SQLStore.from_url(url, timeout=1.0)
        assert isinstance(probe, _PostgreSQLStore)
        try:
            # Set-up, under the 1 s timeout the test needs later: each store's first call
            # makes or checks the tables, which on a loaded machine may take longer (the
            # step goes on meanwhile), so it is retried.
            for store in (writer, inner, probe):
                await tables_ready(store)
            await expose(writer)
            key, other = record(), record(name="Other")
            await writer.insert_key(key)
            await writer.insert_key(other)
            assert await reader.lookup("orders", key.client_id) == (True, key)

            async def ready_times(n: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return inner.readies >= n

                return check

            await eventually(await ready_times(1))
            assert await reader.lookup("orders", key.client_id) == (True, key)  # cached again
            # A change no notice announces: the cache keeps answering the old key.
            await disable_behind_the_back(writer, key.client_id)
            assert await reader.lookup("orders", key.client_id) == (True, key)

            broken = anyio.Event()

            async def watch_until_broken() -> None:
                with pytest.raises(StoreUnavailable):
                    await probe.watch(lambda api, client_id: None, on_ready=lambda: None)
                broken.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_until_broken)

                async def probe_listening() -> bool:
                    return probe._feed is not None and probe._feed.listener() is not None

                await eventually(probe_listening)
                await anyio.to_thread.run_sync(stop)
                with anyio.fail_after(BOUND):
                    await broken.wait()
            await anyio.to_thread.run_sync(start)

            await eventually(await ready_times(2))
            # Listening again: the cache started afresh, so the unannounced change shows.
            disabled = dataclasses.replace(key, enabled=False)

            async def fresh() -> bool:
                try:
                    return await reader.lookup("orders", key.client_id) == (True, disabled)
                except StoreUnavailable:
                    return False  # a pooled connection of before the restart, replaced

            await eventually(fresh)
            assert await reader.lookup("orders", other.client_id) == (True, other)

            async def deleted() -> bool:
                try:
                    return await writer.delete_key("orders", other.client_id)
                except StoreUnavailable:
                    return False  # a pooled connection of before the restart, replaced

            await eventually(deleted)
            await eventually(partial(forgotten, reader, other.client_id))
        finally:
            await reader.aclose()
            await writer.aclose()
            await probe.aclose()


async def test_a_listening_connection_that_stops_answering_is_noticed(
    driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private PostgreSQL whose listening backend is frozen (SIGSTOP: no answer, no
    goodbye) is found out by the ping of the silent connection: ``watch`` ends with
    StoreUnavailable once a ping goes unanswered for the store's timeout, not minutes later
    when TCP gives up."""
    monkeypatch.setattr(_feed, "_PING_EVERY", 0.2)
    with private_postgres() as (port, _stop, _start):
        url = on_driver(f"postgresql://postgres@127.0.0.1:{port}/postgres", driver)
        store = SQLStore.from_url(url, timeout=1.0)
        assert isinstance(store, _PostgreSQLStore)
        frozen: list[int] = []
        ready, broken = anyio.Event(), anyio.Event()

        async def watch() -> None:
            with pytest.raises(StoreUnavailable) as caught:
                await store.watch(lambda _a, _c: None, on_ready=ready.set)
            assert isinstance(caught.value.__cause__, TimeoutError)
            broken.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                with anyio.fail_after(BOUND):
                    await ready.wait()
                assert store._feed is not None
                listener = store._feed.listener()
                assert listener is not None
                conn = listener.conn
                frozen.append(
                    conn.get_server_pid() if driver == "asyncpg" else conn.info.backend_pid
                )
                os.kill(frozen[0], signal.SIGSTOP)
                with anyio.fail_after(BOUND):
                    await broken.wait()
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            await store.aclose()


async def test_watch_fails_as_store_unavailable_when_the_server_is_down(driver: str) -> None:
    """With no server to listen on, ``watch`` raises StoreUnavailable within the store's
    timeout instead of hanging, and names no password."""
    url = on_driver("postgresql://postgres:pw-not-shown@127.0.0.1:1/none", driver)
    store = SQLStore.from_url(url, timeout=1.0)
    assert isinstance(store, _PostgreSQLStore)
    try:
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable) as caught:
            await store.watch(lambda api, client_id: None, on_ready=lambda: None)
        assert "pw-not-shown" not in str(caught.value)
    finally:
        await store.aclose()


def test_a_store_listens_again_in_a_new_event_loop(driver: str) -> None:
    """One store used from one event loop and then another (two ``asyncio.run``) hears
    changes in both: each loop gets its own listening connection."""
    url = pg_url(driver)
    prefix = unique_prefix()
    store = open_store(url, cache_ttl=LONG_TTL, table_prefix=prefix)
    writer = SQLStore.from_url(url, table_prefix=prefix)
    assert isinstance(store, CachedStore)

    async def round_trip() -> None:
        await expose(writer)
        key = record()
        await writer.insert_key(key)
        assert await store.lookup("orders", key.client_id) == (True, key)
        await until_listening(store)
        assert await store.lookup("orders", key.client_id) == (True, key)
        await writer.delete_key("orders", key.client_id)
        await eventually(partial(forgotten, store, key.client_id))

    try:
        asyncio.run(round_trip())
        asyncio.run(round_trip())
    finally:

        async def clean() -> None:
            await writer.get_api("orders")  # this loop's own engine, closed below
            await drop_tables(writer.engine, prefix)
            await writer.aclose()
            await store.aclose()

        asyncio.run(clean())


def test_event_loops_that_watched_are_not_kept_alive(driver: str) -> None:
    """A store watched in one ``asyncio.run`` after another keeps no loop that has ended
    (once it listens again, or is closed): each loop's connect lock used to stay in the
    feed, and with it the loop and everything the loop held, for every loop ever used."""
    import weakref

    store = SQLStore.from_url(pg_url(driver), table_prefix=unique_prefix())
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def watch_once() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await tables_ready(store)
        assert isinstance(store, ChangeFeed)
        ready = asyncio.Event()
        task = asyncio.ensure_future(store.watch(lambda _api, _id: None, on_ready=ready.set))
        with anyio.fail_after(BOUND):
            await ready.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        for _ in range(3):
            asyncio.run(watch_once())
        gc.collect()
        assert [loop() is None for loop in loops[:2]] == [True, True]
    finally:

        async def clean() -> None:
            await store.list_apis()
            await drop_tables(store.engine, store.table_prefix)
            await store.aclose()

        asyncio.run(clean())
