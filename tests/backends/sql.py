"""How the suite opens SQL stores: SQLite in a temporary file, PostgreSQL and MariaDB on
the real servers of this machine.

Tests share the servers and may run in parallel, so each test's store gets its
own random table prefix, and its tables are dropped afterwards.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from keyguard.stores.sql import SQLStore
from tests.backends.servers import require_server

SQL_BACKENDS = ("sqlite", "postgres", "mysql")
TABLES = ("audit", "usage", "keys", "apis", "meta")  # drops the referencing table first


def unique_prefix() -> str:
    """A table prefix no other test uses."""
    return f"kgt_{secrets.token_hex(5)}_"


def sql_url(backend: str, tmp_path: Path) -> str:
    """The URL of ``backend``: a fresh SQLite file, or a server (skipped/failed if down)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    if backend in ("postgres", "mysql"):
        return require_server(backend)
    raise ValueError(f"not a SQL backend: {backend!r}")


async def drop_tables(engine: AsyncEngine, prefix: str) -> None:
    """Drop the tables a store with ``prefix`` created, if they exist."""
    async with engine.begin() as conn:
        for table in TABLES:
            await conn.exec_driver_sql(f"DROP TABLE IF EXISTS {prefix}{table}")


@asynccontextmanager
async def open_sql_test_store(
    backend: str, tmp_path: Path, **options: Any
) -> AsyncIterator[SQLStore]:
    """An empty SQL store of kind ``backend``; its tables are dropped afterwards."""
    url = sql_url(backend, tmp_path)
    prefix = unique_prefix()
    store = SQLStore.from_url(url, table_prefix=prefix, **options)
    try:
        yield store
    finally:
        try:
            if backend != "sqlite":  # the file goes with tmp_path
                await drop_tables(store.engine, prefix)
        finally:
            await store.aclose()


@asynccontextmanager
async def same_tables(store: SQLStore, **options: Any) -> AsyncIterator[SQLStore]:
    """A second store object over ``store``'s database and tables, with ``options`` (a
    tight ``timeout``), closed afterwards.

    For tests of a short timeout: their set-up (creating the tables, the first keys) goes
    through ``store`` under the default timeout, since creating tables can take longer
    than half a second on a loaded machine (two test workers, other runs), and only what
    the test is about runs under the tight one.
    """
    url = store.engine.url.render_as_string(hide_password=False)
    other = SQLStore.from_url(url, table_prefix=store.table_prefix, **options)
    try:
        yield other
    finally:
        await other.aclose()
