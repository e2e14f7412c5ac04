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
:class:`PgFeed` keeps one per event loop (a driver's connections belong to the
loop that opened them), shared by every ``watch`` of the store in that loop. One
of a loop closed by hand, its tasks left pending, is closed without it (the
server ends its side at once) when the store next listens, or is closed.
It ends ``watch`` with ``StoreUnavailable`` when the connection drops (a
server restart, a network cut): its caller, ``CachedStore``, falls back to
its TTL meanwhile, listens again with a backoff, and forgets what it cached
once listening again, since notices may have been lost in between.

Both PostgreSQL drivers listen, with the same guarantees. On asyncpg (the
default) the connection calls back for each notice and when it closes, and a
task pings it when quiet. On psycopg 3.2.4 or later (``postgresql+psycopg://``;
an older psycopg has no feed, and its cache keeps the TTL bound: before 3.2 its
``notifies()`` takes no timeout, and 3.2.0 to 3.2.3 drop a notice arriving
between two reads, psycopg #962) one task per
connection sends the ``LISTEN``, then reads ``notifies()`` — which holds the
connection while it waits — for ``_PING_EVERY`` seconds at a time and pings in
between; a notice arriving during the ping is kept by psycopg for the next read.
None of its queries is ever cancelled (psycopg meets that with a cancel request
and seconds of waiting on a server that may be frozen): a deadline, a
cancellation or ``aclose`` shuts the connection's socket down instead, which
fails the query at once, within the store's timeout in all. Either connection is
opened as the engine's pool would open one (the URL's parameters, libpq's TLS
ones among them, then the store's ``connect_args``: timeouts, application
name), but outside the pool; psycopg's in autocommit, so ``LISTEN`` takes
effect at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keyguard.errors import StoreClosed, StoreUnavailable

logger = logging.getLogger("keyguard")

_NOTIFY = text("SELECT pg_notify(:channel, :notice)")
_DRIVERS = ("asyncpg", "psycopg")  # the PostgreSQL drivers that listen
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
    """Whether a store on ``engine`` has a change feed: PostgreSQL through asyncpg or
    psycopg."""
    if not isinstance(engine, AsyncEngine):
        return False
    dialect = engine.dialect
    if dialect.name != "postgresql" or dialect.driver not in _DRIVERS:
        return False
    return dialect.driver != "psycopg" or _psycopg_reads_with_a_timeout()


_PSYCOPG_KEEPS_NOTICES = (3, 2, 4)  # the first psycopg that keeps a notice for the next read


def _psycopg_reads_with_a_timeout() -> bool:
    """Whether the installed psycopg's ``notifies()`` takes a ``timeout`` (psycopg 3.2 and
    later), which the feed's pings need, and keeps a notice arriving between two reads
    (3.2.4 and later; 3.2.0 to 3.2.3 drop it, psycopg #962): else a psycopg store has no
    feed."""
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the engine could not exist without it
        return False
    if "timeout" not in inspect.signature(psycopg.AsyncConnection.notifies).parameters:
        return False
    numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", psycopg.__version__)
    if numbers is None:  # pragma: no cover - psycopg's versions are x.y.z[suffix]
        return False
    return tuple(int(n) for n in numbers.groups()) >= _PSYCOPG_KEEPS_NOTICES


def feed_connector(
    engine: AsyncEngine, connect_args: dict[str, Any]
) -> Callable[[], Awaitable[_Listener]]:
    """What opens ``engine``'s listening connection (not yet listening), for its driver."""
    if engine.dialect.driver == "psycopg":
        return psycopg_connector(engine, connect_args)
    return asyncpg_connector(engine, connect_args)


def asyncpg_connector(
    engine: AsyncEngine, connect_args: dict[str, Any]
) -> Callable[[], Awaitable[_Listener]]:
    """What opens a bare asyncpg connection to ``engine``'s database, as its pool would
    (the URL's parameters, then ``connect_args``), but outside the pool."""
    url: URL = engine.url
    cargs, cparams = engine.dialect.create_connect_args(url)
    options = {**cparams, **connect_args}
    # The dialect's own options, which asyncpg.connect does not take.
    options.pop("prepared_statement_cache_size", None)
    options.pop("prepared_statement_name_func", None)
    creator = options.pop("async_creator_fn", None)

    async def connect() -> _Listener:
        if creator is not None:
            return _AsyncpgListener(await creator(*cargs, **options))
        import asyncpg

        return _AsyncpgListener(await asyncpg.connect(*cargs, **options))

    return connect


def psycopg_connector(
    engine: AsyncEngine, connect_args: dict[str, Any]
) -> Callable[[], Awaitable[_Listener]]:
    """What opens a bare psycopg 3 connection to ``engine``'s database in autocommit, as
    its pool would (the URL's parameters, libpq's TLS ones among them, then
    ``connect_args``: ``connect_timeout``, ``options``…), but outside the pool."""
    url: URL = engine.url
    cargs, cparams = engine.dialect.create_connect_args(url)
    options = {**cparams, **connect_args}
    options.pop("context", None)  # SQLAlchemy's type adapters: a listener reads no rows
    creator = options.pop("async_creator_fn", None)
    options["autocommit"] = True  # LISTEN takes effect at once, outside any transaction

    async def connect() -> _Listener:
        if creator is not None:
            return _PsycopgListener(await creator(*cargs, **options))
        import psycopg

        return _PsycopgListener(await psycopg.AsyncConnection.connect(*cargs, **options))

    return connect


class _Listener:
    """One event loop's listening connection and the ``watch`` calls sharing it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.watchers: list[OnChange] = []
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()

    def heard(self, payload: str) -> None:
        """Tell every watcher of the change ``payload`` announces."""
        api, client_id = parse_notice(payload)
        for on_change in list(self.watchers):
            try:
                on_change(api, client_id)
            except Exception:  # one watcher's bug; the others still hear the notice
                logger.exception("key store change feed: a watcher failed")

    def end(self, why: BaseException) -> None:
        """Mark the connection lost (once): every watcher of it raises ``why``."""
        if not self.lost.done():
            self.lost.set_exception(why)
            self.lost.exception()  # retrieved: nobody may be waiting any more

    async def listen(self, channel: str, *, ping_every: float, within: float) -> None:
        """LISTEN on ``channel`` and start watching the connection (pinging it when
        silent for ``ping_every`` seconds, giving it ``within`` seconds to answer)."""
        raise NotImplementedError

    def close(self) -> None:
        """Cut the connection, without waiting on a server that may not answer."""
        raise NotImplementedError

    def tasks(self) -> list[asyncio.Task[None]]:
        """Its tasks (reading or pinging the connection)."""
        raise NotImplementedError

    async def closed(self, within: float) -> None:
        """Once cut (``close``), wait the moment its tasks take to fail (at most
        ``within`` s): a loop ending next would cancel them, and psycopg meets a query
        cancelled with a cancel request to the server, and seconds of waiting if it is
        frozen."""
        tasks = [task for task in self.tasks() if not task.done()]
        if tasks and not self.loop.is_closed():
            with anyio.CancelScope(shield=True):
                await asyncio.wait(tasks, timeout=within)

    def abandon(self) -> None:
        """Close the connection of a loop closed by hand, its tasks left pending: without
        the loop, which can no longer run anything (the server ends its side at once)."""
        with contextlib.suppress(RuntimeError):  # telling a waiter needs the loop
            self.end(ConnectionResetError("the listening connection's event loop closed"))


class _AsyncpgListener(_Listener):
    """An asyncpg connection: it calls back for each notice and when it closes."""

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.pinger: asyncio.Task[None] | None = None

    def tasks(self) -> list[asyncio.Task[None]]:
        return [] if self.pinger is None else [self.pinger]

    def notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.heard(payload)

    def terminated(self, _conn: object) -> None:
        self.end(ConnectionResetError("the listening connection closed"))

    async def listen(self, channel: str, *, ping_every: float, within: float) -> None:
        self.conn.add_termination_listener(self.terminated)
        await self.conn.add_listener(channel, self.notified)
        self.pinger = asyncio.get_running_loop().create_task(
            self.ping(ping_every, within), name="keyguard-sql-feed-ping"
        )

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
        if self.loop.is_closed():
            self.abandon()
            return
        if self.pinger is not None:
            self.pinger.cancel()
        self.end(ConnectionResetError("the listening connection was closed"))
        with contextlib.suppress(Exception):
            self.conn.terminate()

    def abandon(self) -> None:
        super().abandon()
        # ``terminate`` says goodbye to the server, so it ends the backend at once, then
        # fails to schedule closing the socket with the loop; asyncio's own last step of
        # that closes it (else it stays open, with a ResourceWarning, until collected).
        with contextlib.suppress(Exception):
            self.conn.terminate()
        transport = getattr(self.conn, "_transport", None)
        with contextlib.suppress(Exception):
            getattr(transport, "_call_connection_lost", lambda _: None)(None)


class _PsycopgListener(_Listener):
    """A psycopg 3 connection in autocommit: one task reads its notices (``notifies()``,
    which holds the connection) and, between two reads, pings it.

    Cutting it shuts its socket down rather than cancelling the task: psycopg meets a
    cancelled query with a cancel request to the server (seconds, if the server does not
    answer), whereas a shut socket fails the read or the ping at once, and the task then
    closes the connection itself (the socket stays open, and registered with the loop,
    until nothing waits on it any more).
    """

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.reader: asyncio.Task[None] | None = None
        self._silent: str | None = None  # why the connection was cut, if a ping timed out
        self._shut = False  # whether its socket was shut down (the reader then fails)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [] if self.reader is None else [self.reader]

    async def listen(self, channel: str, *, ping_every: float, within: float) -> None:
        from psycopg import sql

        query = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
        listening: asyncio.Future[None] = self.loop.create_future()
        self.reader = self.loop.create_task(
            self.read(query, listening, ping_every, within), name="keyguard-sql-feed-read"
        )
        # The reader sends the LISTEN, never cancelled: a deadline or a cancellation of
        # this wait ends in ``close``, whose cut fails the LISTEN at once.
        await asyncio.shield(listening)

    async def read(
        self, listen: Any, listening: asyncio.Future[None], every: float, within: float
    ) -> None:
        """LISTEN, then hear notices until the connection fails; check it after each
        ``every`` seconds."""
        try:
            if not self.conn.autocommit:  # an ``async_creator_fn``'s connection, maybe
                await self.conn.set_autocommit(True)
            await self.conn.execute(listen)
            listening.set_result(None)
            while True:
                async for notify in self.conn.notifies(timeout=every):
                    self.heard(notify.payload)
                await self.ping(within)
        except Exception as exc:
            why = TimeoutError(self._silent) if self._silent else exc
            if not listening.done():
                listening.set_exception(why)
                listening.exception()  # retrieved: ``listen`` may have given up waiting
            self.end(why)
        finally:
            # (Each needs the loop, when someone waits: not so once it was closed by hand.)
            with contextlib.suppress(RuntimeError):
                listening.cancel()
            with contextlib.suppress(RuntimeError):
                self.end(ConnectionResetError("the listening connection was closed"))
            self.conn.pgconn.finish()

    async def ping(self, within: float) -> None:
        """``SELECT 1``; the connection is cut if no answer comes within ``within`` s.
        (A notice arriving meanwhile is kept by psycopg for the next read.)"""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(within, self.cut, f"no answer to a ping within {within:g} s")
        try:
            await self.conn.execute("SELECT 1")
        finally:
            timer.cancel()

    def cut(self, why: str | None = None) -> bool:
        """Shut the connection's socket down (the reader fails at once); whether it could."""
        self._silent = self._silent or why
        try:
            sock = socket.socket(fileno=os.dup(self.conn.fileno()))
        except Exception:
            return False  # already closed
        with sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
        self._shut = True
        return True

    def close(self) -> None:
        if self.loop.is_closed():
            self.abandon()
            return
        self.end(ConnectionResetError("the listening connection was closed"))
        reader = self.reader
        if reader is None or reader.done():
            self.conn.pgconn.finish()  # nothing waits on it
        elif not self._shut and not self.cut():
            reader.cancel()  # its socket is gone already: nothing to wait on
            # A task cancelled before it first ran never runs its ``finally``.
            reader.add_done_callback(self._finish)
        # (Once shut, a second shutdown fails when the server has closed its end too:
        # the reader fails on its own then, never to be cancelled in a ping.)

    def _finish(self, _reader: object) -> None:
        self.conn.pgconn.finish()

    def abandon(self) -> None:
        super().abandon()
        self.conn.pgconn.finish()  # libpq's goodbye and close, which need no loop


class PgFeed:
    """LISTEN for one store: one connection per event loop, shared by its ``watch`` calls."""

    def __init__(
        self,
        *,
        channel: str,
        connect: Callable[[], Awaitable[_Listener]],
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
        """The ``ChangeFeed`` contract: listen until cancelled or the connection drops
        (``StoreUnavailable``). An error of ``on_ready`` is raised as it is: the caller's
        bug, not an outage."""
        listener = await self._join()
        listener.watchers.append(on_change)
        try:
            # The caller's own: an error of it is raised as it is, not as an outage.
            on_ready()
            try:
                await asyncio.shield(listener.lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:  # ``aclose`` closed the listener: the feed ends for good
                    raise StoreClosed("SQL store is closed") from exc
                raise self._unavailable(exc) from exc
        finally:
            listener.watchers.remove(on_change)
            if not listener.watchers:
                self._leave(listener)
                await listener.closed(self._timeout)
        raise AssertionError("unreachable")  # pragma: no cover - ``lost`` only fails

    async def _join(self) -> _Listener:
        """The running loop's listener, connected now if there is none (within the timeout)."""
        if self._closed:
            raise StoreClosed("SQL store is closed")
        loop = asyncio.get_running_loop()
        self._abandon_closed_loops()
        lock = self._locks.setdefault(loop, asyncio.Lock())
        try:
            with anyio.fail_after(self._timeout):
                async with lock:
                    found = self._by_loop.get(loop)
                    if found is not None and not found.lost.done():
                        return found
                    listener = await self._connect()
                    try:
                        await listener.listen(
                            self.channel, ping_every=_PING_EVERY, within=self._timeout
                        )
                        if self._closed:  # ``aclose`` came while this connected
                            raise StoreClosed("SQL store is closed")
                    except BaseException:
                        listener.close()
                        await listener.closed(self._timeout)
                        raise
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

    def _abandon_closed_loops(self) -> None:
        """Close the connections of loops closed by hand (their tasks left pending), and
        forget every closed loop (its lock would keep it, and all it holds, alive)."""
        for other in [other for other in self._by_loop if other.is_closed()]:
            listener = self._by_loop.pop(other, None)
            if listener is not None:
                listener.abandon()
        for other in [other for other in self._locks if other.is_closed()]:
            del self._locks[other]

    async def aclose(self) -> None:
        """Close the listening connection of the running loop, and those of loops closed
        by hand; another loop's goes when that loop ends its tasks."""
        self._closed = True
        self._abandon_closed_loops()
        listener = self._by_loop.pop(asyncio.get_running_loop(), None)
        if listener is not None:
            listener.close()
            await listener.closed(self._timeout)
