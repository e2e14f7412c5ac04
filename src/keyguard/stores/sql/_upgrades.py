"""Upgrading a SQL store's tables in place, one schema version at a time.

``SQLStore`` calls :func:`upgrade` on first use when the tables record an
older ``schema_version`` than the code's. Every step only *adds* (columns
with database defaults), so nothing is lost and a process still running the
older code keeps reading and writing the same tables during a rolling
deploy. Several processes may start at once against old tables:

* PostgreSQL: the version row is locked (``SELECT … FOR UPDATE``) for the
  whole step, so one process upgrades and the others, once it commits, see
  the new version and skip; ``ADD COLUMN IF NOT EXISTS`` besides.
* MariaDB/MySQL: DDL commits by itself, so no lock can span the step;
  instead each statement is idempotent (``ADD COLUMN IF NOT EXISTS``) and
  the version only moves forward (``UPDATE … WHERE value = <old>``).
* SQLite: the step's first statement is a write, which takes the file's
  write lock (waiting for the busy timeout), so upgraders run one after
  another; each looks at the columns it finds before adding any.

Version 2 (issue 14, key lifecycle) adds to the keys ``enabled``,
``expires_at``, ``meta``, ``previous_secret_hash``,
``previous_secret_expires_at``, ``last_used_at`` and ``rate_limits``, and to
the APIs ``rate_limits``.

Tables added later (``usage``, issue 16; ``audit``, issue 16) need no
version step: ``SQLStore`` creates missing tables on every first use
(``create_all`` with ``checkfirst``), and older code never reads them, so a
rolling deploy mixing versions keeps working. The version moves only when a
table that older code reads changes.

Indexes added later need no version step either: older code never depends on
them, and a newer version would make older processes refuse the tables. The
keys' listing index ``<prefix>keys_api_order_idx (api, created_at, id)``
(issue 17, pages of keys) is part of the table, so ``create_all`` makes it
with a new table; on an existing one :func:`ensure_indexes` creates it on
every first use if it is missing, in the same transaction as ``create_all``
(the SQLite write lock, or MariaDB's implicit commit, as there). Several
processes starting at once may both find it missing: the one that creates it
second fails with "already exists" / "Duplicate key name", and the store's
start-up retry then finds it there. Building it takes a moment on a large
table, once (PostgreSQL holds writes to the table meanwhile): seconds for a
million keys, longer than a call's timeout, which is why the whole step runs
as a task of its own under a budget of its own, never cut at a call's
deadline (``_SQLCore._ready``).
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, Table, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["V2_API_COLUMNS", "V2_KEY_COLUMNS", "column_spec", "ensure_indexes", "upgrade"]

# column -> dialect -> its type and default, as ALTER TABLE … ADD COLUMN writes them.
_TIME = {"postgresql": "TIMESTAMP WITH TIME ZONE", "mysql": "DATETIME(6)", "sqlite": "DATETIME"}
V2_KEY_COLUMNS: dict[str, dict[str, str]] = {
    "enabled": {
        "postgresql": "BOOLEAN NOT NULL DEFAULT TRUE",
        "mysql": "BOOL NOT NULL DEFAULT 1",
        "sqlite": "BOOLEAN NOT NULL DEFAULT 1",
    },
    "expires_at": {dialect: f"{kind} NULL" for dialect, kind in _TIME.items()},
    "meta": dict.fromkeys(_TIME, "TEXT NOT NULL DEFAULT '{}'"),
    "previous_secret_hash": dict.fromkeys(_TIME, "TEXT NULL"),
    "previous_secret_expires_at": {dialect: f"{kind} NULL" for dialect, kind in _TIME.items()},
    "last_used_at": {dialect: f"{kind} NULL" for dialect, kind in _TIME.items()},
    "rate_limits": dict.fromkeys(_TIME, "TEXT NULL"),
}
"""The columns version 2 adds to the keys table."""
V2_API_COLUMNS: dict[str, dict[str, str]] = {
    "rate_limits": dict.fromkeys(_TIME, "TEXT NOT NULL DEFAULT '[]'"),
}
"""The columns version 2 adds to the APIs table."""


async def upgrade(
    conn: AsyncConnection,
    *,
    prefix: str,
    meta_table: str,
    found: int,
    target: int,
    lock_wait: str | None = None,
) -> int:
    """Bring the tables of ``prefix`` from version ``found`` to ``target``, in steps.

    ``conn`` is a connection outside any transaction. ``lock_wait``: a statement
    run first in each step's transaction (PostgreSQL's ``SET LOCAL lock_timeout``).
    Returns the version the tables have afterwards (another process may have done
    the work).
    """
    version = found
    while version < target:
        step = _STEPS[version]
        version = await step(conn, prefix, meta_table, lock_wait)
    return version


def ensure_indexes(conn: Connection, table: Table) -> list[str]:
    """Create the indexes of ``table`` that its existing database table lacks (run
    through ``AsyncConnection.run_sync``, after ``create_all``); the names created."""
    present = {index["name"] for index in inspect(conn).get_indexes(table.name)}
    created = []
    for index in sorted(table.indexes, key=lambda index: str(index.name)):
        if index.name not in present:
            index.create(conn)
            created.append(str(index.name))
    return created


async def _to_v2(conn: AsyncConnection, prefix: str, meta_table: str, lock_wait: str | None) -> int:
    dialect = "mysql" if conn.dialect.name in ("mysql", "mariadb") else conn.dialect.name
    tables = ((f"{prefix}keys", V2_KEY_COLUMNS), (f"{prefix}apis", V2_API_COLUMNS))
    bump = text(
        f"UPDATE {meta_table} SET value = '2' WHERE name = 'schema_version' AND value = '1'"  # noqa: S608
    )
    # Table names come from a validated prefix ([a-z_][a-z0-9_]*), never from input.
    read = f"SELECT value FROM {meta_table} WHERE name = 'schema_version'"  # noqa: S608
    async with conn.begin():
        if lock_wait is not None:
            await conn.exec_driver_sql(lock_wait)
        if dialect == "sqlite":
            # A write first: the file's write lock, held to the commit, serializes upgraders.
            await conn.execute(
                text(f"UPDATE {meta_table} SET value = value WHERE name = 'schema_version'")  # noqa: S608
            )
        elif dialect == "postgresql":
            read += " FOR UPDATE"
        version = int((await conn.execute(text(read))).scalar_one())
        if version != 1:
            return version  # someone else upgraded while this process waited
        # MySQL (unlike MariaDB and PostgreSQL) has no ADD COLUMN IF NOT EXISTS: it and
        # SQLite look first; a column another process added meanwhile fails the step with
        # "duplicate column", and the store's start-up retry then finds it there.
        look_first = dialect == "sqlite" or not getattr(conn.dialect, "is_mariadb", True)
        for table, columns in tables:
            existing = await _columns(conn, table) if look_first else set()
            for column, types in columns.items():
                if column in existing:
                    continue
                if_missing = "" if look_first else "IF NOT EXISTS "
                spec = column_spec(types, dialect, mysql=dialect == "mysql" and look_first)
                await conn.execute(
                    text(f"ALTER TABLE {table} ADD COLUMN {if_missing}{column} {spec}")
                )
        await conn.execute(bump)
    return 2


def column_spec(types: dict[str, str], dialect: str, *, mysql: bool = False) -> str:
    """How ``ALTER TABLE … ADD COLUMN`` writes a column of ``types`` on ``dialect``;
    ``mysql``: on MySQL (not MariaDB), which takes a TEXT column's default only written
    as an expression, ``DEFAULT ('{}')``."""
    spec = types[dialect]
    if mysql:
        spec = re.sub(r"DEFAULT ('[^']*')", r"DEFAULT (\1)", spec)
    return spec


async def _columns(conn: AsyncConnection, table: str) -> set[str]:
    """The column names of ``table`` (SQLite or MySQL)."""
    if conn.dialect.name == "sqlite":
        rows = (await conn.execute(text(f"PRAGMA table_info({table})"))).all()
        return {row[1] for row in rows}
    query = text(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name = :table"
    )
    return {row[0] for row in (await conn.execute(query, {"table": table})).all()}


_STEPS = {1: _to_v2}
