"""PostgreSQL's change feed (SPEC §11) at its edges: starting it against a server that
freezes once connected, closing it meanwhile, listeners left in event loops closed by
hand, and an ``on_ready`` that fails.

On both drivers that listen, against a private PostgreSQL where a server must freeze
(SIGSTOP, only ever of that private server) or where its connections are counted, and
the machine's otherwise. Nothing is timed: a psycopg query that the feed let be
cancelled shows in psycopg's own warnings (its cancel request, then its wait for the
server), and a connection left open shows in ``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import anyio
import asyncpg
import pytest

from keyguard.errors import StoreUnavailable
from keyguard.stores import CachedStore
from keyguard.stores.sql import SQLStore, _feed
from keyguard.stores.sql._store import _PostgreSQLStore
from tests.helpers import eventually
from tests.stores.test_cache import FeedStore
from tests.stores.test_pg_feed import (
    BOUND,
    driver,
    feed_tasks,
    listening_connections,
    on_driver,
    pg_url,
    writer_store,
)
from tests.test_outages import private_postgres

pytestmark = pytest.mark.anyio

__all__ = ["driver"]  # the fixture, imported to be used here


def backend_pid(listener: _feed._Listener) -> int:
    """The server process of a listening connection."""
    conn = listener.conn
    return int(
        conn.get_server_pid() if isinstance(conn, asyncpg.Connection) else conn.info.backend_pid
    )


def frozen_once_connected(
    store: _PostgreSQLStore, frozen: list[int], connected: anyio.Event, *, timeout: float
) -> None:
    """Give ``store`` a feed whose server freezes (its backend SIGSTOPped) once the
    listening connection is open, before its LISTEN; the pids go to ``frozen``."""
    opens = _feed.feed_connector(store.engine, store._connect_args)

    async def open_then_freeze() -> _feed._Listener:
        listener = await opens()
        frozen.append(backend_pid(listener))
        os.kill(frozen[-1], signal.SIGSTOP)
        connected.set()
        return listener

    assert store._channel is not None
    store._feed = _feed.PgFeed(
        channel=store._channel,
        connect=open_then_freeze,
        timeout=timeout,
        unavailable=store._unavailable,
    )


@contextmanager
def thawed(frozen: list[int]) -> Iterator[None]:
    """SIGCONT every process in ``frozen`` on the way out."""
    try:
        yield
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


def psycopg_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What psycopg warned of (a query it cancelled: its cancel request, its wait)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")]


# -- a server that freezes before the LISTEN --------------------------------------------------


async def test_a_feed_starting_on_a_frozen_server_gives_up_at_its_timeout(
    driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server frozen between the listening connection's connect and its LISTEN:
    ``watch`` fails with StoreUnavailable at the store's timeout, the LISTEN cut rather
    than cancelled (psycopg would send a cancel request and wait seconds more for the
    frozen server, warning of it), and the feed leaves no task behind."""
    caplog.set_level(logging.WARNING, logger="psycopg")
    with private_postgres() as (port, _stop, _start):
        url = on_driver(f"postgresql://postgres@127.0.0.1:{port}/postgres", driver)
        store = SQLStore.from_url(url, timeout=1.0)
        assert isinstance(store, _PostgreSQLStore)
        frozen: list[int] = []
        frozen_once_connected(store, frozen, anyio.Event(), timeout=1.0)
        with thawed(frozen):
            try:
                with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable) as caught:
                    await store.watch(lambda _a, _c: None, on_ready=lambda: None)
                assert isinstance(caught.value.__cause__, TimeoutError)
                assert frozen
                assert not feed_tasks()
            finally:
                await store.aclose()
    assert psycopg_warnings(caplog) == []


async def test_closing_a_cache_whose_feed_starts_on_a_frozen_server_does_not_wait(
    driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``aclose`` of a cache while its feed's LISTEN waits on a frozen server (the store's
    timeout far away) cuts the connection instead of cancelling the LISTEN, which psycopg
    meets with a cancel request and seconds of waiting on the server (warning of it): no
    query of the feed is cancelled, and no task of it is left once ``aclose`` returns."""
    caplog.set_level(logging.WARNING, logger="psycopg")
    with private_postgres() as (port, _stop, _start):
        url = on_driver(f"postgresql://postgres@127.0.0.1:{port}/postgres", driver)
        store = SQLStore.from_url(url, timeout=BOUND)
        assert isinstance(store, _PostgreSQLStore)
        frozen: list[int] = []
        connected = anyio.Event()
        frozen_once_connected(store, frozen, connected, timeout=BOUND)
        cache = CachedStore(store, ttl=1.0)
        with thawed(frozen):
            try:
                await cache.lookup("orders", None)  # starts the watcher (no such API)
                with anyio.fail_after(BOUND):
                    await connected.wait()
                await anyio.sleep(0.1)  # the LISTEN sent, and waiting on the server
                with anyio.fail_after(BOUND):
                    await cache.aclose()
                assert not feed_tasks()
            finally:
                await cache.aclose()
    assert psycopg_warnings(caplog) == []


# -- event loops closed by hand ---------------------------------------------------------------


def test_listeners_of_event_loops_closed_by_hand_are_closed(driver: str) -> None:
    """A store listening in an event loop closed by hand, its tasks left pending: its
    listening connection is closed, not only dropped, as soon as the store listens in
    another loop or is closed — the server ends it at once (``pg_stat_activity``, only
    this test's application name counted) and nothing is left to warn (ResourceWarning)
    or to fail (the loop gone) when collected."""
    name = f"kg-feed-{secrets.token_hex(4)}"
    connect_args: dict[str, Any] = (
        {"server_settings": {"application_name": name}}
        if driver == "asyncpg"
        else {"application_name": name}
    )
    with private_postgres() as (port, _stop, _start):
        url = on_driver(f"postgresql://postgres@127.0.0.1:{port}/postgres", driver)
        store = SQLStore.from_url(url, connect_args=connect_args)
        assert isinstance(store, _PostgreSQLStore)

        async def mine() -> int:
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
            try:
                found = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
                )
                return int(found)
            finally:
                await conn.close()

        def count_is(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await mine() == n

            return check

        async def listen_here() -> None:
            ready = asyncio.Event()
            asyncio.get_running_loop().create_task(
                store.watch(lambda _a, _c: None, on_ready=ready.set)
            )
            with anyio.fail_after(BOUND):
                await ready.wait()

        def listen_then_close_by_hand() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(listen_here())
            finally:
                loop.close()  # its tasks (the watch, the feed's) left pending

        async def listen_elsewhere() -> None:
            await eventually(count_is(1))  # the closed loop's, still open
            ready = asyncio.Event()
            watching = asyncio.create_task(store.watch(lambda _a, _c: None, on_ready=ready.set))
            with anyio.fail_after(BOUND):
                await ready.wait()
            await eventually(count_is(1))  # only this loop's now
            watching.cancel()
            await asyncio.wait([watching])

        async def close_store() -> None:
            await eventually(count_is(1))
            await store.aclose()
            await eventually(count_is(0))

        listen_then_close_by_hand()
        asyncio.run(listen_elsewhere())
        listen_then_close_by_hand()
        asyncio.run(close_store())
        gc.collect()  # a connection dropped unclosed, or a cleanup needing its loop, fails now


# -- on_ready -------------------------------------------------------------------------------------


async def test_an_on_ready_that_fails_is_raised_as_it_is(driver: str) -> None:
    """An ``on_ready`` callback's own error ends ``watch`` as it is, with its traceback,
    not disguised as an outage (StoreUnavailable); the listening connection is closed."""
    async with writer_store() as writer:
        inner = SQLStore.from_url(pg_url(driver), table_prefix=writer.table_prefix)
        assert isinstance(inner, _PostgreSQLStore)

        def broken() -> None:
            raise RuntimeError("a callback's bug")

        try:
            with anyio.fail_after(BOUND), pytest.raises(RuntimeError, match="a callback's bug"):
                await inner.watch(lambda _a, _c: None, on_ready=broken)
            channel = f"{writer.table_prefix}changes"
            await eventually(partial(_nothing_listens, writer, channel))
        finally:
            await inner.aclose()


async def _nothing_listens(store: SQLStore, channel: str) -> bool:
    return await listening_connections(store, channel) == 0 and not feed_tasks()


class BrokenFeedStore(FeedStore):
    """A memory store whose change feed fails with a bug of its own, not an outage."""

    async def watch(
        self, on_change: Callable[[str, str | None], None], *, on_ready: Callable[[], None]
    ) -> None:
        self.listeners.append(on_change)
        raise RuntimeError("a feed's bug")


async def test_a_cache_logs_a_feed_that_fails_with_a_bug_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A change feed that fails with something other than StoreUnavailable (a bug, of the
    feed or of a callback) is logged by the cache with its traceback, once, not as the
    store's outage ("change feed lost"); the cache keeps answering meanwhile."""
    caplog.set_level(logging.INFO, logger="keyguard")
    feed = BrokenFeedStore()
    cache = CachedStore(feed, ttl=60)
    try:
        assert await cache.lookup("orders", None) == (False, None)

        async def tried_twice() -> bool:
            return len(feed.listeners) >= 2

        await eventually(tried_twice)
        records = [r for r in caplog.records if "change feed" in r.getMessage()]
        assert [r.getMessage() for r in records] == ["key store change feed failed; retrying"]
        assert records[0].levelno == logging.ERROR
        assert records[0].exc_info is not None
        assert str(records[0].exc_info[1]) == "a feed's bug"
    finally:
        await cache.aclose()
