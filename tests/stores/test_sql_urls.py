"""A SQL store URL's own parameters reach the driver as the docs say (unchanged, libpq's
to asyncpg through its DSN), win over the store's connect defaults, and never show a
password — against the machine's PostgreSQL and MariaDB."""

from __future__ import annotations

import os
import secrets
from urllib.parse import quote

import anyio
import asyncpg
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError

from keyguard.errors import ConfigurationError, StoreUnavailable
from keyguard.stores.sql import SQLStore
from tests.backends.servers import require_server
from tests.backends.sql import drop_tables, unique_prefix
from tests.helpers import expose

pytestmark = pytest.mark.anyio

BOUND = 30  # seconds: only there so that a hang fails instead of blocking the run


def with_query(backend: str, query: str, *, scheme: str | None = None) -> str:
    """The test server's URL with ``query`` (and another dialect+driver, if given)."""
    url = require_server(backend)
    if scheme is not None:
        url = scheme + url[url.index("://") :]
    return url + ("&" if "?" in url else "?") + query


async def _application_names(name: str) -> int:
    """How many connections to the shared PostgreSQL are named ``name``."""
    url = make_url(require_server("postgres"))
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name
        )
    finally:
        await conn.close()
    return count


async def test_a_libpq_parameter_reaches_asyncpg_through_its_dsn() -> None:
    """``?application_name=`` (libpq's, which asyncpg takes in a DSN only) names the store's
    connections; it used to reach asyncpg.connect as an unknown keyword, a TypeError on
    every call (a 500 at the front doors)."""
    name = f"kg-url-{os.getpid()}-{secrets.token_hex(3)}"
    store = SQLStore.from_url(
        with_query("postgres", f"application_name={name}"), table_prefix=unique_prefix()
    )
    try:
        with anyio.fail_after(BOUND):
            await expose(store)
            assert await store.lookup("orders", None) == (True, None)
            assert await _application_names(name) >= 1
    finally:
        await drop_tables(store.engine, store.table_prefix)
        await store.aclose()


async def test_a_parameter_nobody_knows_is_store_unavailable_naming_it() -> None:
    """A URL parameter neither asyncpg nor libpq knows is a server setting, as with libpq:
    the server refuses it, and every call is StoreUnavailable saying which (not a
    TypeError)."""
    store = SQLStore.from_url(
        with_query("postgres", "no_such_setting_kg=1"), table_prefix=unique_prefix()
    )
    try:
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable, match="no_such_setting_kg"):
            await store.get_api("orders")
    finally:
        await store.aclose()


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "postgresql+asyncpg"])
async def test_the_urls_options_and_application_name_are_kept(scheme: str) -> None:
    """``…?options=-csearch_path=…`` puts the tables in that schema (on psycopg the
    store's statement_timeout is added, not put instead; asyncpg sends the options as
    libpq does), and the URL's application_name wins over the store's."""
    pytest.importorskip(scheme.partition("+")[2])
    schema = f"kg_url_{secrets.token_hex(4)}"
    name = f"kg-psy-{os.getpid()}-{secrets.token_hex(3)}"
    admin = SQLStore.from_url(require_server("postgres"), table_prefix=unique_prefix())
    async with admin.engine.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    options = quote(f"-c search_path={schema}", safe="")
    url = with_query("postgres", f"options={options}&application_name={name}", scheme=scheme)
    prefix = unique_prefix()
    store = SQLStore.from_url(url, table_prefix=prefix)
    try:
        with anyio.fail_after(BOUND):
            await expose(store)
            async with admin.engine.connect() as conn:
                found = (
                    await conn.execute(
                        text(
                            "SELECT table_schema FROM information_schema.tables "
                            "WHERE table_name = :name"
                        ),
                        {"name": f"{prefix}apis"},
                    )
                ).all()
            assert [row[0] for row in found] == [schema]
            if scheme.endswith("psycopg"):
                async with store.engine.connect() as conn:
                    shown = (await conn.exec_driver_sql("SHOW statement_timeout")).scalar()
                assert shown == "3s"
            assert await _application_names(name) >= 1
    finally:
        await drop_tables(store.engine, prefix)  # wherever they went
        await store.aclose()
        async with admin.engine.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await admin.aclose()


async def test_the_urls_read_timeout_wins_on_mariadb() -> None:
    """``?read_timeout=1`` on a MariaDB/MySQL URL bounds a statement at 1 s, as asyncmy
    reads it; the store's own default (its timeout, 5 s here) used to replace it."""
    store = SQLStore.from_url(
        with_query("mysql", "read_timeout=1"), table_prefix=unique_prefix(), timeout=5
    )
    try:
        with anyio.fail_after(BOUND):
            await expose(store)
            async with store.engine.connect() as conn:
                with pytest.raises(DBAPIError):
                    await conn.exec_driver_sql("SELECT SLEEP(2.5)")
    finally:
        await drop_tables(store.engine, store.table_prefix)
        await store.aclose()


def test_a_urls_number_that_is_not_one_is_refused_at_opening() -> None:
    """A URL parameter read as a number that is not one is a ConfigurationError when the
    store is opened (it was a ValueError, or a TypeError at the first call)."""
    with pytest.raises(ConfigurationError):
        SQLStore.from_url("mysql://u@db.example/app?connect_timeout=soon")
    with pytest.raises(ConfigurationError, match="command_timeout"):
        SQLStore.from_url("postgresql://u@db.example/app?command_timeout=soon")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@db.example/keys?password=s3cr3t-pw",
        "postgresql+psycopg://app@db.example/keys?password=s3cr3t-pw&sslpassword=s3cr3t-pw",
        "postgresql://app@db.example/keys?sslpassword=s3cr3t-pw&sslmode=require",
        "mysql://app@db.example/keys?passwd=s3cr3t-pw",
        "mariadb://app@db.example/keys?password=s3cr3t-pw",
    ],
)
def test_a_password_in_the_urls_parameters_never_shows(url: str) -> None:
    """``?password=``, ``?passwd=`` and ``?sslpassword=`` (the drivers take passwords there
    too) are hidden from the store's repr, url and description, like the URL's own."""
    store = SQLStore.from_url(url)
    for shown in (repr(store), store.url, store.description):
        assert "s3cr3t-pw" not in shown
    assert "s3cr3t-pw" not in str(store._unavailable(OSError("login s3cr3t-pw refused")))
