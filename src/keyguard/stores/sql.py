"""``sqlite://``, ``postgresql://``, ``mysql://`` / ``mariadb://``: keys in a SQL database.

One adapter, on SQLAlchemy 2's async Core, serves the embedded default
(SQLite, a file on one machine) and the shared servers (PostgreSQL,
MariaDB/MySQL) that many app instances use at once. See ``docs/sql-store.md``.

How the rules hold across processes (SPEC §3):

* R2 — each API row carries a counter per kind. Creating a key first runs
  ``UPDATE apis SET <kind>_count = <kind>_count + 1 WHERE name = :api AND
  exposed AND <kind>_count < max_keys_per_kind``: the database row lock makes
  the check and the increment one step, so no two processes can both take
  the last place. The key is inserted in the same transaction; deleting a
  key decrements the counter in its transaction.
* R3 — ``UNIQUE (api, name_key)`` where ``name_key`` is ``name.casefold()``,
  computed in Python so every database folds alike; a rename writes both in
  one ``UPDATE``, so the constraint settles a race between renames too.
* A secret roll (SPEC §8) is one ``UPDATE`` whose new previous hash is the
  row's own old ``secret_hash``: racing rolls are serialized by the row lock.
* R6 — client ids (and API names) compare byte for byte: on MariaDB/MySQL
  the tables use a binary, no-pad collation.

Every driver failure becomes :class:`~keyguard.errors.StoreUnavailable`, with
the driver's error chained, within a bounded time set by ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

import anyio
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    case,
    delete,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeEngine

from keyguard.audit import (
    DEFAULT_AUDIT_RETENTION,
    AuditEvent,
    check_retention,
    cutoff_id,
    load_changes,
)
from keyguard.errors import (
    ApiHasKeys,
    ApiNotExposed,
    ConfigurationError,
    DuplicateName,
    KeyGuardError,
    KeyLimitReached,
    StoreUnavailable,
)
from keyguard.models import (
    Api,
    KeyChanges,
    KeyKind,
    KeyRecord,
    RateLimit,
    dump_meta,
    dump_rate_limits,
    load_meta,
    load_rate_limits,
    name_key,
)
from keyguard.stores.sql_upgrades import upgrade
from keyguard.usage import UsageCount

if TYPE_CHECKING:
    from typing import TypeAlias

    # A result row. Row's type parameters differ between SQLAlchemy 2.0 (a tuple TypeVar)
    # and 2.1 (a TypeVarTuple), and no spelling suits both; its columns are Any either way.
    _Row: TypeAlias = Any

logger = logging.getLogger("keyguard")

__all__ = ["SCHEMA_VERSION", "SQLStore"]

SCHEMA_VERSION = 2
"""The version of the tables this code reads and writes, recorded in ``<prefix>meta``."""

T = TypeVar("T")

# scheme -> (SQLAlchemy dialect, default async driver)
_DEFAULT_DRIVERS = {
    "sqlite": ("sqlite", "aiosqlite"),
    "postgresql": ("postgresql", "asyncpg"),
    "postgres": ("postgresql", "asyncpg"),
    "mysql": ("mysql", "asyncmy"),
    "mariadb": ("mariadb", "asyncmy"),
}
_DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb")
_TLS_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey")  # libpq's, SPEC §7
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
_PREFIX_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_NAME_LENGTH = 64  # API names and client ids
_KEY_NAME_LENGTH = 100
_NAME_KEY_LENGTH = 3 * _KEY_NAME_LENGTH  # casefold() can triple a character ("ﬃ" -> "ffi")
_VERSION_ROW = "schema_version"
_USED = "keyguard_used"  # marks a pooled connection that has served a call before
_LOCK_POLL_MS = 10  # SQLite: how long one try for the write lock waits (see _begin_immediate)
_AUDIT_ID_LENGTH = 26
_PRUNE_EVERY = 3600.0  # seconds between two prunings of old audit events by one store
_DEADLOCK_ATTEMPTS = 4  # tries of a usage write the database chose as a deadlock's victim


class _UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime to the microsecond on every database.

    PostgreSQL keeps ``timestamptz``; SQLite and MariaDB keep the UTC wall
    time (``DATETIME(6)`` on MariaDB, whose plain DATETIME drops microseconds).
    """

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(DateTime(timezone=True))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql_dialect.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value
        moment = moment.astimezone(timezone.utc)
        return moment if dialect.name == "postgresql" else moment.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class _Schema:
    """The four tables for one prefix on one kind of database, and the hot statements."""

    def __init__(self, prefix: str, dialect: Dialect) -> None:
        self.dialect_name = dialect.name
        table_options: dict[str, Any] = {}
        if dialect.name in ("mysql", "mariadb"):
            # Binary and no-pad: 'Acme' != 'acme' and 'id' != 'id ' (R6); the default
            # collation is case- and accent-insensitive and ignores trailing spaces.
            table_options = {
                f"{dialect.name}_engine": "InnoDB",
                f"{dialect.name}_charset": "utf8mb4",
                f"{dialect.name}_collate": _binary_collation(dialect),
            }
        self.metadata = MetaData()
        self.meta = Table(
            f"{prefix}meta",
            self.metadata,
            Column("name", String(64), primary_key=True),
            Column("value", String(255), nullable=False),
            **table_options,
        )
        self.apis = Table(
            f"{prefix}apis",
            self.metadata,
            Column("name", String(_NAME_LENGTH), primary_key=True),
            Column("exposed", Boolean(create_constraint=False), nullable=False),
            Column("max_keys_per_kind", Integer, nullable=False),
            Column("internal_count", Integer, nullable=False),
            Column("external_count", Integer, nullable=False),
            Column("rate_limits", Text(), nullable=False, server_default="[]"),  # version 2
            **table_options,
        )
        self.keys = Table(
            f"{prefix}keys",
            self.metadata,
            # Autoincrement: the tie-breaker for keys created in the same microsecond.
            Column(
                "id",
                BigInteger().with_variant(Integer(), "sqlite"),
                primary_key=True,
                autoincrement=True,
            ),
            Column("client_id", String(_NAME_LENGTH), nullable=False),
            Column(
                "api",
                String(_NAME_LENGTH),
                ForeignKey(self.apis.c.name, name=f"{prefix}keys_api_fkey"),
                nullable=False,
            ),
            Column("name", String(_KEY_NAME_LENGTH), nullable=False),
            Column("name_key", String(_NAME_KEY_LENGTH), nullable=False),
            Column("kind", String(8), nullable=False),
            Column("secret_hash", Text(), nullable=True),
            Column("created_at", _UTCDateTime(), nullable=False),
            # Version 2 (sql_upgrades.py adds the same to older tables): database
            # defaults, so a process still running older code can insert keys.
            Column(
                "enabled", Boolean(create_constraint=False), nullable=False, server_default=true()
            ),
            Column("expires_at", _UTCDateTime(), nullable=True),
            Column("meta", Text(), nullable=False, server_default="{}"),
            Column("previous_secret_hash", Text(), nullable=True),
            Column("previous_secret_expires_at", _UTCDateTime(), nullable=True),
            Column("last_used_at", _UTCDateTime(), nullable=True),
            Column("rate_limits", Text(), nullable=True),
            UniqueConstraint("client_id", name=f"{prefix}keys_client_id_key"),
            UniqueConstraint("api", "name_key", name=f"{prefix}keys_api_name_key"),
            CheckConstraint("kind IN ('internal', 'external')", name=f"{prefix}keys_kind_check"),
            **table_options,
        )
        # The audit log (SPEC §10). No foreign keys: events outlive their API and key.
        # Created by create_all on existing databases too, as a table of its own.
        self.audit = Table(
            f"{prefix}audit",
            self.metadata,
            Column("id", String(_AUDIT_ID_LENGTH), primary_key=True),  # sorts by time
            Column("at", _UTCDateTime(), nullable=False),
            Column("actor", String(200), nullable=False),
            Column("action", String(16), nullable=False),
            Column("api", String(_NAME_LENGTH), nullable=False),
            Column("client_id", String(_NAME_LENGTH), nullable=True),
            Column("name", String(_KEY_NAME_LENGTH), nullable=True),
            Column("changes", Text(), nullable=False),
            Index(f"{prefix}audit_api_idx", "api", "id"),
            Index(f"{prefix}audit_client_id_idx", "client_id", "id"),
            **table_options,
        )
        # Hourly usage buckets (SPEC §10). A new table, so create_all adds it to existing
        # stores too. No foreign key: a deleted key's counts stay until they are pruned.
        self.usage = Table(
            f"{prefix}usage",
            self.metadata,
            Column("api", String(_NAME_LENGTH), primary_key=True),
            Column("client_id", String(_NAME_LENGTH), primary_key=True),
            Column("hour", _UTCDateTime(), primary_key=True),
            Column("requests", BigInteger, nullable=False),
            Column("rate_limited", BigInteger, nullable=False),
            Index(f"{prefix}usage_hour", "hour"),
            **table_options,
        )
        apis, keys = self.apis, self.keys
        self.api_columns = (
            apis.c.name,
            apis.c.exposed,
            apis.c.max_keys_per_kind,
            apis.c.internal_count,
            apis.c.external_count,
            apis.c.rate_limits,
        )
        self.key_columns = (
            keys.c.api,
            keys.c.client_id,
            keys.c.name,
            keys.c.kind,
            keys.c.secret_hash,
            keys.c.created_at,
            keys.c.enabled,
            keys.c.expires_at,
            keys.c.meta,
            keys.c.previous_secret_hash,
            keys.c.previous_secret_expires_at,
            keys.c.last_used_at,
            keys.c.rate_limits,
        )
        # The request path's statements, built once.
        self.lookup_api: Select[Any] = select(apis.c.exposed).where(apis.c.name == bindparam("api"))
        self.lookup_key: Select[Any] = (
            select(apis.c.exposed, *self.key_columns)
            .select_from(
                apis.outerjoin(
                    keys,
                    (keys.c.api == apis.c.name) & (keys.c.client_id == bindparam("client_id")),
                )
            )
            .where(apis.c.name == bindparam("api"))
        )

    def count_column(self, kind: KeyKind) -> Column[Any]:
        """The counter of ``kind`` keys in the apis table."""
        return (
            self.apis.c.internal_count if kind is KeyKind.INTERNAL else self.apis.c.external_count
        )

    def add_usage(self) -> Insert:
        """``INSERT`` of one usage bucket (parameters ``api``, ``client_id``, ``hour``,
        ``requests``, ``rate_limited``) that adds the counts to the bucket if it exists."""
        usage = self.usage
        key = [usage.c.api, usage.c.client_id, usage.c.hour]
        if self.dialect_name == "postgresql":
            pg = pg_dialect.insert(usage)
            return pg.on_conflict_do_update(
                index_elements=key,
                set_={
                    "requests": usage.c.requests + pg.excluded.requests,
                    "rate_limited": usage.c.rate_limited + pg.excluded.rate_limited,
                },
            )
        if self.dialect_name == "sqlite":
            lite = sqlite_dialect.insert(usage)
            return lite.on_conflict_do_update(
                index_elements=key,
                set_={
                    "requests": usage.c.requests + lite.excluded.requests,
                    "rate_limited": usage.c.rate_limited + lite.excluded.rate_limited,
                },
            )
        my = mysql_dialect.insert(usage)  # MariaDB / MySQL
        upsert: Insert = my.on_duplicate_key_update(
            requests=usage.c.requests + my.inserted.requests,
            rate_limited=usage.c.rate_limited + my.inserted.rate_limited,
        )
        return upsert

    def insert_ignore(self, table: Table, values: Mapping[str, Any]) -> Insert:
        """``INSERT`` of ``values`` that does nothing if the primary key exists."""
        if self.dialect_name == "postgresql":
            return pg_dialect.insert(table).values(values).on_conflict_do_nothing()
        if self.dialect_name == "sqlite":
            return sqlite_dialect.insert(table).values(values).on_conflict_do_nothing()
        stmt = mysql_dialect.insert(table).values(values)  # MariaDB / MySQL
        return stmt.on_duplicate_key_update(name=stmt.inserted.name)


def _binary_collation(dialect: Dialect) -> str:
    """The exact (binary, no-pad) utf8mb4 collation this MariaDB/MySQL server has."""
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"  # MariaDB >= 10.2
    version = getattr(dialect, "server_version_info", None) or ()
    if tuple(version[:3]) >= (8, 0, 17):
        return "utf8mb4_0900_bin"
    return "utf8mb4_bin"  # older MySQL: binary but pads (client ids never end in spaces)


class SQLStore:
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
        # One engine per event loop (connections belong to the loop that opened them).
        # ``_current`` is the last loop's, read in one step on the hot path; the engine
        # above serves the first loop that uses the store (see ``_bind``).
        self._current: _Bound | None = None
        self._by_loop: dict[asyncio.AbstractEventLoop, _Bound] = {}
        self._unbound: AsyncEngine | None = engine
        self._bind_lock = threading.Lock()
        self._schema: _Schema | None = None
        self._closed = False
        self._password = engine.url.password

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
        store = cls(
            engine, table_prefix=table_prefix, timeout=timeout, audit_retention=audit_retention
        )
        store._factory = lambda: _create_engine(parsed, options)
        return store

    def __repr__(self) -> str:
        return f"SQLStore({self.url!r}, table_prefix={self._prefix!r})"

    @property
    def url(self) -> str:
        """The database URL, password masked."""
        return self._engine.url.render_as_string(hide_password=True)

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

    # -- KeyStore -------------------------------------------------------------------------

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        """Whether ``api`` exists and is exposed, and its key ``client_id``: one query."""
        if not _fits(api, _NAME_LENGTH):
            return False, None
        if client_id is None or not _fits(client_id, _NAME_LENGTH):

            async def exposed_only(conn: AsyncConnection, schema: _Schema) -> bool:
                result = await conn.execute(schema.lookup_api, {"api": api})
                return bool(result.scalar())

            return await self._run(exposed_only, write=False), None

        async def exposed_and_key(
            conn: AsyncConnection, schema: _Schema
        ) -> tuple[bool, KeyRecord | None]:
            result = await conn.execute(schema.lookup_key, {"api": api, "client_id": client_id})
            row = result.first()
            if row is None:
                return False, None
            return bool(row.exposed), None if row.client_id is None else _record(row)

        return await self._run(exposed_and_key, write=False)

    async def get_api(self, api: str) -> Api | None:
        """The API with its key counts, or ``None`` if it was never created."""
        if not _fits(api, _NAME_LENGTH):
            return None

        async def work(conn: AsyncConnection, schema: _Schema) -> Api | None:
            stmt = select(*schema.api_columns).where(schema.apis.c.name == api)
            row = (await conn.execute(stmt)).first()
            return None if row is None else _api(row)

        return await self._run(work, write=False)

    async def list_apis(self) -> list[Api]:
        """Every API, ordered by name (by code point, as Python sorts), with key counts."""

        async def work(conn: AsyncConnection, schema: _Schema) -> list[Api]:
            rows = (await conn.execute(select(*schema.api_columns))).all()
            return sorted((_api(row) for row in rows), key=lambda found: found.name)

        return await self._run(work, write=False)

    async def upsert_api(
        self,
        api: str,
        *,
        exposed: bool | None,
        max_keys_per_kind: int | None,
        default_max_keys_per_kind: int,
        rate_limits: tuple[RateLimit, ...] | None = None,
        audit: AuditEvent | None = None,
    ) -> Api:
        """Create ``api`` if missing, then set the fields given; keys are never touched."""

        async def work(conn: AsyncConnection, schema: _Schema) -> Api:
            apis = schema.apis
            await conn.execute(
                schema.insert_ignore(
                    apis,
                    {
                        "name": api,
                        "exposed": False,
                        "max_keys_per_kind": default_max_keys_per_kind,
                        "internal_count": 0,
                        "external_count": 0,
                        "rate_limits": dump_rate_limits(()),
                    },
                )
            )
            changes: dict[str, Any] = {}
            if exposed is not None:
                changes["exposed"] = exposed
            if max_keys_per_kind is not None:
                changes["max_keys_per_kind"] = max_keys_per_kind
            if rate_limits is not None:
                changes["rate_limits"] = dump_rate_limits(rate_limits)
            if changes:
                await conn.execute(update(apis).where(apis.c.name == api).values(changes))
            row = (await conn.execute(select(*schema.api_columns).where(apis.c.name == api))).one()
            await _write_audit(conn, schema, audit)
            return _api(row)

        return await self._changed(await self._run(work, write=True), audit)

    async def insert_key(self, record: KeyRecord, *, audit: AuditEvent | None = None) -> None:
        """Add ``record`` atomically (R1, R2, R3 checked by the database), or raise."""

        async def work(conn: AsyncConnection, schema: _Schema) -> None:
            apis = schema.apis
            count = schema.count_column(record.kind)
            # Take a place first: the row lock makes check-and-increment atomic (R2).
            taken = await conn.execute(
                update(apis)
                .where(
                    apis.c.name == record.api,
                    apis.c.exposed.is_(True),
                    count < apis.c.max_keys_per_kind,
                )
                .values({count: count + 1})
            )
            if taken.rowcount != 1:
                why = select(apis.c.exposed, apis.c.max_keys_per_kind).where(
                    apis.c.name == record.api
                )
                row = (await conn.execute(why)).first()
                if row is None or not row.exposed:
                    raise ApiNotExposed(f"API {record.api!r} is not exposed")
                raise KeyLimitReached(
                    f"API {record.api!r} already has {row.max_keys_per_kind} "
                    f"{record.kind.value} keys"
                )
            # Before the insert, so the event is rolled back with a refused one.
            await _write_audit(conn, schema, audit)
            try:
                await conn.execute(
                    insert(schema.keys).values(
                        client_id=record.client_id,
                        api=record.api,
                        name=record.name,
                        name_key=name_key(record.name),
                        kind=record.kind.value,
                        secret_hash=record.secret_hash,
                        created_at=record.created_at,
                        enabled=record.enabled,
                        expires_at=record.expires_at,
                        meta=dump_meta(record.meta),
                        previous_secret_hash=record.previous_secret_hash,
                        previous_secret_expires_at=record.previous_secret_expires_at,
                        last_used_at=record.last_used_at,
                        rate_limits=dump_rate_limits(record.rate_limits),
                    )
                )
            except sa_exc.IntegrityError:
                # UNIQUE (api, name_key): leaving the block rolls the counter back too.
                # Not chained: the driver's error quotes the row, secret hash included,
                # whenever the engine does not hide parameters (an app's own engine).
                raise DuplicateName(
                    f"API {record.api!r} already has a key named {record.name!r}"
                ) from None

        await self._run(work, write=True)
        await self._changed(None, audit)

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        """The key ``client_id`` of ``api``, or ``None``; client ids compare exactly."""
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return None

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyRecord | None:
            return await _stored_key(conn, schema, api, client_id)

        return await self._run(work, write=False)

    async def list_keys(self, api: str) -> list[KeyRecord]:
        """The keys of ``api``, oldest first (insertion order within one microsecond)."""
        if not _fits(api, _NAME_LENGTH):
            return []

        async def work(conn: AsyncConnection, schema: _Schema) -> list[KeyRecord]:
            keys = schema.keys
            stmt = (
                select(*schema.key_columns)
                .where(keys.c.api == api)
                .order_by(keys.c.created_at, keys.c.id)
            )
            return [_record(row) for row in (await conn.execute(stmt)).all()]

        return await self._run(work, write=False)

    async def update_key(
        self,
        api: str,
        client_id: str,
        changes: KeyChanges,
        *,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Change the given fields in one ``UPDATE`` and return the key as stored afterwards;
        ``None`` if there is no such key. A rename clashing (casefolded) with another key of
        the API is refused by ``UNIQUE (api, name_key)``: ``DuplicateName``, nothing changed.
        """
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return None
        given = changes.given()
        values: dict[str, Any] = {}
        if "name" in given:
            values["name"] = given["name"]
            values["name_key"] = name_key(given["name"])
        if "enabled" in given:
            values["enabled"] = given["enabled"]
        if "expires_at" in given:
            values["expires_at"] = given["expires_at"]
        if "meta" in given:
            values["meta"] = dump_meta(given["meta"])
        if "rate_limits" in given:
            values["rate_limits"] = dump_rate_limits(given["rate_limits"])

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyRecord | None:
            keys = schema.keys
            if values:
                which = (keys.c.api == api) & (keys.c.client_id == client_id)
                if audit is not None:
                    # Before the change, so a refused rename rolls the event back with it;
                    # only for a key that exists (the UPDATE below would find none).
                    exists = await conn.execute(select(keys.c.id).where(which))
                    if exists.first() is None:
                        return None
                    await _write_audit(conn, schema, audit)
                try:
                    changed = await conn.execute(update(keys).where(which).values(values))
                except sa_exc.IntegrityError:
                    if "name" not in values:
                        raise
                    # UNIQUE (api, name_key); not chained, as in insert_key.
                    raise DuplicateName(
                        f"API {api!r} already has a key named {values['name']!r}"
                    ) from None
                if changed.rowcount != 1:
                    # Deleted since it was seen: leaving by an error rolls the event back.
                    raise _Vanished()
            # The same transaction: the row lock taken by the UPDATE is still held.
            return await _stored_key(conn, schema, api, client_id)

        try:
            updated = await self._run(work, write=bool(values))
        except _Vanished:
            return None
        return await self._changed(updated, audit if updated is not None else None)

    async def set_secret_hash(
        self,
        api: str,
        client_id: str,
        secret_hash: str,
        *,
        previous_until: datetime | None = None,
        audit: AuditEvent | None = None,
    ) -> KeyRecord | None:
        """Replace the hash of the *external* key ``client_id`` in one ``UPDATE`` (keeping the
        old hash as the previous one until ``previous_until``, if given and there was one)
        and return the key afterwards; ``None`` if there is no such external key.
        """
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return None

        async def work(conn: AsyncConnection, schema: _Schema) -> KeyRecord | None:
            keys = schema.keys
            previous: list[tuple[Column[Any], Any]]
            if previous_until is None:
                previous = [(keys.c.previous_secret_expires_at, None)]
                previous.append((keys.c.previous_secret_hash, None))
            else:
                # The old hash and the roll's end come from the row as this statement finds
                # it, so a roll racing another keeps one whole pair. MariaDB/MySQL assign
                # left to right, each later expression seeing the earlier ones' new values:
                # every expression reading secret_hash comes before it is set.
                previous = [
                    (
                        keys.c.previous_secret_expires_at,
                        case(
                            (keys.c.secret_hash.is_(None), None),
                            else_=bindparam("previous_until", previous_until, _UTCDateTime()),
                        ),
                    ),
                    (keys.c.previous_secret_hash, keys.c.secret_hash),
                ]
            result = await conn.execute(
                update(keys)
                .where(
                    keys.c.api == api,
                    keys.c.client_id == client_id,
                    keys.c.kind == KeyKind.EXTERNAL.value,
                )
                .ordered_values(*previous, (keys.c.secret_hash, secret_hash))
            )
            if result.rowcount != 1:
                return None
            await _write_audit(conn, schema, audit)
            return await _stored_key(conn, schema, api, client_id)

        updated = await self._run(work, write=True)
        return await self._changed(updated, audit if updated is not None else None)

    async def delete_key(
        self, api: str, client_id: str, *, audit: AuditEvent | None = None
    ) -> bool:
        """Delete the key and give its place back, in one transaction; ``False`` if none."""
        if not (_fits(api, _NAME_LENGTH) and _fits(client_id, _NAME_LENGTH)):
            return False

        async def work(conn: AsyncConnection, schema: _Schema) -> bool:
            apis, keys = schema.apis, schema.keys
            which = (keys.c.api == api) & (keys.c.client_id == client_id)
            kind = (await conn.execute(select(keys.c.kind).where(which))).scalar()
            if kind is None:
                return False
            # The API row first, as insert_key does: one lock order, no deadlock.
            count = schema.count_column(KeyKind(kind))
            await conn.execute(update(apis).where(apis.c.name == api).values({count: count - 1}))
            if (await conn.execute(delete(keys).where(which))).rowcount == 1:
                await _write_audit(conn, schema, audit)
                return True
            # Another call deleted it since we read its kind: give the place back.
            await conn.execute(update(apis).where(apis.c.name == api).values({count: count + 1}))
            return False

        deleted = await self._run(work, write=True)
        return await self._changed(deleted, audit if deleted else None)

    async def delete_api(self, api: str, *, force: bool, audit: AuditEvent | None = None) -> bool:
        """Delete the API (and, with ``force``, its keys) in one transaction; ``False`` if none."""
        if not _fits(api, _NAME_LENGTH):
            return False

        async def work(conn: AsyncConnection, schema: _Schema) -> bool:
            apis, keys = schema.apis, schema.keys
            # Lock the API row first, as insert_key does: its counters cannot change
            # until this transaction ends, so the check below and the delete are one step.
            locked = await conn.execute(
                update(apis).where(apis.c.name == api).values(name=apis.c.name)
            )
            if locked.rowcount != 1:
                return False
            counts = (
                await conn.execute(
                    select(apis.c.internal_count, apis.c.external_count).where(apis.c.name == api)
                )
            ).one()
            held = counts.internal_count + counts.external_count
            if held and not force:
                raise ApiHasKeys(f"API {api!r} has {held} keys")
            await conn.execute(delete(keys).where(keys.c.api == api))
            await conn.execute(delete(apis).where(apis.c.name == api))
            await _write_audit(conn, schema, audit)
            return True

        deleted = await self._run(work, write=True)
        return await self._changed(deleted, audit if deleted else None)

    async def list_audit(
        self,
        *,
        api: str | None = None,
        client_id: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[AuditEvent]:
        """Audit events newest first, by the primary key (ids sort by time); an index on
        ``(api, id)`` and one on ``(client_id, id)`` serve the filtered listings."""
        if (api is not None and not _fits(api, _NAME_LENGTH)) or (
            client_id is not None and not _fits(client_id, _NAME_LENGTH)
        ):
            return []
        cutoff = cutoff_id(self.audit_retention)

        async def work(conn: AsyncConnection, schema: _Schema) -> list[AuditEvent]:
            audit = schema.audit
            stmt = select(audit).where(audit.c.id >= cutoff)
            if api is not None:
                stmt = stmt.where(audit.c.api == api)
            if client_id is not None:
                stmt = stmt.where(audit.c.client_id == client_id)
            if before is not None:
                stmt = stmt.where(audit.c.id < before)
            stmt = stmt.order_by(audit.c.id.desc()).limit(limit)
            return [_event(row) for row in (await conn.execute(stmt)).all()]

        return await self._run(work, write=False)

    async def prune_audit(self) -> int:
        """Delete the audit events older than ``audit_retention``; how many were deleted.
        Run by the store itself after a change, at most once an hour."""
        cutoff = cutoff_id(self.audit_retention)

        async def work(conn: AsyncConnection, schema: _Schema) -> int:
            result = await conn.execute(delete(schema.audit).where(schema.audit.c.id < cutoff))
            return int(result.rowcount or 0)

        return await self._run(work, write=True)

    async def _changed(self, result: T, audit: AuditEvent | None) -> T:
        """``result`` of a change that wrote ``audit``, after pruning old events if due.

        Pruning is a transaction of its own, after the change's: the change is made
        whatever happens to it, so a failure is only logged.
        """
        now = time.monotonic()
        if audit is None or (self._pruned_at is not None and now - self._pruned_at < _PRUNE_EVERY):
            return result
        self._pruned_at = now
        try:
            pruned = await self.prune_audit()
        except StoreUnavailable as exc:
            logger.warning("SQL store %s: old audit events not pruned (%s)", self.url, exc)
        else:
            if pruned:
                logger.info("SQL store %s: %d audit events past retention pruned", self.url, pruned)
        return result

    async def record_usage(self, counts: Sequence[UsageCount]) -> None:
        """Add the counts to their buckets (one upsert per bucket, adding to what it holds)
        and raise the keys' ``last_used_at``, all in one transaction.

        Rows are written in one order (API, client id, hour) by every process, so two
        flushes never wait on each other's rows in a cycle; a deadlock the database
        reports anyway (MariaDB's gap locks) is retried: it rolled everything back.
        """
        buckets = [
            {
                "api": c.api,
                "client_id": c.client_id,
                "hour": c.hour,
                "requests": c.requests,
                "rate_limited": c.rate_limited,
            }
            for c in sorted(counts, key=lambda c: (c.api, c.client_id, c.hour))
            if (c.requests or c.rate_limited)
            and _fits(c.api, _NAME_LENGTH)
            and _fits(c.client_id, _NAME_LENGTH)
        ]
        latest: dict[tuple[str, str], datetime] = {}
        for c in counts:
            key = (c.api, c.client_id)
            if c.last_used_at is not None and (key not in latest or latest[key] < c.last_used_at):
                latest[key] = c.last_used_at
        used = [
            {"b_api": api, "b_client_id": client_id, "b_at": at}
            for (api, client_id), at in sorted(latest.items())
        ]
        if not buckets and not used:
            return

        async def work(conn: AsyncConnection, schema: _Schema) -> None:
            if buckets:
                await conn.execute(schema.add_usage(), buckets)
            if used:
                keys = schema.keys
                at = bindparam("b_at", type_=_UTCDateTime())
                await conn.execute(
                    update(keys)
                    .where(
                        keys.c.api == bindparam("b_api"),
                        keys.c.client_id == bindparam("b_client_id"),
                        or_(keys.c.last_used_at.is_(None), keys.c.last_used_at < at),
                    )
                    .values(last_used_at=at),
                    used,
                )

        for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
            try:
                await self._run(work, write=True)
                return
            except StoreUnavailable as exc:
                if attempt == _DEADLOCK_ATTEMPTS or "deadlock" not in str(exc).lower():
                    raise
                await asyncio.sleep(0.01 * attempt)

    async def read_usage(
        self, api: str, client_id: str | None, since: datetime
    ) -> list[UsageCount]:
        """The buckets of ``api`` (or of its key ``client_id``) from ``since`` on: one query."""
        if not _fits(api, _NAME_LENGTH) or (
            client_id is not None and not _fits(client_id, _NAME_LENGTH)
        ):
            return []

        async def work(conn: AsyncConnection, schema: _Schema) -> list[UsageCount]:
            usage = schema.usage
            stmt = select(
                usage.c.client_id, usage.c.hour, usage.c.requests, usage.c.rate_limited
            ).where(usage.c.api == api, usage.c.hour >= since)
            if client_id is not None:
                stmt = stmt.where(usage.c.client_id == client_id)
            return [
                UsageCount(api, row.client_id, row.hour, int(row.requests), int(row.rate_limited))
                for row in (await conn.execute(stmt)).all()
            ]

        return await self._run(work, write=False)

    async def prune_usage(self, before: datetime) -> None:
        """Delete the buckets of hours before ``before``."""

        async def work(conn: AsyncConnection, schema: _Schema) -> None:
            await conn.execute(delete(schema.usage).where(schema.usage.c.hour < before))

        await self._run(work, write=True)

    async def aclose(self) -> None:
        """Release the connections of engines this store created; a passed-in one stays open."""
        self._closed = True
        self._current = None  # every call now takes the slow path, which refuses it
        if self._factory is None:
            return
        running = _running_loop()
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
        self, work: Callable[[AsyncConnection, _Schema], Awaitable[T]], *, write: bool
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
        """
        try:
            with anyio.move_on_after(self._timeout) as scope:
                return await self._attempts(work, write=write, deadline=scope.deadline)
        except KeyGuardError:
            raise
        except Exception as exc:
            if _is_driver_error(exc):
                raise self._unavailable(exc) from exc
            raise
        # Only reached when the deadline cancelled the attempts.
        raise StoreUnavailable(
            f"SQL store {self.url} unavailable (no answer within {self._timeout:g} s)"
        )

    async def _attempts(
        self,
        work: Callable[[AsyncConnection, _Schema], Awaitable[T]],
        *,
        write: bool,
        deadline: float,
    ) -> T:
        bound, schema = await self._ready(deadline)
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

    def _reader(self, engine: AsyncEngine) -> AsyncEngine:
        """The engine for single-statement reads.

        On PostgreSQL they run in autocommit, which spares the BEGIN and
        ROLLBACK round trips (a single statement is atomic by itself).
        """
        if engine.dialect.name != "postgresql":
            return engine
        return engine.execution_options(isolation_level="AUTOCOMMIT")

    async def _ready(self, deadline: float) -> tuple[_Bound, _Schema]:
        """The running event loop's engine, and the tables, created if needed."""
        bound = self._current
        if bound is None or bound.loop is not asyncio.get_running_loop():
            bound = await self._bind()
        if self._schema is None:
            async with bound.schema_lock:
                if self._schema is None:
                    self._schema = await self._create_schema(bound.engine, deadline)
        return bound, self._schema

    async def _bind(self) -> _Bound:
        """This loop's engine: the first loop gets the one built in ``from_url``, each
        later loop a new one, closed when that loop shuts down."""
        if self._closed:
            raise StoreUnavailable(f"SQL store {self.url} is closed")
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
            bound = _Bound(loop, engine, self._reader(engine), asyncio.Lock(), closer)
            self._by_loop[loop] = bound
            for other, stale in list(self._by_loop.items()):
                if other.is_closed():
                    # A loop closed without finalizing its async generators: its
                    # connections cannot be closed any more, only dropped.
                    self._by_loop.pop(other, None)
                    _abandon(stale.engine)
        self._engine = bound.engine
        self._current = bound
        return bound

    async def _create_schema(self, engine: AsyncEngine, deadline: float) -> _Schema:
        """Create the tables if missing and record the schema version, or check it.

        Several processes may start at once: whoever loses the race to create
        a table (an "already exists" error) tries again and finds it there,
        until the call's deadline.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                async with _connect(engine) as conn:
                    schema = _Schema(self._prefix, conn.dialect)
                    sqlite = schema.dialect_name == "sqlite"
                    if sqlite:
                        # Readers never wait for a writer; the mode sticks to the file.
                        await conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                        await conn.commit()
                    meta = schema.meta
                    async with conn.begin():
                        if sqlite:
                            await _begin_immediate(conn, deadline, self._timeout)
                        await conn.run_sync(schema.metadata.create_all)
                        await conn.execute(
                            schema.insert_ignore(
                                meta, {"name": _VERSION_ROW, "value": str(SCHEMA_VERSION)}
                            )
                        )
                    # A new transaction: its snapshot shows a row another process wrote.
                    async with conn.begin():
                        read = select(meta.c.value).where(meta.c.name == _VERSION_ROW)
                        version = int((await conn.execute(read)).scalar_one())
                    if version < SCHEMA_VERSION:
                        version = await upgrade(
                            conn,
                            prefix=self._prefix,
                            meta_table=meta.name,
                            found=version,
                            target=SCHEMA_VERSION,
                        )
                        logger.info(
                            "SQL store %s: tables %s* upgraded to schema version %s",
                            self.url,
                            self._prefix,
                            version,
                        )
                    conn.info[_USED] = True
                break
            except sa_exc.DBAPIError as exc:
                if not _lost_creation_race(exc):
                    raise
                # Retried until the call's deadline cancels the wait.
                await asyncio.sleep(min(0.02 * attempt, 0.2))
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the tables {self._prefix}* have schema version {version}, newer than this "
                f"keyguard understands ({SCHEMA_VERSION}): upgrade keyguard"
            )
        return schema

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        """The error for a driver failure: what failed, never the password."""
        cause: BaseException = exc
        if isinstance(exc, sa_exc.DBAPIError) and isinstance(exc.orig, BaseException):
            cause = exc.orig
            # SQLAlchemy's async adapters wrap the driver's own error once more.
            if cause.__cause__ is not None and type(cause).__module__.startswith("sqlalchemy"):
                cause = cause.__cause__
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        if self._password:
            detail = detail.replace(self._password, "***")
        if len(detail) > 200:
            detail = detail[:197] + "..."
        reason = type(cause).__name__ + (f": {detail}" if detail else "")
        if isinstance(exc, TimeoutError | asyncio.TimeoutError) and not detail:
            reason = f"no answer within {self._timeout:g} s"  # the driver's own timeout
        return StoreUnavailable(f"SQL store {self.url} unavailable ({reason})")


# -- helpers ----------------------------------------------------------------------------------


def _api(row: _Row) -> Api:
    return Api(
        name=row.name,
        exposed=bool(row.exposed),
        max_keys_per_kind=row.max_keys_per_kind,
        internal_keys=row.internal_count,
        external_keys=row.external_count,
        rate_limits=load_rate_limits(row.rate_limits) or (),
    )


class _Vanished(KeyGuardError):
    """Leaves a transaction (rolling it back) when the key to change has gone meanwhile.
    A ``KeyGuardError``, so the connection is rolled back and kept, not cut."""

    def __init__(self) -> None:
        super().__init__("the key is gone")


async def _write_audit(conn: AsyncConnection, schema: _Schema, audit: AuditEvent | None) -> None:
    """Insert ``audit`` in the transaction of ``conn`` (nothing if ``None``)."""
    if audit is None:
        return
    await conn.execute(
        insert(schema.audit).values(
            id=audit.id,
            at=audit.at,
            actor=audit.actor,
            action=audit.action,
            api=audit.api,
            client_id=audit.client_id,
            name=audit.name,
            changes=audit.dump_changes(),
        )
    )


def _event(row: _Row) -> AuditEvent:
    return AuditEvent(
        id=row.id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        api=row.api,
        client_id=row.client_id,
        name=row.name,
        changes=load_changes(row.changes),
    )


def _record(row: _Row) -> KeyRecord:
    return KeyRecord(
        api=row.api,
        client_id=row.client_id,
        name=row.name,
        kind=KeyKind(row.kind),
        secret_hash=row.secret_hash,
        created_at=row.created_at,
        enabled=bool(row.enabled),
        expires_at=row.expires_at,
        meta=load_meta(row.meta),
        previous_secret_hash=row.previous_secret_hash,
        previous_secret_expires_at=row.previous_secret_expires_at,
        last_used_at=row.last_used_at,
        rate_limits=load_rate_limits(row.rate_limits),
    )


async def _stored_key(
    conn: AsyncConnection, schema: _Schema, api: str, client_id: str
) -> KeyRecord | None:
    """The key ``client_id`` of ``api`` as ``conn`` sees it, or ``None``."""
    keys = schema.keys
    stmt = select(*schema.key_columns).where(keys.c.api == api, keys.c.client_id == client_id)
    row = (await conn.execute(stmt)).first()
    return None if row is None else _record(row)


def _fits(value: str, length: int) -> bool:
    """Whether ``value`` could be stored at all; if not, it can match nothing.

    Saves a round trip, and spares PostgreSQL text it rejects (NUL, lone surrogates).
    """
    return len(value) <= length and value.isprintable()


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
    return "already exists" in text or "duplicate" in text or "database is locked" in text


# -- engines per event loop, deadlines ---------------------------------------------------------

_Closer = AsyncGenerator[None, None]


@dataclass(eq=False)
class _Bound:
    """One event loop's engine, and what goes with it."""

    loop: asyncio.AbstractEventLoop
    engine: AsyncEngine
    reader: AsyncEngine  # the same pool; autocommit on PostgreSQL (see SQLStore._reader)
    schema_lock: asyncio.Lock
    closer: _Closer | None  # None for an engine the app passed in: the app closes it
    # SQLite: this loop's writers queue here, in order, so that only one of them at a
    # time polls for the file's write lock against other processes (see _begin_immediate).
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


async def _close_with_loop(
    engine: AsyncEngine,
    registry: dict[asyncio.AbstractEventLoop, _Bound],
    loop: asyncio.AbstractEventLoop,
    patience: float,
) -> _Closer:
    try:
        yield
    finally:
        registry.pop(loop, None)
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
            if not isinstance(exc, KeyGuardError | sa_exc.IntegrityError):
                _sever(conn)
            raise


def _sever(conn: AsyncConnection) -> None:
    """Close the network connection under ``conn`` now, without a word to the server."""
    sync = conn.sync_connection
    if conn.dialect.name == "sqlite" or sync is None or sync.invalidated or sync.closed:
        return  # SQLite has no network; SQLAlchemy already dealt with an invalidated one
    try:
        driver = sync.connection.driver_connection
    except sa_exc.SQLAlchemyError:
        return
    terminate = getattr(driver, "terminate", None)  # asyncpg
    if terminate is None:
        close = getattr(driver, "close", None)  # asyncmy, aiomysql: closes the socket
        terminate = None if inspect.iscoroutinefunction(close) else close
    if callable(terminate):
        with contextlib.suppress(Exception):
            terminate()


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
    try:
        while True:
            try:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                break
            except sa_exc.OperationalError as exc:
                if not _is_busy(exc) or anyio.current_time() >= deadline:
                    raise
    finally:
        # Back to the connection's own wait, for the rare lock a reader meets.
        with anyio.CancelScope(shield=True):
            await conn.exec_driver_sql(f"PRAGMA busy_timeout = {math.ceil(reader_wait * 1000)}")


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


def _tls_parameters(parsed: URL) -> dict[str, str]:
    """libpq's TLS parameters in a PostgreSQL URL for asyncpg, which does not take them
    as keywords (``sslmode=require`` would reach ``asyncpg.connect`` as an unknown one)."""
    if parsed.get_driver_name() != "asyncpg":
        return {}  # psycopg hands them to libpq itself
    found: dict[str, str] = {}
    for name in _TLS_PARAMETERS:
        value = parsed.query.get(name)
        if value is not None:
            found[name] = value if isinstance(value, str) else value[-1]
    return found


def _engine_options(parsed: URL, timeout: float, given: Mapping[str, Any]) -> dict[str, Any]:
    """This store's engine defaults (every wait bounded by ``timeout``), under ``given``."""
    driver = parsed.get_driver_name()
    connect_args: dict[str, Any] = {}
    if driver == "asyncpg":
        connect_args = {
            "timeout": timeout,
            "command_timeout": timeout,
            "server_settings": {"application_name": "keyguard"},
        }
        if tls := _tls_parameters(parsed):
            # asyncpg reads libpq's TLS parameters from a DSN only, with libpq's meaning
            # (verify-full checks the name, require with a root certificate verifies the
            # chain…); the host, user and the rest still come as keywords, which win.
            connect_args["dsn"] = "postgresql://?" + urlencode(tls)
    elif driver == "psycopg":
        connect_args = {
            "connect_timeout": max(1, math.ceil(timeout)),
            "options": f"-c statement_timeout={math.ceil(timeout * 1000)}",
            "application_name": "keyguard",
        }
    elif driver == "asyncmy":
        connect_args = {"connect_timeout": timeout, "read_timeout": timeout}
    elif driver == "aiomysql":
        connect_args = {"connect_timeout": timeout}
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
    if tls := _tls_parameters(parsed):
        parsed = parsed.difference_update_query(tls)  # given to asyncpg by _engine_options
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
    except (TypeError, sa_exc.ArgumentError) as exc:
        raise ConfigurationError(f"bad SQL store option: {exc}") from exc
    _hide_rows(engine)
    return engine


def _mask(url: str) -> str:
    """``url`` with any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("://", 1)[0] + "://…"
