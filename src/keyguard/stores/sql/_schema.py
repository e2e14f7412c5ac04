"""The tables of a SQL store, their column types, and rows turned into keyguard's records."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

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
    select,
    true,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import TypeEngine

from keyguard.audit import (
    AuditEvent,
    load_changes,
)
from keyguard.models import (
    Api,
    KeyKind,
    KeyRecord,
    load_meta,
    load_rate_limits,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    # A result row. Row's type parameters differ between SQLAlchemy 2.0 (a tuple TypeVar)
    # and 2.1 (a TypeVarTuple), and no spelling suits both; its columns are Any either way.
    _Row: TypeAlias = Any

logger = logging.getLogger("keyguard")


SCHEMA_VERSION = 2
"""The version of the tables this code reads and writes, recorded in ``<prefix>meta``."""

_PREFIX_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_NAME_LENGTH = 64  # API names and client ids
_KEY_NAME_LENGTH = 100
_NAME_KEY_LENGTH = 3 * _KEY_NAME_LENGTH  # casefold() can triple a character ("ﬃ" -> "ffi")
_VERSION_ROW = "schema_version"
_AUDIT_ID_LENGTH = 26


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
            # Version 2.
            Column(
                "rate_limits", Text(), nullable=False, server_default=_text_default(dialect, "[]")
            ),
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
            # Version 2 (_upgrades.py adds the same to older tables): database
            # defaults, so a process still running older code can insert keys.
            Column(
                "enabled", Boolean(create_constraint=False), nullable=False, server_default=true()
            ),
            Column("expires_at", _UTCDateTime(), nullable=True),
            Column("meta", Text(), nullable=False, server_default=_text_default(dialect, "{}")),
            Column("previous_secret_hash", Text(), nullable=True),
            Column("previous_secret_expires_at", _UTCDateTime(), nullable=True),
            Column("last_used_at", _UTCDateTime(), nullable=True),
            Column("rate_limits", Text(), nullable=True),
            UniqueConstraint("client_id", name=f"{prefix}keys_client_id_key"),
            UniqueConstraint("api", "name_key", name=f"{prefix}keys_api_name_key"),
            CheckConstraint("kind IN ('internal', 'external')", name=f"{prefix}keys_kind_check"),
            # The listing order (SPEC §5's pages): one index range scan per page. Added to
            # tables of older code in place, without a version step (_upgrades.py).
            Index(f"{prefix}keys_api_order_idx", "api", "created_at", "id"),
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

        # The cache's refresh of an API (snapshot): the API's row joined with its keys,
        # only when it holds at most ``max_keys`` of them in all. One statement.
        self.snapshot: Select[Any] = (
            select(
                apis.c.name.label("api_name"),
                apis.c.exposed.label("api_exposed"),
                apis.c.max_keys_per_kind.label("api_max"),
                apis.c.internal_count.label("api_internal"),
                apis.c.external_count.label("api_external"),
                apis.c.rate_limits.label("api_rate_limits"),
                *self.key_columns,
            )
            .select_from(
                apis.outerjoin(
                    keys,
                    (keys.c.api == apis.c.name)
                    & (apis.c.internal_count + apis.c.external_count <= bindparam("max_keys")),
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


def _text_default(dialect: Dialect, value: str) -> str | TextClause:
    """The database default ``value`` of a TEXT column: MySQL (8.0.13 and later; not
    MariaDB) takes one only written as an expression, ``DEFAULT ('{}')``, and refuses the
    table otherwise (error 1101)."""
    if dialect.name in ("mysql", "mariadb") and not getattr(dialect, "is_mariadb", False):
        return sql_text(f"('{value}')")
    return value


def _binary_collation(dialect: Dialect) -> str:
    """The exact (binary, no-pad) utf8mb4 collation this MariaDB/MySQL server has."""
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"  # MariaDB >= 10.2
    version = getattr(dialect, "server_version_info", None) or ()
    if tuple(version[:3]) >= (8, 0, 17):
        return "utf8mb4_0900_bin"
    return "utf8mb4_bin"  # older MySQL: binary but pads (client ids never end in spaces)


def _api(row: _Row) -> Api:
    return Api(
        name=row.name,
        exposed=bool(row.exposed),
        max_keys_per_kind=row.max_keys_per_kind,
        internal_keys=row.internal_count,
        external_keys=row.external_count,
        rate_limits=load_rate_limits(row.rate_limits) or (),
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
