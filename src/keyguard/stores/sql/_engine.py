"""Engines and their URLs: one engine per event loop, connections cut on failure,
SQLite's write lock."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import anyio
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from keyguard.errors import (
    ConfigurationError,
    KeyGuardError,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    # A result row. Row's type parameters differ between SQLAlchemy 2.0 (a tuple TypeVar)
    # and 2.1 (a TypeVarTuple), and no spelling suits both; its columns are Any either way.
    _Row: TypeAlias = Any

    from keyguard.stores.sql._direct import DirectReads

from keyguard.stores.sql._schema import _PREFIX_PATTERN

logger = logging.getLogger("keyguard")


# scheme -> (SQLAlchemy dialect, default async driver)
_DEFAULT_DRIVERS = {
    "sqlite": ("sqlite", "aiosqlite"),
    "postgresql": ("postgresql", "asyncpg"),
    "postgres": ("postgresql", "asyncpg"),
    "mysql": ("mysql", "asyncmy"),
    "mariadb": ("mariadb", "asyncmy"),
}
_DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb")
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# driver module -> how to install it
_INSTALL = {
    "asyncpg": "pip install 'keyguard[postgres]'",
    "asyncmy": "pip install 'keyguard[mysql]'",
    "aiomysql": "pip install 'keyguard[mysql]' aiomysql",
    "psycopg": "pip install 'keyguard[postgres]' 'psycopg[binary]'",
    "aiosqlite": "pip install aiosqlite (a core dependency: reinstall keyguard)",
}
_DRIVER_PACKAGES = frozenset(
    {"asyncpg", "asyncmy", "aiomysql", "pymysql", "psycopg", "psycopg_pool", "aiosqlite", "sqlite3"}
)
_USED = "keyguard_used"  # marks a pooled connection that has served a call before
_LOCK_POLL_MS = 10  # SQLite: how long one try for the write lock waits (see _begin_immediate)


def _is_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the database, its driver or the network."""
    if isinstance(exc, sa_exc.SQLAlchemyError | OSError | TimeoutError | asyncio.TimeoutError):
        return True
    if isinstance(exc, sqlite3.Error):
        return True
    return any(cls.__module__.split(".")[0] in _DRIVER_PACKAGES for cls in type(exc).__mro__)


def _lost_creation_race(exc: sa_exc.DBAPIError) -> bool:
    """Whether ``exc`` says another process created the table (or row) first."""
    if isinstance(exc, sa_exc.IntegrityError):
        return True  # PostgreSQL's pg_type race, or the version row
    text = str(exc.orig).lower()
    # SQLite in WAL mode: a transaction that read the schema and then writes it, after
    # another process changed it, fails at once with "database is locked" (the busy
    # timeout does not apply to that upgrade); starting over sees the new schema.
    if "database is locked" in text:
        return True
    # MariaDB: a table looked at (create_all's DESCRIBE) while another process alters it.
    return "already exists" in text or "duplicate" in text or "concurrent ddl" in text


# -- engines per event loop, deadlines ---------------------------------------------------------

_Closer = AsyncGenerator[None, None]


@dataclass(eq=False)
class _Bound:
    """One event loop's engine, and what goes with it."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    reader: AsyncEngine  # the same pool; autocommit on PostgreSQL (see SQLStore._reader)
    closer: _Closer | None  # None for an engine the app passed in: the app closes it
    # The task creating or upgrading the tables, which this loop's calls wait for.
    schema_task: asyncio.Future[Any] | None = None
    # SQLite: this loop's writers queue here, in order, so that only one of them at a
    # time polls for the file's write lock against other processes (see _begin_immediate).
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The request path's reads on kept driver connections (_direct.py); None: none.
    direct: DirectReads | None = None


async def _close_with_loop(
    engine: AsyncEngine,
    registry: dict[asyncio.AbstractEventLoop, _Bound],
    loop: asyncio.AbstractEventLoop,
    patience: float,
) -> _Closer:
    try:
        yield
    finally:
        bound = registry.pop(loop, None)
        if bound is not None and bound.direct is not None:
            with anyio.move_on_after(patience):
                await bound.direct.aclose()  # kept connections back to the pool first
        # Polite goodbyes (each connection's close message) for at most ``patience``
        # seconds: a server that does not answer must not hold up the loop's shutdown.
        with anyio.move_on_after(patience) as scope:
            await engine.dispose()
        if scope.cancelled_caught:
            _abandon(engine)


async def _finish(closer: _Closer) -> None:
    await closer.aclose()


def _abandon(engine: AsyncEngine) -> None:
    """Drop ``engine``'s pool without closing its connections (their loop is gone)."""
    engine.sync_engine.dispose(close=False)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@asynccontextmanager
async def _connect(bind: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection from ``bind``'s pool, cut on the spot if the work on it fails.

    Leaving the block returns the connection to the pool, which rolls it back
    and, if that fails, closes it politely: on a server that stopped
    answering, each of those steps waits for its own timeout, after the
    call's deadline. A cut connection makes them fail at once instead.
    Rule errors and constraint violations leave the connection as it is.
    """
    async with bind.connect() as conn:
        try:
            yield conn
        except BaseException as exc:
            if not isinstance(exc, KeyGuardError | sa_exc.IntegrityError) and _sever(conn):
                # Not pooled again: a pool that rolled it back already would take it for
                # sound, and hand the dead connection to the next call.
                with contextlib.suppress(Exception):
                    conn.sync_connection.invalidate()  # type: ignore[union-attr]
            raise


def _sever(conn: AsyncConnection) -> bool:
    """Close the network connection under ``conn`` now, without a word to the server;
    whether it was cut."""
    sync = conn.sync_connection
    if conn.dialect.name == "sqlite" or sync is None or sync.invalidated or sync.closed:
        return False  # SQLite has no network; SQLAlchemy already dealt with an invalidated one
    try:
        driver = sync.connection.driver_connection
    except sa_exc.SQLAlchemyError:
        return False
    terminate = getattr(driver, "terminate", None)  # asyncpg
    if terminate is None:
        close = getattr(driver, "close", None)  # asyncmy, aiomysql: closes the socket
        terminate = None if inspect.iscoroutinefunction(close) else close
    if not callable(terminate):
        return False
    with contextlib.suppress(Exception):
        terminate()
    return True


async def _begin_immediate(conn: AsyncConnection, deadline: float, reader_wait: float) -> None:
    """Start a SQLite write transaction by taking the file's write lock, waiting for it
    (behind other writers) until the call's deadline.

    A deferred transaction that reads first and then writes fails at once with
    "database is locked" when another process wrote in between, whatever the
    busy timeout; taking the lock up front makes writers queue instead.

    SQLite's own busy handler is not first come, first served: it sleeps ever
    longer between tries (up to 100 ms), so under a steady stream of writers
    one that has waited long keeps losing to newcomers, past any timeout. So
    each try waits only briefly (``_LOCK_POLL_MS``) and the store tries again until
    the deadline: every waiter polls at the same pace. The writers of one loop
    first queue on ``_Bound.write_lock``, so one of them at a time polls.
    """
    await conn.exec_driver_sql(f"PRAGMA busy_timeout = {_LOCK_POLL_MS}")
    restore = f"PRAGMA busy_timeout = {math.ceil(reader_wait * 1000)}"
    try:
        while True:
            try:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                break
            except sa_exc.OperationalError as exc:
                if not _is_busy(exc) or anyio.current_time() >= deadline:
                    raise
    except BaseException:
        # Leaving with an error, a cancellation or the deadline (which may have cut the
        # statement, leaving the connection unusable until rolled back): the restore
        # must not replace why, and a connection it fails on is not pooled again.
        with anyio.CancelScope(shield=True):
            try:
                await conn.exec_driver_sql(restore)
            except Exception:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
        raise
    # Back to the connection's own wait, for the rare lock a reader meets.
    with anyio.CancelScope(shield=True):
        await conn.exec_driver_sql(restore)


def _is_busy(exc: sa_exc.OperationalError) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" (another connection writes)."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == 5)  # SQLITE_BUSY, and its extended codes
    return "database is locked" in str(exc.orig)


def _validate_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not _PREFIX_PATTERN.fullmatch(prefix):
        raise ConfigurationError(
            "table_prefix must be 1-40 characters of lowercase letters, digits and '_', "
            f"not starting with a digit; got {prefix!r}"
        )
    return prefix


def _validate_timeout(timeout: object) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _parse_url(url: str) -> URL:
    """``url`` with its async driver chosen and a SQLite path made absolute."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError) as exc:
        raise ConfigurationError(f"invalid SQL store URL {_mask(url)!r}") from exc
    scheme, _, driver = parsed.drivername.partition("+")
    if scheme not in _DEFAULT_DRIVERS:
        raise ConfigurationError(f"not a SQL store URL: {_mask(url)!r}")
    dialect, default_driver = _DEFAULT_DRIVERS[scheme]
    parsed = parsed.set(drivername=f"{dialect}+{driver or default_driver}")
    if dialect == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or "mode=memory" in database:
            raise ConfigurationError(
                "an in-memory SQLite database lives in one connection; use memory:// for "
                "an in-process store, or sqlite:///path.db for a file"
            )
        if not parsed.query.get("uri"):
            # Resolved now, so a later chdir cannot move the store.
            parsed = parsed.set(database=os.path.abspath(database))
    elif dialect in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    elif dialect == "postgresql":
        mode = parsed.query.get("sslmode")
        if mode is not None and mode not in _SSL_MODES:
            raise ConfigurationError(
                f"sslmode must be one of {', '.join(_SSL_MODES)}; got {mode!r}"
            )
    return parsed


def _dsn_parameters(parsed: URL) -> dict[str, str]:
    """The parameters of a PostgreSQL URL for asyncpg's DSN: every one that
    ``asyncpg.connect`` (and SQLAlchemy's asyncpg dialect) does not take as a keyword.

    libpq's TLS parameters among them (``sslmode=require`` would reach ``asyncpg.connect``
    as an unknown keyword, a ``TypeError`` on every call), and the rest of libpq's that
    asyncpg reads from a DSN only (``sslpassword``, ``sslcrl``…); any other becomes a
    server setting there, as with libpq (``application_name=app``)."""
    if parsed.get_driver_name() != "asyncpg":
        return {}  # psycopg hands them to libpq itself
    found: dict[str, str] = {}
    for name, value in parsed.query.items():
        if name not in _ASYNCPG_KEYWORDS:
            found[name] = value if isinstance(value, str) else value[-1]
    return found


# What asyncpg.connect takes as keywords (a URL's parameters of these names stay
# keywords), and what SQLAlchemy's asyncpg dialect takes itself.
_ASYNCPG_KEYWORDS = frozenset(
    {
        "dsn", "host", "port", "user", "password", "passfile", "service", "servicefile",
        "database", "timeout", "statement_cache_size", "max_cached_statement_lifetime",
        "max_cacheable_statement_size", "command_timeout", "ssl", "direct_tls",
        "connection_class", "record_class", "server_settings", "target_session_attrs",
        "krbsrvname", "gsslib", "prepared_statement_cache_size", "prepared_statement_name_func",
        "async_creator_fn",
    }
)  # fmt: skip


_SCHEMA_BUDGET = 300.0
"""The bound, in seconds, on creating or upgrading the tables (``timeout`` if longer)."""


def _seconds(name: str, value: str) -> float:
    """A URL's number of seconds ``name``, or ``ConfigurationError``."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def _schema_budget(timeout: float) -> float:
    """How long creating or upgrading the tables may take, for a store of ``timeout``."""
    return max(_SCHEMA_BUDGET, timeout)


def _engine_options(
    parsed: URL,
    timeout: float,
    given: Mapping[str, Any],
    *,
    statements: float | None = None,
) -> dict[str, Any]:
    """This store's engine defaults (every wait bounded by ``timeout``), under ``given``.

    ``statements``: the drivers' bound on one statement, if not ``timeout`` (the
    engine that creates or upgrades the tables, whose statements may take long).
    """
    driver = parsed.get_driver_name()
    schema_step = statements is not None
    statements = timeout if statements is None else statements
    # The URL's own parameters win over these defaults (they reach the driver as the
    # docs say, unchanged), except the bound on one statement of the engine that creates
    # or upgrades the tables, which must let an index over millions of keys be built.
    query = {
        name: value if isinstance(value, str) else value[-1] for name, value in parsed.query.items()
    }
    connect_args: dict[str, Any] = {}
    if driver == "asyncpg":
        connect_args = {
            "timeout": timeout,
            "command_timeout": statements,
            "server_settings": {"application_name": "keyguard"},
        }
        for name in ("timeout", "command_timeout"):
            if name in query and not (schema_step and name == "command_timeout"):
                connect_args[name] = _seconds(name, query[name])  # asyncpg wants a number
        if dsn := _dsn_parameters(parsed):
            # asyncpg reads libpq's TLS parameters from a DSN only, with libpq's meaning
            # (verify-full checks the name, require with a root certificate verifies the
            # chain…); the host, user and the rest still come as keywords, which win.
            connect_args["dsn"] = "postgresql://?" + urlencode(dsn)
            if "application_name" in dsn:  # a server setting the keyword would replace
                del connect_args["server_settings"]
    elif driver == "psycopg":
        bound = f"-c statement_timeout={math.ceil(statements * 1000)}"
        own = query.get("options")
        if own is not None:
            # Both: the later setting wins, the URL's but on the schema step's engine.
            bound = f"{own} {bound}" if schema_step else f"{bound} {own}"
        connect_args = {
            "connect_timeout": max(1, math.ceil(timeout)),
            "options": bound,
            "application_name": "keyguard",
        }
        for name in ("connect_timeout", "application_name"):
            if name in query:
                del connect_args[name]
    elif driver in ("asyncmy", "aiomysql"):
        connect_args = {"connect_timeout": timeout}
        if driver == "asyncmy":
            connect_args["read_timeout"] = statements
        for name in ("connect_timeout", "read_timeout"):
            if name in query and not (schema_step and name == "read_timeout"):
                connect_args.pop(name, None)
    elif driver == "aiosqlite":
        connect_args = {"timeout": timeout}  # the busy timeout: how long to wait for a writer
        _hide_aiosqlite_arguments()
    # Its own logger, sqlalchemy.engine.Engine.keyguard, whose result rows are hidden.
    options: dict[str, Any] = {"hide_parameters": True, "logging_name": "keyguard"}
    if "poolclass" not in given:  # NullPool and friends take no pool_timeout
        options["pool_timeout"] = timeout
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        # Fewer gap locks; PostgreSQL's default already.
        options["isolation_level"] = "READ COMMITTED"
    options.update(given)
    options["hide_parameters"] = True  # statements' parameters include secret hashes
    options["connect_args"] = {**connect_args, **dict(given.get("connect_args") or {})}
    return options


class _WithoutCallArguments(logging.Filter):
    """aiosqlite logs every call at DEBUG with its arguments — SQL parameters, secret hashes
    among them. Keep those records (that a call happened), drop the arguments."""

    _MESSAGES = frozenset({"executing %s", "operation %s completed"})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self._MESSAGES:
            record.args = ("<call arguments hidden by keyguard>",)
        return True


class _WithoutRows(logging.Filter):
    """SQLAlchemy's engine logs every result row at DEBUG — secret hashes among them — however
    the engine was created. Keep those records (that a row came back), drop the rows."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.endswith("Row %r"):
            record.args = ("<row hidden by keyguard>",)
        return True


def _hide_rows(engine: AsyncEngine) -> None:
    """Hide the result rows in the log records of ``engine`` (an engine this store created)."""
    log = engine.sync_engine.logger
    target = log if isinstance(log, logging.Logger) else log.logger  # echo=True wraps it
    if not any(isinstance(f, _WithoutRows) for f in target.filters):
        target.addFilter(_WithoutRows())


def _hide_aiosqlite_arguments() -> None:
    log = logging.getLogger("aiosqlite")
    if not any(isinstance(f, _WithoutCallArguments) for f in log.filters):
        log.addFilter(_WithoutCallArguments())


def _create_engine(parsed: URL, options: dict[str, Any]) -> AsyncEngine:
    """The engine for ``parsed`` (no I/O), or ``ConfigurationError`` saying what is wrong."""
    scheme = parsed.get_backend_name()
    try:
        parsed.get_dialect()
    except sa_exc.NoSuchModuleError as exc:
        raise ConfigurationError(
            f"unknown SQL driver {parsed.drivername!r}: use {scheme}:// for the default "
            "async driver, or name an async one (postgresql+asyncpg, postgresql+psycopg, "
            "mysql+asyncmy, mysql+aiomysql, sqlite+aiosqlite)"
        ) from exc
    if dsn := _dsn_parameters(parsed):
        # Given to asyncpg in its DSN by _engine_options; nor are they in the store's URL
        # (its repr, its log lines), sslpassword among them.
        parsed = parsed.difference_update_query(dsn)
    try:
        engine = create_async_engine(parsed, **options)
    except ImportError as exc:
        driver = parsed.get_driver_name()
        install = _INSTALL.get(driver, f"pip install {driver}")
        raise ConfigurationError(
            f"{parsed.drivername}:// needs the {driver} driver: {install}"
        ) from exc
    except sa_exc.InvalidRequestError as exc:
        raise ConfigurationError(
            f"{parsed.drivername}:// is not an async driver; keyguard needs one "
            f"(for example {scheme}:// alone chooses it)"
        ) from exc
    except (TypeError, ValueError, sa_exc.ArgumentError) as exc:
        # (ValueError: a URL parameter the dialect reads as a number, ?connect_timeout=abc.)
        raise ConfigurationError(f"bad SQL store option: {exc}") from exc
    _hide_rows(engine)
    return engine


# URL parameters that hold a password (the drivers take one there too): never shown.
_SECRET_PARAMETERS = frozenset({"password", "passwd", "sslpassword"})


def _render(url: URL) -> str:
    """``url`` as text, its password and any password parameter (``?password=``,
    ``?sslpassword=``) hidden."""
    hidden = {name: "HIDDEN" for name in url.query if name.lower() in _SECRET_PARAMETERS}
    if not hidden:
        return url.render_as_string(hide_password=True)
    text = url.update_query_dict(hidden).render_as_string(hide_password=True)
    return text.replace("=HIDDEN", "=***")


def _secrets_of(url: URL) -> list[str]:
    """The passwords ``url`` holds (its own, and its password parameters' values)."""
    found = [url.password] if url.password else []
    for name, value in url.query.items():
        if name.lower() in _SECRET_PARAMETERS:
            found += [value] if isinstance(value, str) else list(value)
    return [secret for secret in found if secret]


def _mask(url: str) -> str:
    """``url`` with any password hidden."""
    try:
        return _render(make_url(url))
    except Exception:
        return url.split("://", 1)[0] + "://…"
