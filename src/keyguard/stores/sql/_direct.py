"""The request path's reads on driver connections kept for them.

``lookup`` and ``snapshot`` are single statements. Through SQLAlchemy each
costs a pool checkout, a transaction wrapper, an isolation-level reset on
return and result processing in a greenlet: several times the driver's own
round trip (docs/benchmarks.md measures it). Here the same statement, compiled
once by SQLAlchemy for the database, runs on the driver connection itself
(asyncpg ``fetch``, aiosqlite ``execute_fetchall``, asyncmy / aiomysql
``cursor.execute``) of a connection checked out of the store's pool, switched
to autocommit (each read sees every commit before it, and holds no snapshot),
and kept for these reads. Column values go through the same result processors
SQLAlchemy would apply, so rows read either way are equal.

A read here never changes what a caller sees, only what it costs:

- at most ``KEPT`` connections per event loop (never more than half the pool):
  a read finding them all busy takes the pooled path instead of waiting;
- a read that fails in any way (a dead connection after a server restart, a
  dropped table) discards its connection and answers ``None``: the caller
  then takes the pooled path, with its retry and its error reporting;
- a read past the store's timeout, or cancelled, cuts its connection (its
  state mid-statement is unknown) and raises;
- while SQLAlchemy's ``before_cursor_execute`` / ``after_cursor_execute``
  events have listeners on the engine (the application's instrumentation,
  statement logging, tests counting statements) or the engine logs its
  statements (``echo``, or its logger's level at INFO), reads take the pooled
  path, so that every statement is seen where it always was;
- drivers other than these (psycopg…) always take the pooled path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import Select, event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import QueuePool, SingletonThreadPool, StaticPool

from keyguard.stores.sql._engine import _running_loop, _sever

__all__ = ["KEPT", "DirectReads"]

KEPT = 2
"""Connections kept for direct reads, per event loop, at most."""

_DRIVERS = frozenset({"asyncpg", "aiosqlite", "asyncmy", "aiomysql"})


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A statement as its database's driver takes it: text, positional parameter names,
    and per column the result processor SQLAlchemy would run (by index)."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]
    row: type[tuple[Any, ...]]

    @classmethod
    def of(cls, statement: Select[Any], dialect: Dialect) -> _Compiled:
        compiled = statement.compile(dialect=dialect)
        columns = list(statement.selected_columns)
        processors = []
        for index, column in enumerate(columns):
            process = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if process is not None:
                processors.append((index, process))
        names = tuple(compiled.positiontup or ())
        if not names and compiled.params:  # a paramstyle without positions: not for us
            raise ValueError("statement has named parameters only")
        row = collections.namedtuple("Row", [column.key for column in columns])  # type: ignore[misc]
        return cls(str(compiled), names, tuple(processors), row)

    def rows(self, raw: Any) -> list[Any]:
        out = []
        make = self.row._make  # type: ignore[attr-defined]
        processors = self.processors
        for found in raw:
            values = list(found)
            for index, process in processors:
                values[index] = process(values[index])
            out.append(make(values))
        return out


class _Kept:
    """One kept connection: SQLAlchemy's, and the driver's under it."""

    __slots__ = ("conn", "driver")

    def __init__(self, conn: AsyncConnection, driver: Any) -> None:
        self.conn = conn
        self.driver = driver


def _capacity(engine: AsyncEngine) -> int:
    """How many connections may be kept from ``engine``'s pool: none from a pool that
    shares one connection, at most half of a fixed-size pool."""
    pool = engine.sync_engine.pool
    if isinstance(pool, StaticPool | SingletonThreadPool):
        return 0
    if isinstance(pool, QueuePool):
        return min(KEPT, pool.size() // 2)
    return KEPT  # NullPool and the like: every connection is a new one anyway


class DirectReads:
    """The kept connections of one event loop's engine, and the statements compiled
    for them (see the module's docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dispatch = engine.sync_engine.dispatch
        self._sync = engine.sync_engine
        dialect = engine.dialect
        self._dialect = dialect
        self._driver = dialect.driver
        self.capacity = _capacity(engine) if dialect.driver in _DRIVERS else 0
        self._idle: list[_Kept] = []
        self._opened = 0
        self._compiled: dict[str, _Compiled] = {}
        self._discarding: set[asyncio.Task[None]] = set()
        self._closed = False
        self.served = 0  # reads answered here (for tests and monitoring)
        if self.capacity:
            # An engine disposed while this store is still open (an app closing its own
            # engine and not the store): kept connections are checked out, which dispose
            # leaves alone, so they are given up here rather than left for the garbage
            # collector to find open.
            event.listen(engine.sync_engine, "engine_disposed", self._engine_disposed)

    @property
    def kept(self) -> int:
        """Connections held now (idle or reading)."""
        return self._opened

    def usable(self) -> bool:
        """Whether a read may come here now: a capable driver, and nobody listening to
        the engine's statements."""
        dispatch = self._dispatch
        return (
            self.capacity > 0
            and not self._closed
            and not dispatch.before_cursor_execute
            and not dispatch.after_cursor_execute
            and not self._sync.echo
            # SQLAlchemy's statement log turned on through ``logging`` rather than echo.
            and not self._sync._should_log_info()
        )

    async def fetch(
        self, name: str, statement: Select[Any], values: Mapping[str, Any], within: float
    ) -> list[Any] | None:
        """The rows of ``statement`` (kept compiled under ``name``) with ``values``, or
        ``None`` when the caller should take the pooled path. Raises ``TimeoutError`` past
        ``within`` seconds (the connection cut)."""
        compiled = self._compiled.get(name)
        if compiled is None:
            try:
                compiled = _Compiled.of(statement, self._dialect)
            except ValueError:
                self.capacity = 0
                return None
            self._compiled[name] = compiled
        params = [values[key] for key in compiled.names]
        kept: _Kept | None = None
        try:
            with anyio.fail_after(within):
                if self._idle:
                    kept = self._idle.pop()
                elif self._opened < self.capacity:
                    self._opened += 1
                    try:
                        kept = await self._open()
                    except BaseException:
                        self._opened -= 1
                        raise
                else:
                    return None
                raw = await self._run(kept.driver, compiled.sql, params)
        except (asyncio.CancelledError, TimeoutError):
            if kept is not None:
                self._discard(kept, cut=True)
            raise
        except Exception:
            if kept is not None:
                self._discard(kept, cut=True)
            return None
        if self._closed:
            self._discard(kept, cut=False)
        else:
            self._idle.append(kept)
        self.served += 1
        return compiled.rows(raw)

    async def _open(self) -> _Kept:
        conn = await self._engine.connect()
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            fairy = await conn.get_raw_connection()
            return _Kept(conn, fairy.driver_connection)
        except BaseException:
            # Cut now, given back in the background: this task may be cancelled (the
            # timeout), and an await here would be cancelled with it.
            _sever(conn)
            self._spawn(self._release(conn, True))
            raise

    async def _run(self, driver: Any, sql: str, params: list[Any]) -> Any:
        if self._driver == "asyncpg":
            return await driver.fetch(sql, *params)
        if self._driver == "aiosqlite":
            return await driver.execute_fetchall(sql, params)
        async with driver.cursor() as cursor:  # asyncmy, aiomysql
            await cursor.execute(sql, params)
            return await cursor.fetchall()

    def _discard(self, kept: _Kept, *, cut: bool) -> None:
        """Give ``kept`` up: cut at once (its state is unknown) or politely, in the
        background either way (the caller may be cancelled)."""
        self._opened -= 1
        if cut:
            _sever(kept.conn)
        self._spawn(self._release(kept.conn, cut))

    def _spawn(self, release: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(release)
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    @staticmethod
    async def _release(conn: AsyncConnection, cut: bool) -> None:
        with contextlib.suppress(Exception):
            if cut:
                await conn.invalidate()
            await conn.close()

    def _engine_disposed(self, engine: Any) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for kept in idle:
            self._opened -= 1
            _sever(kept.conn)  # network connections cut at once (no await here)
            if _running_loop() is not None:  # else the cut is all that can be done
                self._spawn(self._release(kept.conn, True))

    async def aclose(self) -> None:
        """Return every kept connection to the pool (before the engine is disposed)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for kept in idle:
            self._opened -= 1
            await self._release(kept.conn, False)
        if self._discarding:
            await asyncio.gather(*self._discarding, return_exceptions=True)
