"""What every SQL store call stands on.

The engine of the running loop, the schema (created or upgraded on first use),
one transaction per call within the deadline, and driver errors turned into
``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from sqlalchemy import Connection, inspect, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keyguard.audit import (
    DEFAULT_AUDIT_RETENTION,
    check_retention,
)
from keyguard.errors import (
    ConfigurationError,
    KeyGuardError,
    StoreClosed,
    StoreUnavailable,
)
from keyguard.stores.sql._upgrades import ensure_indexes, upgrade

if TYPE_CHECKING:
    from typing import TypeAlias

    # A result row. Row's type parameters differ between SQLAlchemy 2.0 (a tuple TypeVar)
    # and 2.1 (a TypeVarTuple), and no spelling suits both; its columns are Any either way.
    _Row: TypeAlias = Any

from keyguard.stores.sql._direct import DirectReads
from keyguard.stores.sql._engine import (
    _DIALECTS,
    _USED,
    _abandon,
    _begin_immediate,
    _Bound,
    _close_with_loop,
    _Closer,
    _connect,
    _finish,
    _hide_aiosqlite_arguments,
    _is_driver_error,
    _lost_creation_race,
    _render,
    _running_loop,
    _schema_budget,
    _secrets_of,
    _validate_prefix,
    _validate_timeout,
)
from keyguard.stores.sql._feed import announce, channel_for
from keyguard.stores.sql._schema import _VERSION_ROW, SCHEMA_VERSION, _Schema

logger = logging.getLogger("keyguard")


T = TypeVar("T")


class _SQLCore:
    """The connections, schema and call plumbing under :class:`SQLStore`'s operations."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        table_prefix: str = "keyguard_",
        timeout: float = 3.0,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                "SQLStore needs a SQLAlchemy AsyncEngine (create_async_engine), "
                f"got {type(engine).__name__}"
            )
        if engine.dialect.name not in _DIALECTS:
            raise ConfigurationError(
                f"SQLStore supports SQLite, PostgreSQL and MariaDB/MySQL, not {engine.dialect.name}"
            )
        self._prefix = _validate_prefix(table_prefix)
        self._timeout = _validate_timeout(timeout)
        self.audit_retention = check_retention(audit_retention)
        self._pruned_at: float | None = None
        if engine.dialect.driver == "aiosqlite":
            _hide_aiosqlite_arguments()
        if not engine.sync_engine.hide_parameters:
            logger.warning(
                "the engine given to SQLStore does not hide statement parameters: a failed "
                "write's error could quote a secret hash; create it with hide_parameters=True"
            )
        self._engine = engine
        self._factory: Callable[[], AsyncEngine] | None = None  # set when the store owns it
        # from_url's: the engine that creates or upgrades the tables (see _schema_step).
        self._schema_factory: Callable[[], AsyncEngine] | None = None
        # One engine per event loop (connections belong to the loop that opened them).
        # ``_current`` is the last loop's, read in one step on the hot path; the engine
        # above serves the first loop that uses the store (see ``_bind``).
        self._current: _Bound | None = None
        self._by_loop: dict[asyncio.AbstractEventLoop, _Bound] = {}
        self._unbound: AsyncEngine | None = engine
        self._bind_lock = threading.Lock()
        self._schema: _Schema | None = None
        self._closed = False
        self._passwords = _secrets_of(engine.url)
        # PostgreSQL: every change also NOTIFYs this channel, in its transaction (_feed.py).
        self._channel = channel_for(self._prefix) if engine.dialect.name == "postgresql" else None
        self._connect_args: dict[str, Any] = {}  # set by from_url: what its engines connect with

    def __repr__(self) -> str:
        return f"SQLStore({self.url!r}, table_prefix={self._prefix!r})"

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return _render(self._engine.url)

    @property
    def description(self) -> str:
        """Where the keys are, for log lines: a SQLite file by its absolute path, else the URL."""
        url = self._engine.url
        if url.get_backend_name() == "sqlite":
            return f"SQLite database {url.database}"
        return f"{self.url} (table prefix {self._prefix!r})"

    @property
    def timeout(self) -> float:
        """The bound, in seconds, on each store call as a whole."""
        return self._timeout

    @property
    def table_prefix(self) -> str:
        """The prefix of this store's table names."""
        return self._prefix

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine in use (for tests, monitoring and event listeners)."""
        return self._engine

    async def aclose(self) -> None:
        """Release the connections of engines this store created; a passed-in one stays open."""
        self._closed = True
        self._current = None  # every call now takes the slow path, which refuses it
        running = _running_loop()
        for loop, bound in list(self._by_loop.items()):
            task, bound.schema_task = bound.schema_task, None
            if task is not None and not task.done():
                if loop is running:
                    task.cancel()  # its connection is cut (_connect)
                    await asyncio.wait({task})
                elif loop.is_running():
                    loop.call_soon_threadsafe(task.cancel)
            if loop is running and bound.direct is not None:
                await bound.direct.aclose()  # kept connections back to the pool
        if self._factory is None:
            return
        for loop, bound in list(self._by_loop.items()):
            assert bound.closer is not None
            if loop is running:
                await bound.closer.aclose()
            elif loop.is_running():
                # Another thread's loop: close there (its shutdown would, but later).
                asyncio.run_coroutine_threadsafe(_finish(bound.closer), loop)
            else:
                self._by_loop.pop(loop, None)
                _abandon(bound.engine)
        with self._bind_lock:
            unbound, self._unbound = self._unbound, None
        if unbound is not None:
            await unbound.dispose()  # never connected: nothing to wait for

    # -- plumbing -------------------------------------------------------------------------

    async def _run(
        self,
        work: Callable[[AsyncConnection, _Schema], Awaitable[T]],
        *,
        write: bool,
        within: float | None = None,
    ) -> T:
        """``work`` in one transaction, driver errors turned into ``StoreUnavailable``.

        The whole call — getting this loop's engine, creating the tables,
        the pool checkout, connecting, the retry and the statements — ends
        within ``timeout``: past it the call is cancelled, and a connection
        it was using is cut rather than politely rolled back, since a server
        that does not answer would not answer the rollback either.

        A pooled connection found dead (the server restarted, an idle
        connection was killed) is replaced and the call retried once, unless
        a write had reached its commit, whose outcome is then unknown. This
        is how the store recovers by itself without a ping per call.
        ``within``: what is left of ``timeout`` when part was spent already.
        """
        try:
            with anyio.move_on_after(self._timeout if within is None else within) as scope:
                return await self._attempts(work, write=write, deadline=scope.deadline)
        except KeyGuardError:
            raise
        except Exception as exc:
            if _is_driver_error(exc):
                raise self._unavailable(exc) from exc
            raise
        # Only reached when the deadline cancelled the attempts.
        raise self._no_answer()

    def _no_answer(self) -> StoreUnavailable:
        if self._schema_pending():
            return StoreUnavailable(
                f"SQL store {self.url} unavailable (no answer within {self._timeout:g} s: "
                f"the tables {self._prefix}* are being created or upgraded, which goes on)"
            )
        return StoreUnavailable(
            f"SQL store {self.url} unavailable (no answer within {self._timeout:g} s)"
        )

    async def _hot_rows(self, name: str, values: dict[str, Any]) -> list[_Row]:
        """The rows of the request path's statement ``name`` (an attribute of the schema)
        with ``values``: on a kept driver connection when one is free (``_direct.py``),
        else through the pool in a call of its own."""
        bound, schema = self._current, self._schema
        within: float | None = None
        if (
            bound is not None
            and schema is not None
            and bound.direct is not None
            and bound.loop is asyncio.get_running_loop()
            and bound.direct.usable()
        ):
            started = time.monotonic()
            try:
                rows = await bound.direct.fetch(name, getattr(schema, name), values, self._timeout)
            except TimeoutError:
                raise self._no_answer() from None
            if rows is not None:
                return rows
            # It failed (a connection the server ended): the pooled path, with its retry,
            # gets what is left of the timeout, so the call as a whole keeps to it.
            within = self._timeout - (time.monotonic() - started)
            if within <= 0:
                raise self._no_answer()

        async def pooled(conn: AsyncConnection, schema: _Schema) -> list[_Row]:
            return list((await conn.execute(getattr(schema, name), values)).all())

        return await self._run(pooled, write=False, within=within)

    async def _attempts(
        self,
        work: Callable[[AsyncConnection, _Schema], Awaitable[T]],
        *,
        write: bool,
        deadline: float,
    ) -> T:
        bound, schema = await self._ready()
        bind = bound.engine if write else bound.reader
        immediate = write and bound.engine.dialect.name == "sqlite"
        for attempt in (1, 2):
            reused = committing = False
            try:
                queue = bound.write_lock if immediate else contextlib.nullcontext()
                async with queue, _connect(bind) as conn:
                    reused = bool(conn.info.get(_USED))
                    async with conn.begin():
                        if immediate:
                            await _begin_immediate(conn, deadline, self._timeout)
                        result = await work(conn, schema)
                        committing = True
                    conn.info[_USED] = True
                return result
            except sa_exc.DBAPIError as exc:
                retry = exc.connection_invalidated and reused and attempt == 1
                if not retry or (write and committing):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _announce(self, conn: AsyncConnection, api: str, client_id: str | None) -> None:
        """Tell other processes (PostgreSQL's change feed) of a change to ``api`` (to its key
        ``client_id``), in the change's transaction: sent at its commit, never if rolled back."""
        if self._channel is not None:
            await announce(conn, self._channel, api, client_id)

    def _reader(self, engine: AsyncEngine) -> AsyncEngine:
        """The engine for single-statement reads.

        On PostgreSQL they run in autocommit, which spares the BEGIN and
        ROLLBACK round trips (a single statement is atomic by itself).
        """
        if engine.dialect.name != "postgresql":
            return engine
        return engine.execution_options(isolation_level="AUTOCOMMIT")

    async def _ready(self) -> tuple[_Bound, _Schema]:
        """The running event loop's engine, and the tables, created or upgraded if needed.

        That step runs as a task of its own, which the calls of this loop wait for: a
        call's deadline ends its wait, never the step. Cut at each call's deadline, a
        step longer than ``timeout`` (an index built over millions of keys, an ``ALTER
        TABLE`` waiting for another transaction) would start over with every call and
        never finish. The step has a bound of its own, ``_schema_budget``.
        """
        bound = self._current
        if bound is None or bound.loop is not asyncio.get_running_loop():
            bound = await self._bind()
        if self._schema is None:
            task = bound.schema_task
            if task is None or (task.done() and (task.cancelled() or task.exception())):
                task = asyncio.ensure_future(self._schema_step(bound.engine))
                task.add_done_callback(_retrieve)
                bound.schema_task = task
            await asyncio.wait({task})
            if task.cancelled():  # the store was closed meanwhile
                raise StoreClosed(f"SQL store {self.url} is closed")
            self._schema = task.result()
        return bound, self._schema

    async def _schema_step(self, engine: AsyncEngine) -> _Schema:
        """``_create_schema`` within ``_schema_budget``, not the calls' ``timeout``: on an
        engine of its own (``from_url``'s) whose drivers let a statement take that long,
        except on SQLite, whose statements have no such bound (and whose in-memory
        database is the engine's own)."""
        budget = _schema_budget(self._timeout)
        own = None
        if self._schema_factory is not None and engine.dialect.name != "sqlite":
            own = self._schema_factory()
        try:
            with anyio.move_on_after(budget) as scope:
                return await self._create_schema(own or engine, scope.deadline)
        finally:
            if own is not None:
                await own.dispose()
        raise StoreUnavailable(
            f"SQL store {self.url} unavailable (creating or upgrading the tables "
            f"{self._prefix}* did not finish within {budget:g} s)"
        )

    def _schema_pending(self) -> bool:
        """Whether this loop's tables are still being created or upgraded."""
        bound = self._current
        task = None if bound is None else bound.schema_task
        return self._schema is None and task is not None and not task.done()

    async def _bind(self) -> _Bound:
        """This loop's engine: the first loop gets the one built in ``from_url``, each
        later loop a new one, closed when that loop shuts down."""
        if self._closed:
            raise StoreClosed(f"SQL store {self.url} is closed")
        loop = asyncio.get_running_loop()
        bound = self._by_loop.get(loop)
        if bound is None:
            closer: _Closer | None = None
            if self._factory is None:
                engine = self._engine  # the app's engine, used as it is in every loop
            else:
                with self._bind_lock:  # loops in two threads must not share the first engine
                    engine, self._unbound = self._unbound or self._factory(), None
                closer = _close_with_loop(engine, self._by_loop, loop, self._timeout)
                # Started here, the generator belongs to this loop: when the loop shuts
                # down (asyncio.run, anyio.run, a test client's portal) its
                # ``shutdown_asyncgens`` finalizes it, closing the engine's connections
                # while the loop still runs.
                await closer.asend(None)
            bound = _Bound(loop, engine, self._reader(engine), closer)
            direct = DirectReads(engine)
            if direct.capacity:
                bound.direct = direct
            self._by_loop[loop] = bound
            for other, stale in list(self._by_loop.items()):
                if other.is_closed():
                    # A loop closed without finalizing its async generators: its
                    # connections cannot be closed any more, only dropped. Not those of
                    # an app's engine, which serves every loop: that pool is the app's
                    # (it may hold this loop's connections already), never dropped here.
                    self._by_loop.pop(other, None)
                    if stale.closer is not None:
                        _abandon(stale.engine)
        self._engine = bound.engine
        self._current = bound
        return bound

    def _check_sqlite_folder(self, engine: AsyncEngine) -> None:
        """A SQLite file in a folder that does not exist cannot be opened: say so, rather
        than let the driver try (aiosqlite then leaves a worker thread behind, which
        prints a traceback once the event loop has closed)."""
        url = engine.url
        database = url.database
        if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return
        if database.startswith("file:") or url.query.get("uri"):
            return  # a URI filename: the driver's to read
        folder = os.path.dirname(os.path.abspath(database))
        if not os.path.isdir(folder):
            raise StoreUnavailable(
                f"SQL store {self.url} unavailable (the folder {folder} does not exist)"
            )

    async def _create_schema(self, engine: AsyncEngine, deadline: float) -> _Schema:
        """Create the tables if missing and record the schema version, or check it.

        Several processes may start at once: whoever loses the race to create
        a table (an "already exists" error) tries again and finds it there,
        until ``deadline``. So does a step that waited for another transaction's
        lock longer than ``timeout`` (PostgreSQL and MariaDB/MySQL are told so:
        the waiting ``ALTER TABLE`` or ``CREATE INDEX`` would hold up every other
        statement on the table meanwhile, an older keyguard's during a rolling
        deploy included).
        """
        self._check_sqlite_folder(engine)
        attempt = 0
        while True:
            attempt += 1
            async with _connect(engine) as conn:
                waits = _lock_waits(conn, self._timeout)
                try:
                    schema = await self._schema_attempt(conn, waits, deadline)
                except sa_exc.DBAPIError as exc:
                    if not (_lost_creation_race(exc) or _lock_wait_ended(exc)):
                        raise  # and _connect cuts the connection
                    # The connection is sound (the transaction rolled back): kept, uncut.
                    retry = True
                else:
                    retry = False
                if waits.reset is not None:
                    await conn.exec_driver_sql(waits.reset)
                    await conn.commit()
                conn.info[_USED] = True
            if not retry:
                return schema
            # Retried until the deadline cancels the wait.
            await asyncio.sleep(min(0.02 * attempt, 0.2))

    async def _schema_attempt(
        self, conn: AsyncConnection, waits: _LockWaits, deadline: float
    ) -> _Schema:
        """One try of ``_create_schema`` on ``conn``."""
        schema = _Schema(self._prefix, conn.dialect)
        sqlite = schema.dialect_name == "sqlite"
        if sqlite:
            # Readers never wait for a writer; the mode sticks to the file.
            await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            await conn.commit()
        meta = schema.meta
        read = select(meta.c.value).where(meta.c.name == _VERSION_ROW)
        if waits.session is not None:
            await conn.exec_driver_sql(waits.session)
            await conn.commit()
        async with conn.begin():
            if sqlite:
                await _begin_immediate(conn, deadline, self._timeout)
            if waits.local is not None:
                await conn.exec_driver_sql(waits.local)
            # Tables a newer keyguard wrote are refused before anything is created or
            # changed in them (a table, an index it may have dropped).
            if await conn.run_sync(_has_table, meta.name):
                found = (await conn.execute(read)).scalar_one_or_none()
                if found is not None:
                    self._check_version(found)
            await conn.run_sync(schema.metadata.create_all)
            added = await conn.run_sync(ensure_indexes, schema.keys)
            await conn.execute(
                schema.insert_ignore(meta, {"name": _VERSION_ROW, "value": str(SCHEMA_VERSION)})
            )
        # A new transaction: its snapshot shows a row another process wrote.
        async with conn.begin():
            version = self._check_version((await conn.execute(read)).scalar_one())
        if version < SCHEMA_VERSION:
            version = await upgrade(
                conn,
                prefix=self._prefix,
                meta_table=meta.name,
                found=version,
                target=SCHEMA_VERSION,
                lock_wait=waits.local,
            )
            # Another process may have moved them past this code meanwhile.
            self._check_version(version)
            logger.info(
                "SQL store %s: tables %s* upgraded to schema version %s",
                self.url,
                self._prefix,
                version,
            )
        if added:
            logger.info(
                "SQL store %s: index %s created on existing tables", self.url, ", ".join(added)
            )
        return schema

    def _check_version(self, stored: object) -> int:
        """The schema version recorded as ``stored``, if this code can read or upgrade
        such tables; else ``StoreUnavailable`` saying why (never a traceback)."""
        text = str(stored).strip()
        version = int(text) if text.isascii() and text.isdigit() else 0
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the tables {self._prefix}* have schema version {version}, newer than this "
                f"keyguard understands ({SCHEMA_VERSION}): upgrade keyguard"
            )
        if version < 1:
            raise StoreUnavailable(
                f"the tables {self._prefix}* record schema version {text[:20]!r}, which no "
                f"keyguard writes (1 to {SCHEMA_VERSION}): the {_VERSION_ROW} row of "
                f"{self._prefix}meta was changed by hand"
            )
        return version

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        """The error for a driver failure: what failed, never the password."""
        cause: BaseException = exc
        if isinstance(exc, sa_exc.DBAPIError) and isinstance(exc.orig, BaseException):
            cause = exc.orig
            # SQLAlchemy's async adapters wrap the driver's own error once more.
            if cause.__cause__ is not None and type(cause).__module__.startswith("sqlalchemy"):
                cause = cause.__cause__
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        for password in self._passwords:
            detail = detail.replace(password, "***")
        if len(detail) > 200:
            detail = detail[:197] + "..."
        reason = type(cause).__name__ + (f": {detail}" if detail else "")
        if isinstance(exc, TimeoutError | asyncio.TimeoutError) and not detail:
            reason = f"no answer within {self._timeout:g} s"  # the driver's own timeout
        return StoreUnavailable(f"SQL store {self.url} unavailable ({reason})")


# -- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LockWaits:
    """The statements that bound a schema step's wait for another transaction's lock:
    ``local`` in each of its transactions, or ``session`` before it and ``reset`` after."""

    local: str | None = None
    session: str | None = None
    reset: str | None = None


def _lock_waits(conn: AsyncConnection, timeout: float) -> _LockWaits:
    """How long a schema step's statements on ``conn`` wait for a lock: ``timeout``."""
    if conn.dialect.name == "postgresql":
        return _LockWaits(local=f"SET LOCAL lock_timeout = {max(1, round(timeout * 1000))}")
    if conn.dialect.name in ("mysql", "mariadb"):
        # Whole seconds; the metadata lock an ALTER TABLE or CREATE INDEX waits for.
        return _LockWaits(
            session=f"SET SESSION lock_wait_timeout = {max(1, math.ceil(timeout))}",
            reset="SET SESSION lock_wait_timeout = DEFAULT",
        )
    return _LockWaits()  # SQLite: _begin_immediate waits, until the step's deadline


def _lock_wait_ended(exc: sa_exc.DBAPIError) -> bool:
    """Whether ``exc`` says a statement gave up waiting for a lock (``_lock_waits``)."""
    text = str(exc.orig).lower()
    return "lock timeout" in text or "lock wait timeout" in text


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a finished schema step's outcome as seen: its waiters may all have gone."""
    if not task.cancelled():
        task.exception()


def _has_table(conn: Connection, name: str) -> bool:
    """Whether the database has the table ``name`` (run through ``run_sync``)."""
    return inspect(conn).has_table(name)
