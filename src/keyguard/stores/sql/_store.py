"""The SQL store itself: :class:`SQLStore` (opened by URL or on an engine, its client id
tag key) and, on PostgreSQL through asyncpg, the store that is also a change feed.

Its calls are in ``_keys.py`` (APIs and keys) and ``_activity.py`` (audit events, usage),
on the plumbing of ``_core.py``; how the rules hold across processes is in the package's
docstring.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from keyguard.audit import DEFAULT_AUDIT_RETENTION, check_retention
from keyguard.errors import StoreClosed
from keyguard.secrets import CLIENT_ID_LENGTH
from keyguard.stores._idtag import (
    ID_TAG_LOST_ROW,
    ID_TAG_ROW,
    new_tag_key_text,
    parse_tag_key,
    report_lost,
)
from keyguard.stores.sql._engine import (
    _create_engine,
    _engine_options,
    _parse_url,
    _schema_budget,
    _secrets_of,
    _validate_prefix,
    _validate_timeout,
)
from keyguard.stores.sql._feed import PgFeed, feed_connector, listens
from keyguard.stores.sql._keys import _Keys
from keyguard.stores.sql._schema import _Schema

if TYPE_CHECKING:
    from collections.abc import Callable


class SQLStore(_Keys):
    """A ``KeyStore`` in a SQL database: SQLite, PostgreSQL or MariaDB/MySQL.

    Usually opened by URL, ``open_store("sqlite:///keys.db")`` (see
    :meth:`from_url`); apps that already have an ``AsyncEngine`` pass it in,
    and then keep ownership of it: ``aclose`` leaves it open.

    ``table_prefix`` names the tables (``keyguard_apis``, ``keyguard_keys``,
    ``keyguard_meta``), so they can live in an app's existing database. They
    are created on first use. ``timeout`` (seconds) bounds how long a call
    can take, as a whole, before it gives up with ``StoreUnavailable``: the
    pool checkout, connecting, the retry and the statements together, on
    any engine.
    """

    def __new__(cls, engine: AsyncEngine, **options: Any) -> SQLStore:
        # On PostgreSQL (asyncpg, psycopg) the store is also a ChangeFeed (LISTEN/NOTIFY), as
        # pathlib.Path() gives a PosixPath: isinstance(store, ChangeFeed) tells a cache so.
        if cls is SQLStore and listens(engine):
            return object.__new__(_PostgreSQLStore)
        return object.__new__(cls)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        table_prefix: str = "keyguard_",
        timeout: float = 3.0,
        audit_retention: timedelta | float = DEFAULT_AUDIT_RETENTION,
        **engine_options: Any,
    ) -> SQLStore:
        """The store for a database URL. Does no I/O; connects on first use.

        ``sqlite:///rel.db`` (relative to the current folder),
        ``sqlite:////abs/path.db``, ``postgresql://`` or ``postgres://``
        (asyncpg), ``mysql://`` or ``mariadb://`` (asyncmy); a URL naming
        its driver (``postgresql+psycopg://``, ``mysql+aiomysql://``) uses
        that driver. ``engine_options`` go to SQLAlchemy's
        ``create_async_engine`` (``pool_size``, ``connect_args``, ``echo``…)
        over this store's defaults. Raises ``ConfigurationError`` for a bad
        URL or option, or a missing driver (naming the extra to install).
        """
        timeout = _validate_timeout(timeout)
        _validate_prefix(table_prefix)
        check_retention(audit_retention)
        parsed = _parse_url(url)
        options = _engine_options(parsed, timeout, engine_options)
        engine = _create_engine(parsed, options)
        store: SQLStore = cls(
            engine, table_prefix=table_prefix, timeout=timeout, audit_retention=audit_retention
        )
        store._factory = lambda: _create_engine(parsed, options)
        # Those of the URL as given: some of its parameters never reach the engine's URL.
        store._passwords = _secrets_of(parsed)
        # Creating or upgrading the tables: statements bounded by the step's own budget
        # (an index over millions of keys takes longer than a call's timeout).
        # No pool: each attempt gets a new connection, never one an earlier attempt cut.
        budget = _schema_budget(timeout)
        pooling = ("pool_size", "max_overflow", "pool_timeout", "pool_use_lifo", "poolclass")
        unpooled = {k: v for k, v in engine_options.items() if k not in pooling}
        unpooled["poolclass"] = NullPool
        step = _engine_options(parsed, timeout, unpooled, statements=budget)
        store._schema_factory = lambda: _create_engine(parsed, step)
        store._connect_args = dict(options["connect_args"])
        return store

    # -- the client id tag key --------------------------------------------------------------

    _id_tag_key: bytes | None = None
    #: Whether the tag key was once lost (``ID_TAG_LOST_ROW``), read with the key.
    id_tag_lost: bool = False

    async def id_tag_key(self) -> bytes:
        """The client id tag key (``IdTagKeys``): a row of ``<prefix>meta``, inserted by the
        first process that needs it (an insert that does nothing if the row exists), read
        back in a later transaction so racing processes agree, then kept in memory.

        A missing row while the keys table holds tagged ids means the key they were tagged
        under is gone: the ``ID_TAG_LOST_ROW`` mark is written in the new key's transaction,
        so every process that reads the new key reads the mark too (``id_tag_lost``)."""
        key = self._id_tag_key
        if key is not None:
            return key

        async def read(conn: AsyncConnection, schema: _Schema) -> tuple[str | None, bool]:
            stmt = select(schema.meta.c.name, schema.meta.c.value).where(
                schema.meta.c.name.in_([ID_TAG_ROW, ID_TAG_LOST_ROW])
            )
            rows = {str(row[0]): str(row[1]) for row in await conn.execute(stmt)}
            return rows.get(ID_TAG_ROW), ID_TAG_LOST_ROW in rows

        async def create(conn: AsyncConnection, schema: _Schema) -> bool:
            """Make the key unless a racer has; whether it found the old one lost."""
            if (await read(conn, schema))[0] is not None:
                return False
            keys = schema.keys
            tagged = select(keys.c.client_id).where(
                func.length(keys.c.client_id) == CLIENT_ID_LENGTH
            )
            lost = (await conn.execute(tagged.limit(1))).first() is not None
            if lost:
                mark = {"name": ID_TAG_LOST_ROW, "value": "1"}
                await conn.execute(schema.insert_ignore(schema.meta, mark))
            row = {"name": ID_TAG_ROW, "value": new_tag_key_text()}
            await conn.execute(schema.insert_ignore(schema.meta, row))
            return lost

        # One store call, bounded by ``timeout`` as a whole: each step gets what is left.
        deadline = time.monotonic() + self._timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_answer()
            return remaining

        text, lost = await self._run(read, write=False)
        found_now = False
        if text is None:
            found_now = await self._run(create, write=True, within=left())
            text, lost = await self._run(read, write=False, within=left())
        key = parse_tag_key(text, f"SQL store {self.url}")
        if lost:
            report_lost(f"SQL store {self.url}", found_now=found_now)
        self.id_tag_lost = lost
        self._id_tag_key = key
        return key


class _PostgreSQLStore(SQLStore):
    """The SQL store on PostgreSQL: also a ``ChangeFeed`` (LISTEN/NOTIFY).

    ``SQLStore(engine)`` and ``SQLStore.from_url`` give one whenever the engine is
    PostgreSQL's through asyncpg or psycopg; it is a ``SQLStore`` in every other respect.
    """

    _feed: PgFeed | None = None

    async def watch(
        self,
        on_change: Callable[[str, str | None], None],
        *,
        on_ready: Callable[[], None],
    ) -> None:
        """The change feed (:class:`~keyguard.stores.base.ChangeFeed`): every change
        NOTIFYs ``<api>`` or ``<api>\\n<client_id>`` on ``<table prefix>changes``, at its
        commit. One listening connection per event loop, outside the pool, shared by
        every ``watch`` in that loop; ``StoreUnavailable`` when it drops.
        """
        if self._closed:
            raise StoreClosed(f"SQL store {self.url} is closed")
        feed = self._feed
        if feed is None:
            assert self._channel is not None
            feed = self._feed = PgFeed(
                channel=self._channel,
                connect=feed_connector(self._engine, self._connect_args),
                timeout=self._timeout,
                unavailable=self._unavailable,
            )
        await feed.watch(on_change, on_ready=on_ready)

    async def aclose(self) -> None:
        """Stop listening (in this loop), then release the connections as ``SQLStore`` does."""
        if self._feed is not None:
            await self._feed.aclose()
        await super().aclose()
