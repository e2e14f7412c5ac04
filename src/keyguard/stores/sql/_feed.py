"""PostgreSQL's change feed: ``NOTIFY`` in each change's transaction, ``LISTEN`` elsewhere.

Every change the SQL store makes on PostgreSQL runs ``pg_notify(channel,
notice)`` inside the change's own transaction, so PostgreSQL delivers the
notice only once the change is committed, and never for one rolled back.
The channel is ``<table prefix>changes`` (``keyguard_changes``): stores on
other prefixes, or in other databases, hear nothing of each other. The notice
is the API's name, or ``<api>\\n<client_id>`` for one key — names and client
ids only, never a secret or a hash, at most a few hundred bytes (both are
at most 64 characters), far under PostgreSQL's 8000-byte limit.

Listening needs a connection of its own, kept out of the pool: a listening
connection must stay open, and a pooled one goes back to serve other calls.
:class:`PgFeed` keeps one per event loop (asyncpg's connections belong to the
loop that opened them), shared by every ``watch`` of the store in that loop.
It ends ``watch`` with ``StoreUnavailable`` when the connection drops (a
server restart, a network cut): its caller, ``CachedStore``, falls back to
its TTL meanwhile, listens again with a backoff, and forgets what it cached
once listening again, since notices may have been lost in between.

Only asyncpg, the default PostgreSQL driver, listens; a store on another
driver (psycopg) still *sends* notices, which asyncpg stores elsewhere hear,
but has no feed itself: its cache is bounded by its TTL alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keyguard.errors import StoreUnavailable

logger = logging.getLogger("keyguard")

_NOTIFY = text("SELECT pg_notify(:channel, :notice)")
_PING_EVERY = 15.0  # seconds between two checks that a silent listening connection lives

OnChange = Callable[[str, str | None], None]


def channel_for(prefix: str) -> str:
    """The NOTIFY channel of the tables ``<prefix>*``."""
    return f"{prefix}changes"


def notice_for(api: str, client_id: str | None) -> str:
    """The notice of a change to ``api`` (to its key ``client_id``, if given)."""
    return api if client_id is None else f"{api}\n{client_id}"


def parse_notice(notice: str) -> tuple[str, str | None]:
    """``(api, client_id)`` from a notice (``client_id`` ``None`` for the API itself)."""
    api, newline, client_id = notice.partition("\n")
    return api, client_id if newline else None


async def announce(conn: AsyncConnection, channel: str, api: str, client_id: str | None) -> None:
    """Queue the notice of a change in the transaction of ``conn``: sent at its commit."""
    await conn.execute(_NOTIFY, {"channel": channel, "notice": notice_for(api, client_id)})


def listens(engine: object) -> bool:
    """Whether a store on ``engine`` has a change feed: PostgreSQL through asyncpg."""
    if not isinstance(engine, AsyncEngine):
        return False
    dialect = engine.dialect
    return dialect.name == "postgresql" and dialect.driver == "asyncpg"


def asyncpg_connector(
    engine: AsyncEngine, connect_args: dict[str, Any]
) -> Callable[[], Awaitable[Any]]:
    """What opens a bare asyncpg connection to ``engine``'s database, as its pool would
    (the URL's parameters, then ``connect_args``), but outside the pool."""
    url: URL = engine.url
    cargs, cparams = engine.dialect.create_connect_args(url)
    options = {**cparams, **connect_args}
    # The dialect's own options, which asyncpg.connect does not take.
    options.pop("prepared_statement_cache_size", None)
    options.pop("prepared_statement_name_func", None)
    creator = options.pop("async_creator_fn", None)

    async def connect() -> Any:
        if creator is not None:
            return await creator(*cargs, **options)
        import asyncpg

        return await asyncpg.connect(*cargs, **options)

    return connect


class _Listener:
    """One event loop's listening connection and the ``watch`` calls sharing it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.watchers: list[OnChange] = []
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pinger: asyncio.Task[None] | None = None

    def heard(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        api, client_id = parse_notice(payload)
        for on_change in list(self.watchers):
            on_change(api, client_id)

    def end(self, why: BaseException) -> None:
        """Mark the connection lost (once): every watcher of it raises ``why``."""
        if not self.lost.done():
            self.lost.set_exception(why)
            self.lost.exception()  # retrieved: nobody may be waiting any more

    def terminated(self, _conn: object) -> None:
        self.end(ConnectionResetError("the listening connection closed"))

    async def ping(self, every: float, within: float) -> None:
        """Check now and then that a quiet connection still lives (a cut without a
        goodbye is otherwise only noticed by the next query)."""
        while True:
            await asyncio.sleep(every)
            try:
                with anyio.fail_after(within):
                    await self.conn.fetchval("SELECT 1")
            except Exception as exc:
                self.end(exc)
                return

    def close(self) -> None:
        """Cut the connection, without waiting on a server that may not answer."""
        if self.pinger is not None:
            self.pinger.cancel()
        self.end(ConnectionResetError("the listening connection was closed"))
        with contextlib.suppress(Exception):
            self.conn.terminate()


class PgFeed:
    """LISTEN for one store: one connection per event loop, shared by its ``watch`` calls."""

    def __init__(
        self,
        *,
        channel: str,
        connect: Callable[[], Awaitable[Any]],
        timeout: float,
        unavailable: Callable[[BaseException], StoreUnavailable],
    ) -> None:
        self.channel = channel
        self._connect = connect
        self._timeout = timeout
        self._unavailable = unavailable
        self._by_loop: dict[asyncio.AbstractEventLoop, _Listener] = {}
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}
        self._closed = False

    def listener(self) -> _Listener | None:
        """The running loop's live listener, if any (for tests and monitoring)."""
        found = self._by_loop.get(asyncio.get_running_loop())
        return None if found is None or found.lost.done() else found

    async def watch(self, on_change: OnChange, *, on_ready: Callable[[], None]) -> None:
        """The ``ChangeFeed`` contract: listen until cancelled or the connection drops."""
        listener = await self._join()
        listener.watchers.append(on_change)
        try:
            on_ready()
            await asyncio.shield(listener.lost)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from exc
        finally:
            listener.watchers.remove(on_change)
            if not listener.watchers:
                self._leave(listener)
        raise AssertionError("unreachable")  # pragma: no cover - ``lost`` only fails

    async def _join(self) -> _Listener:
        """The running loop's listener, connected now if there is none (within the timeout)."""
        if self._closed:
            raise StoreUnavailable("SQL store is closed")
        loop = asyncio.get_running_loop()
        for other in [other for other in self._by_loop if other.is_closed()]:
            self._by_loop.pop(other, None)  # its loop is gone, and its connection with it
            self._locks.pop(other, None)
        lock = self._locks.setdefault(loop, asyncio.Lock())
        try:
            with anyio.fail_after(self._timeout):
                async with lock:
                    found = self._by_loop.get(loop)
                    if found is not None and not found.lost.done():
                        return found
                    conn = await self._connect()
                    listener = _Listener(conn)
                    try:
                        conn.add_termination_listener(listener.terminated)
                        await conn.add_listener(self.channel, listener.heard)
                    except BaseException:
                        listener.close()
                        raise
                    listener.pinger = loop.create_task(
                        listener.ping(_PING_EVERY, self._timeout), name="keyguard-sql-feed-ping"
                    )
                    self._by_loop[loop] = listener
                    return listener
        except (StoreUnavailable, asyncio.CancelledError):
            raise
        except Exception as exc:  # the driver's, the network's, or the deadline's
            raise self._unavailable(exc) from exc

    def _leave(self, listener: _Listener) -> None:
        """Close ``listener`` (its last watcher left, or it broke)."""
        listener.close()
        for loop, found in list(self._by_loop.items()):
            if found is listener:
                del self._by_loop[loop]

    def aclose(self) -> None:
        """Close the listening connection of the running loop; others go with their loops."""
        self._closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        listener = self._by_loop.pop(loop, None)
        if listener is not None:
            listener.close()
