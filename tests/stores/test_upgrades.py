"""Stores written by older keyguard (``tests/fixtures/legacy_v1``) keep working with this code.

The fixtures hold what commit 037f1ef (schema version 1, the first Redis
layout) wrote on each store, with the keys' secrets; see
``tests/fixtures/make_legacy_v1.py``. Each test loads one into its own
namespace, opens it with several stores at once (as several processes
starting together would) and checks that nothing was lost: every API with
its state and limit, every key with its name, kind and creation time, and
every key still authenticating with its secret.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from keyguard import KeyManager, KeyStore
from keyguard.errors import DuplicateName, StoreUnavailable
from keyguard.manager import Denial
from keyguard.models import KeyInfo, utcnow
from keyguard.stores.redis import RedisStore
from keyguard.stores.sql import SCHEMA_VERSION, SQLStore
from keyguard.stores.sql._upgrades import V2_KEY_COLUMNS
from keyguard.usage import UsageCount
from tests.backends.redis import delete_prefixed
from tests.backends.redis import unique_prefix as redis_prefix
from tests.backends.servers import require_server
from tests.backends.sql import drop_tables, sql_url
from tests.backends.sql import unique_prefix as sql_prefix

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_v1"
LEGACY_SQL_PREFIX = "kglegacy_"
DUMPS = {"sqlite": "sqlite.sql", "postgres": "postgresql.sql", "mysql": "mariadb.sql"}
OPENERS = 4  # stores opening the old tables at once, as processes starting together


def manifest() -> dict[str, Any]:
    """The APIs and keys (with secrets) the fixtures hold."""
    data: dict[str, Any] = json.loads((FIXTURES / "keys.json").read_text(encoding="utf-8"))
    return data


def statements(backend: str, prefix: str) -> list[str]:
    """The dump of ``backend`` as single statements, its tables renamed to ``prefix``."""
    text = (FIXTURES / DUMPS[backend]).read_text(encoding="utf-8")
    text = text.replace(LEGACY_SQL_PREFIX, prefix)
    found, current = [], []
    for line in text.splitlines():
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current).strip()
            found.append(statement.rstrip(";"))
            current = []
    assert not "".join(current).strip(), "the dump ends inside a statement"
    return [statement for statement in found if statement]


async def load_sql(engine: AsyncEngine, backend: str, prefix: str) -> None:
    """Recreate the fixture's tables and rows under ``prefix``."""
    async with engine.begin() as conn:
        for statement in statements(backend, prefix):
            await conn.exec_driver_sql(statement)


async def load_redis(url: str, prefix: str) -> None:
    """Recreate the fixture's Redis keys under ``prefix``."""
    dump = json.loads((FIXTURES / "redis.json").read_text(encoding="utf-8"))
    async with Redis.from_url(url) as client:
        for suffix, entry in dump["keys"].items():
            name = f"{prefix}{suffix}"
            if entry["type"] == "hash":
                await client.hset(name, mapping=entry["value"])
            else:
                assert entry["type"] == "zset"
                await client.zadd(name, dict(entry["value"]))


async def check_nothing_lost(store: KeyStore) -> None:
    """Every API and key of the manifest is there, and every key authenticates."""
    manager = KeyManager(store)
    expected = manifest()["apis"]
    apis = {api.name: api for api in await manager.list_apis()}
    assert sorted(apis) == sorted(api["name"] for api in expected)
    for api in expected:
        stored = apis[api["name"]]
        assert stored.exposed is api["exposed"]
        assert stored.max_keys_per_kind == api["max_keys_per_kind"]
        keys = await manager.list_keys(api["name"])
        assert [(k.client_id, k.name, k.kind.value, k.has_secret) for k in keys] == [
            (k["client_id"], k["name"], k["kind"], k["has_secret"]) for k in api["keys"]
        ]
        assert [k.created_at for k in keys] == [
            datetime.fromisoformat(k["created_at"]) for k in api["keys"]
        ]
        # Pages (issue 17) list the same keys in the same order: on Redis from a listing
        # order built on first use, on SQL from the index added in place.
        paged, after = [], None
        for _ in range(len(keys) + 1):
            listed = await manager.page_keys(api["name"], limit=2, after=after)
            paged += listed.keys
            after = listed.next
            if after is None:
                break
        assert paged == keys
        assert stored.internal_keys == sum(k["kind"] == "internal" for k in api["keys"])
        assert stored.external_keys == sum(k["kind"] == "external" for k in api["keys"])
        if not api["keys"]:
            continue
        # Un-exposed APIs answer 404 first; expose them to prove their keys work (R8).
        if not api["exposed"]:
            await manager.expose(api["name"])
        for key in api["keys"]:
            outcome = await manager.authenticate(api["name"], key["client_id"], key["secret"])
            assert isinstance(outcome, KeyInfo), (api["name"], key["name"], outcome)
            assert outcome.name == key["name"]
            if key["secret"] is not None:
                wrong = await manager.authenticate(api["name"], key["client_id"], "x" * 43)
                assert wrong is Denial.INVALID_SECRET
    # Names stay unique under casefold after the upgrade (R3): the folded index survived.
    orders = next(api for api in expected if api["name"] == "orders")
    taken = orders["keys"][-1]["name"].upper()  # "STRASSE FFI CAFÉ": same casefold
    with pytest.raises(DuplicateName):
        await manager.create_key("orders", name=taken, kind="external")
    # What later versions added beside the keys works on the upgraded store: the audit log
    # (the expose calls above were recorded) and usage (tables created on first use).
    if any(not api["exposed"] and api["keys"] for api in expected):
        page = await manager.audit()
        assert page.events
        assert {event.action for event in page.events} == {"api.expose"}
    first = orders["keys"][0]
    hour = utcnow().replace(minute=0, second=0, microsecond=0)
    await store.record_usage([UsageCount("orders", first["client_id"], hour, 3, 1, utcnow())])
    usage = await manager.usage("orders", first["client_id"], hours=1)
    assert usage["hours"][-1]["requests"] == 3
    assert usage["hours"][-1]["rate_limited"] == 1


async def check_upgraded_columns(engine: AsyncEngine, prefix: str) -> None:
    """The tables record the current schema version, and the added columns hold their
    defaults on every old row (enabled, no expiry, empty meta, nothing else set)."""
    async with engine.connect() as conn:
        version = (
            await conn.exec_driver_sql(
                f"SELECT value FROM {prefix}meta WHERE name = 'schema_version'"  # noqa: S608
            )
        ).scalar_one()
        assert version == str(SCHEMA_VERSION)
        added = "enabled, expires_at, meta, previous_secret_hash, previous_secret_expires_at, "
        added += "last_used_at, rate_limits"
        read_added = f"SELECT {added} FROM {prefix}keys"  # noqa: S608 - a test's own prefix
        rows = (await conn.exec_driver_sql(read_added)).all()
        expected_keys = sum(len(api["keys"]) for api in manifest()["apis"])
        assert [tuple(row) for row in rows] == [(1, None, "{}", None, None, None, None)] * (
            expected_keys
        )
        read_limits = f"SELECT rate_limits FROM {prefix}apis"  # noqa: S608 - a test's own prefix
        limits = (await conn.exec_driver_sql(read_limits)).all()
        assert [row[0] for row in limits] == ["[]"] * len(manifest()["apis"])
        indexes = await conn.run_sync(lambda sync: inspect(sync).get_indexes(f"{prefix}keys"))
        order = [index for index in indexes if index["name"] == f"{prefix}keys_api_order_idx"]
        assert [index["column_names"] for index in order] == [["api", "created_at", "id"]]


@dataclass
class OldTables:
    """Schema-version-1 tables (the first release's) under a fresh prefix: ``loader``
    wrote them; ``stores`` are opened on them and not used yet."""

    url: str
    prefix: str
    loader: SQLStore
    stores: list[SQLStore]

    @property
    def store(self) -> SQLStore:
        return self.stores[0]


@asynccontextmanager
async def old_tables(
    backend: str, tmp_path: Path, *, openers: int = 1, **options: Any
) -> AsyncIterator[OldTables]:
    """:class:`OldTables` on ``backend``, with ``openers`` stores of ``options``; the
    stores closed and the tables dropped afterwards."""
    url = sql_url(backend, tmp_path)
    prefix = sql_prefix()
    loader = SQLStore.from_url(url, table_prefix=prefix)
    stores = [SQLStore.from_url(url, table_prefix=prefix, **options) for _ in range(openers)]
    try:
        await load_sql(loader.engine, backend, prefix)
        yield OldTables(url, prefix, loader, stores)
    finally:
        for store in stores:
            await store.aclose()
        try:
            if backend != "sqlite":
                await drop_tables(loader.engine, prefix)
        finally:
            await loader.aclose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
async def test_sql_store_of_schema_v1_opens_with_nothing_lost(backend: str, tmp_path: Path) -> None:
    """Tables written by schema version 1 are opened by several stores at once, lose
    nothing, and every key still authenticates with its secret."""
    async with old_tables(backend, tmp_path, openers=OPENERS) as old:
        # Every store starts at once against the old tables (each its own engine and pool,
        # as separate processes would have).
        apis = await asyncio.gather(*(old.store.list_apis() for store in old.stores))
        assert all(len(found) == len(manifest()["apis"]) for found in apis)
        await check_upgraded_columns(old.loader.engine, old.prefix)
        await check_nothing_lost(old.store)  # it changes state (expose): once is enough


async def test_redis_store_of_first_layout_opens_with_nothing_lost() -> None:
    """Redis data written by the first layout is opened by several stores at once, loses
    nothing, and every key still authenticates with its secret."""
    url = require_server("redis")
    prefix = redis_prefix()
    stores = [RedisStore.from_url(url, prefix=prefix) for _ in range(OPENERS)]
    try:
        await load_redis(url, prefix)
        apis = await asyncio.gather(*(store.list_apis() for store in stores))
        assert all(len(found) == len(manifest()["apis"]) for found in apis)
        await check_nothing_lost(stores[0])
    finally:
        for store in stores:
            await store.aclose()
        await delete_prefixed(url, prefix)


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
def test_sql_fixture_names_only_its_own_tables(backend: str) -> None:
    """Each SQL dump touches only the fixture's prefixed tables, so a test's prefix confines it."""
    renamed = statements(backend, "kgt_check_")
    assert renamed
    assert all(LEGACY_SQL_PREFIX not in statement for statement in renamed)
    assert any("schema_version" in statement for statement in renamed)


async def table_names(engine: AsyncEngine, prefix: str) -> list[str]:
    """The tables of ``prefix`` and the indexes of its keys table, as the database has them."""

    def read(sync: Any) -> list[str]:
        found = inspect(sync)
        tables = sorted(name for name in found.get_table_names() if name.startswith(prefix))
        indexes = sorted(str(index["name"]) for index in found.get_indexes(f"{prefix}keys"))
        return tables + indexes

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def set_version(engine: AsyncEngine, prefix: str, value: str) -> None:
    """Record ``value`` as the schema version of the tables of ``prefix``."""
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            f"UPDATE {prefix}meta SET value = '{value}' WHERE name = 'schema_version'"  # noqa: S608
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
async def test_sql_store_newer_than_the_code_is_refused_untouched(
    backend: str, tmp_path: Path
) -> None:
    """Tables a later keyguard wrote are refused (saying to upgrade keyguard) before this
    code creates anything in them: no table or index of its own is added to them."""
    async with old_tables(backend, tmp_path) as old:
        await set_version(old.loader.engine, old.prefix, str(SCHEMA_VERSION + 1))
        before = await table_names(old.loader.engine, old.prefix)
        assert f"{old.prefix}keys_api_order_idx" not in before  # what this code would add
        for _ in range(2):
            with pytest.raises(StoreUnavailable, match=r"newer than this keyguard.*upgrade"):
                await old.store.list_apis()
        assert await table_names(old.loader.engine, old.prefix) == before


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
@pytest.mark.parametrize("value", ["abc", "0", "", "-1", "2.0"])
async def test_sql_store_with_an_unreadable_version_says_so(
    backend: str, value: str, tmp_path: Path
) -> None:
    """A schema version no keyguard writes (the row edited by hand) is a StoreUnavailable
    that names it, never a ValueError or KeyError out of the store (a 500, a traceback)."""
    async with old_tables(backend, tmp_path) as old:
        await set_version(old.loader.engine, old.prefix, value)
        with pytest.raises(StoreUnavailable, match=r"schema version .*no keyguard writes"):
            await old.store.get_api("orders")


@asynccontextmanager
async def tables_held(backend: str, url: str, prefix: str) -> AsyncIterator[None]:
    """The old tables held as another process's long transaction would hold them, so that
    upgrading them must wait: SQLite's write lock (``BEGIN IMMEDIATE``); on the servers a
    transaction that read the APIs table (its lock, or metadata lock, keeps ``ALTER TABLE``
    waiting). Released on the way out."""
    if backend == "sqlite":
        holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
        finally:
            holder.rollback()
            holder.close()
        return
    engine = SQLStore.from_url(url, table_prefix=prefix).engine
    try:
        async with engine.connect() as conn:
            await conn.begin()
            await conn.exec_driver_sql(f"SELECT count(*) FROM {prefix}apis")  # noqa: S608
            yield
            await conn.rollback()
    finally:
        await engine.dispose()


async def recorded_version(engine: AsyncEngine, prefix: str) -> str:
    """The schema version the tables of ``prefix`` record, read beside any store."""
    async with engine.connect() as conn:
        read = f"SELECT value FROM {prefix}meta WHERE name = 'schema_version'"  # noqa: S608
        return str((await conn.exec_driver_sql(read)).scalar_one())


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
async def test_sql_upgrade_longer_than_the_timeout_is_not_cut(backend: str, tmp_path: Path) -> None:
    """An upgrade that takes longer than the store's timeout (here: it must wait for
    another transaction; in life also an index built over millions of keys) goes on after
    the call that started it has answered StoreUnavailable, and finishes: cut at each
    call's deadline, it would start over on every call and never be done."""
    async with old_tables(backend, tmp_path, timeout=0.5) as old:
        async with tables_held(backend, old.url, old.prefix):
            # Held past the lock waits the step is allowed on the servers (timeout, in
            # whole seconds on MariaDB): it must try again, on a sound connection.
            for _ in range(3):
                with (
                    anyio.fail_after(10),
                    pytest.raises(StoreUnavailable, match="being created or upgraded"),
                ):
                    await old.store.list_apis()
            assert await recorded_version(old.loader.engine, old.prefix) == "1"
        # No store call from here on: the upgrade started above finishes by itself.
        for _ in range(400):
            if await recorded_version(old.loader.engine, old.prefix) == str(SCHEMA_VERSION):
                break
            await asyncio.sleep(0.05)
        assert await recorded_version(old.loader.engine, old.prefix) == str(SCHEMA_VERSION)
        await check_upgraded_columns(old.loader.engine, old.prefix)
        # Read back under the default timeout: the check's many calls (a first tag key among
        # them) are not what the 0.5 s was for, and can outlast it on a loaded machine.
        await check_nothing_lost(old.loader)


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
async def test_sql_upgrade_cut_half_way_resumes(backend: str, tmp_path: Path) -> None:
    """Tables left half-upgraded (on MariaDB, whose DDL commits statement by statement, a
    step cut between two ``ALTER TABLE``: some version-2 columns there, the version still
    1) are upgraded the rest of the way, losing nothing."""
    dialect = {"sqlite": "sqlite", "postgres": "postgresql", "mysql": "mysql"}[backend]
    async with old_tables(backend, tmp_path) as old:
        async with old.loader.engine.begin() as conn:
            for column in ("enabled", "expires_at", "meta"):
                added = V2_KEY_COLUMNS[column][dialect]
                await conn.exec_driver_sql(
                    f"ALTER TABLE {old.prefix}keys ADD COLUMN {column} {added}"
                )
        assert await recorded_version(old.loader.engine, old.prefix) == "1"
        assert len(await old.store.list_apis()) == len(manifest()["apis"])
        await check_upgraded_columns(old.loader.engine, old.prefix)
        await check_nothing_lost(old.store)
