"""What only the SQL store promises, beyond the contract suite: URLs and drivers, the
schema, atomicity across processes, and clean failures against real servers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import (
    MetaData,
    Table,
    column,
    event,
    func,
    insert,
    make_url,
    select,
    table,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from keyguard import KeyStore, open_store
from keyguard.errors import ConfigurationError, DuplicateName, KeyLimitReached, StoreUnavailable
from keyguard.models import (
    MAX_META_BYTES,
    KeyChanges,
    KeyRecord,
    RateLimit,
    dump_meta,
    parse_meta,
    utcnow,
)
from keyguard.secrets import new_client_id
from keyguard.stores.sql import SCHEMA_VERSION, SQLStore
from tests.backends.servers import require_server
from tests.backends.sql import (
    SQL_BACKENDS,
    drop_tables,
    open_sql_test_store,
    same_tables,
    unique_prefix,
)
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio

SERVERS = ("postgres", "mysql")
BOUND = 30  # seconds: generous, only there so that a hang fails instead of blocking the run
ROOT = Path(__file__).resolve().parents[2]


def server_url(backend: str, **changes: Any) -> str:
    """The test server's URL with some parts (port, password, database) changed."""
    url = make_url(require_server(backend)).set(**changes)
    return url.render_as_string(hide_password=False)


def free_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A local port whose server accepts connections and never says a word."""
    connections: list[tuple[asyncio.Task[Any], asyncio.StreamWriter]] = []
    idle = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.append((task, writer))
        await idle.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        idle.set()
        await asyncio.gather(*(task for task, _ in connections))
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def side_engine(store: SQLStore) -> AsyncIterator[AsyncEngine]:
    """A second engine on the store's database, playing another process or an operator."""
    engine = create_async_engine(store.engine.url)
    try:
        yield engine
    finally:
        await engine.dispose()


@contextmanager
def counting_statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The SQL statements ``engine`` sends while the block runs."""
    sent: list[str] = []

    def listener(*args: Any) -> None:
        sent.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", listener)


# -- URLs, drivers, options (no I/O) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "drivername"),
    [
        ("sqlite:///keys.db", "sqlite+aiosqlite"),
        ("postgresql://u@db.example/app", "postgresql+asyncpg"),
        ("postgres://u@db.example/app", "postgresql+asyncpg"),
        ("mysql://u@db.example/app", "mysql+asyncmy"),
        ("mariadb://u@db.example/app", "mariadb+asyncmy"),
        ("postgresql+asyncpg://u@db.example/app", "postgresql+asyncpg"),
        ("mysql+asyncmy://u@db.example/app", "mysql+asyncmy"),
        ("sqlite+aiosqlite:///keys.db", "sqlite+aiosqlite"),
    ],
)
def test_url_chooses_an_async_driver(
    url: str, drivername: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each scheme maps to its async driver, and a URL naming its driver keeps it."""
    monkeypatch.chdir(tmp_path)
    store = open_store(url, cache_ttl=None)
    assert isinstance(store, SQLStore)
    assert store.engine.url.drivername == drivername


def test_sqlite_paths_relative_and_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///rel.db is relative to the current folder at opening; sqlite:////abs.db is
    absolute."""
    monkeypatch.chdir(tmp_path)
    relative = SQLStore.from_url("sqlite:///rel.db")
    absolute = SQLStore.from_url(f"sqlite:///{tmp_path / 'sub' / 'abs.db'}")
    assert relative.engine.url.database == str(tmp_path / "rel.db")
    assert absolute.engine.url.database == str(tmp_path / "sub" / "abs.db")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url: str) -> None:
    """An in-memory SQLite database is refused with a pointer to memory://."""
    with pytest.raises(ConfigurationError, match="memory://"):
        SQLStore.from_url(url)


@pytest.mark.parametrize(
    ("module", "url", "extra"),
    [
        ("asyncpg", "postgresql://u@db.example/app", "keyguard[postgres]"),
        ("asyncpg", "postgres://u@db.example/app", "keyguard[postgres]"),
        ("asyncmy", "mysql://u@db.example/app", "keyguard[mysql]"),
        ("asyncmy", "mariadb://u@db.example/app", "keyguard[mysql]"),
        ("psycopg", "postgresql+psycopg://u@db.example/app", "psycopg"),
    ],
)
def test_missing_driver_names_the_extra(
    module: str, url: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without its driver, a URL fails at once with the pip command that installs it."""
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigurationError, match=r"pip install .*" + extra.replace("[", r"\[")):
        open_store(url)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("postgresql+nodriver://u@h/db", {}, "unknown SQL driver"),
        ("sqlite+pysqlite:///keys.db", {}, "not an async driver"),
        ("sqlite:///keys.db", {"table_prefix": "Bad-Prefix"}, "table_prefix"),
        ("sqlite:///keys.db", {"table_prefix": ""}, "table_prefix"),
        ("sqlite:///keys.db", {"timeout": 0}, "timeout"),
        ("sqlite:///keys.db", {"timeout": float("nan")}, "timeout"),
        ("sqlite:///keys.db", {"no_such_option": 1}, "option"),
    ],
)
def test_bad_configuration_is_refused(
    url: str, options: dict[str, Any], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong driver, prefix, timeout or engine option is a ConfigurationError at opening."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=message):
        SQLStore.from_url(url, **options)


def test_repr_and_errors_mask_the_password() -> None:
    """The password never shows in the store's repr."""
    store = SQLStore.from_url("postgresql://app:s3cr3t-pw@db.example/keys")
    assert "s3cr3t-pw" not in repr(store)
    assert "app:***@db.example" in repr(store)


def test_sql_store_is_a_key_store() -> None:
    """SQLStore satisfies the KeyStore protocol."""
    assert isinstance(SQLStore.from_url("postgresql://u@db.example/app"), KeyStore)


def test_opened_outside_a_loop_and_used_in_two_loops(tmp_path: Path) -> None:
    """A store opened with no event loop connects in the loop that uses it, and again in a
    later loop."""
    store = SQLStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}")

    async def first() -> None:
        await expose(store)

    async def second() -> bool:
        try:
            exposed, _ = await store.lookup("orders", None)
        finally:
            await store.aclose()
        return exposed

    anyio.run(first)
    assert anyio.run(second) is True


# -- the schema ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_schema_creation_is_concurrent_safe_and_versioned(
    backend: str, tmp_path: Path
) -> None:
    """Stores starting at once on empty tables all succeed, and one schema version is recorded."""
    async with open_sql_test_store(backend, tmp_path) as first:
        prefix = first.table_prefix
        url = first.engine.url
        others = [SQLStore(create_async_engine(url), table_prefix=prefix) for _ in range(5)]
        try:
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    for store in [first, *others]:
                        tg.start_soon(expose, store)
            async with first.engine.connect() as conn:
                meta = table(f"{prefix}meta", column("name"), column("value"))
                rows = (await conn.execute(select(meta.c.name, meta.c.value))).all()
            assert [tuple(row) for row in rows] == [("schema_version", str(SCHEMA_VERSION))]
            # A later start finds the tables and keeps their data.
            await first.insert_key(record())
            later = SQLStore(create_async_engine(url), table_prefix=prefix)
            others.append(later)
            assert len(await later.list_keys("orders")) == 1
        finally:
            for store in others:
                await store.engine.dispose()


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_newer_schema_version_is_refused(backend: str, tmp_path: Path) -> None:
    """Tables written by a newer keyguard make the store unavailable, saying to upgrade."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        async with store.engine.begin() as conn:
            await conn.execute(
                update(table(f"{store.table_prefix}meta", column("value"))), {"value": "99"}
            )
        newer = SQLStore(create_async_engine(store.engine.url), table_prefix=store.table_prefix)
        try:
            with pytest.raises(StoreUnavailable, match="upgrade keyguard"):
                await newer.get_api("orders")
        finally:
            await newer.engine.dispose()


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_database_constraint_stops_a_duplicate_name(backend: str, tmp_path: Path) -> None:
    """A row whose casefolded name repeats one of its API, written straight to the table
    past every check of the store, is refused by the database itself."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        await store.insert_key(record(name="Straße"))
        async with store.engine.connect() as conn:
            keys = await conn.run_sync(
                lambda sync: Table(f"{store.table_prefix}keys", MetaData(), autoload_with=sync)
            )
            moment = utcnow()
            if conn.dialect.name != "postgresql":
                moment = moment.replace(tzinfo=None)
            row = {
                "client_id": new_client_id(),
                "api": "orders",
                "name": "STRASSE",
                "name_key": "strasse",
                "kind": "external",
                "created_at": moment,
            }
            with pytest.raises(IntegrityError):
                await conn.execute(insert(keys).values(row))
            await conn.rollback()
        assert [key.name for key in await store.list_keys("orders")] == ["Straße"]


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_lookup_is_one_statement(backend: str, tmp_path: Path) -> None:
    """The request path's lookup sends exactly one SQL statement, key or no key."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        for client_id in (rec.client_id, None, new_client_id()):
            with counting_statements(store.engine) as sent:
                await store.lookup("orders", client_id)
            assert len(sent) == 1, sent


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_values_that_cannot_be_stored_match_nothing(backend: str, tmp_path: Path) -> None:
    """Ids and names no key could have (NUL, lone surrogates, too long) find nothing, without
    an error."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        for odd in ("a\x00b", "\ud800", "x" * 65):
            assert await store.lookup("orders", odd) == (True, None)
            assert await store.get_key("orders", odd) is None
            assert await store.set_secret_hash("orders", odd, "h") is None
            assert await store.delete_key("orders", odd) is False
            assert await store.get_api(odd) is None
            assert await store.list_keys(odd) == []


# -- engines ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_passed_in_engine_is_used_and_left_open(backend: str, tmp_path: Path) -> None:
    """A store over an app's own AsyncEngine works, and its aclose leaves the engine usable."""
    async with open_sql_test_store(backend, tmp_path) as opened:
        url = opened.engine.url
    engine = create_async_engine(url)
    prefix = unique_prefix()
    try:
        store = SQLStore(engine, table_prefix=prefix)
        await expose(store)
        await store.insert_key(record())
        await store.aclose()
        async with engine.connect() as conn:
            keys = table(f"{prefix}keys")
            count = (await conn.execute(select(func.count()).select_from(keys))).scalar()
        assert count == 1
    finally:
        await drop_tables(engine, prefix)
        await engine.dispose()


@pytest.mark.parametrize(
    ("backend", "scheme"),
    [("postgres", "postgresql+asyncpg"), ("mysql", "mysql+asyncmy"), ("mysql", "mariadb")],
)
async def test_explicit_driver_urls_work(backend: str, scheme: str, tmp_path: Path) -> None:
    """A URL naming its dialect and driver reaches the same server and keeps R6 exact."""
    url = require_server(backend)
    explicit = scheme + url[url.index("://") :]
    store = SQLStore.from_url(explicit, table_prefix=unique_prefix())
    try:
        assert store.engine.url.drivername.startswith(scheme)
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        assert await store.get_key("orders", rec.client_id) == rec
        assert await store.get_key("orders", rec.client_id.upper()) is None
    finally:
        await drop_tables(store.engine, store.table_prefix)
        await store.aclose()


async def test_engine_options_reach_sqlalchemy(tmp_path: Path) -> None:
    """Extra keywords reach create_async_engine: a NullPool engine is built, and it works."""
    store = SQLStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}", poolclass=NullPool)
    try:
        assert isinstance(store.engine.pool, NullPool)
        await expose(store)
        assert await store.lookup("orders", None) == (True, None)
    finally:
        await store.aclose()


async def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    """After aclose, a call fails with StoreUnavailable instead of reconnecting."""
    async with open_sql_test_store("sqlite", tmp_path) as store:
        await expose(store)
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get_api("orders")


# -- atomicity across processes -------------------------------------------------------------

RACER = r"""
import asyncio, json, sys
from keyguard.errors import KeyLimitReached
from keyguard.models import KeyKind, KeyRecord, utcnow
from keyguard.secrets import new_client_id
from keyguard.stores.sql import SQLStore

async def main(url, prefix, worker):
    store = SQLStore.from_url(url, table_prefix=prefix, timeout=20)
    print("ready", flush=True)
    sys.stdin.readline()  # every racer starts together
    accepted = refused = 0
    try:
        await store.upsert_api(
            "race", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        for i in range(6):
            for kind in KeyKind:
                record = KeyRecord(
                    api="race", client_id=new_client_id(), name=f"{worker} {kind.value} {i}",
                    kind=kind, secret_hash="h" if kind is KeyKind.INTERNAL else None,
                    created_at=utcnow(),
                )
                try:
                    await store.insert_key(record)
                except KeyLimitReached:
                    refused += 1
                else:
                    accepted += 1
    finally:
        await store.aclose()
    print(json.dumps([accepted, refused]), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
"""


def race(url: str, prefix: str, processes: int) -> list[tuple[int, int]]:
    """Start ``processes`` fresh interpreters, release them at once, return each one's
    (accepted, refused)."""
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, url, prefix, f"p{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for n in range(processes)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline().strip() == "ready"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        results = []
        for racer in racers:
            out, err = racer.communicate(timeout=BOUND)
            assert racer.returncode == 0, err
            accepted, refused = json.loads(out)
            results.append((accepted, refused))
        return results
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_four_processes_race_for_the_limit(backend: str, tmp_path: Path) -> None:
    """Four processes starting at once on empty tables, each trying six keys of each kind for
    one API, end with exactly five keys per kind (R2 across processes)."""
    async with open_sql_test_store(backend, tmp_path) as store:
        url = store.engine.url.render_as_string(hide_password=False)
        results = await anyio.to_thread.run_sync(race, url, store.table_prefix, 4)
        assert sum(accepted for accepted, _ in results) == 10, results
        assert sum(refused for _, refused in results) == 4 * 12 - 10, results
        api = await store.get_api("race")
        assert api is not None
        assert (api.internal_keys, api.external_keys) == (5, 5)
        kinds = sorted(key.kind.value for key in await store.list_keys("race"))
        assert kinds == ["external"] * 5 + ["internal"] * 5


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SERVERS)
async def test_closed_port_gives_store_unavailable(backend: str) -> None:
    """A server that is not running gives StoreUnavailable, with the driver's error chained."""
    store = SQLStore.from_url(server_url(backend, port=free_port()), timeout=1)
    try:
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable) as caught:
            await store.get_api("orders")
        assert caught.value.__cause__ is not None
    finally:
        await store.aclose()


async def test_sqlite_file_that_is_not_a_database_gives_store_unavailable(
    tmp_path: Path,
) -> None:
    """A SQLite path holding something else than a database gives StoreUnavailable, chained to
    the driver's error."""
    path = tmp_path / "keys.db"
    path.write_bytes(b"not a database, " * 512)
    store = SQLStore.from_url(f"sqlite:///{path}")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.lookup("orders", None)
        assert isinstance(caught.value.__cause__, Exception)
    finally:
        await store.aclose()


@pytest.mark.parametrize("backend", SERVERS)
async def test_silent_server_gives_store_unavailable(backend: str) -> None:
    """A server that accepts connections but never answers gives StoreUnavailable, not a hang."""
    async with silent_server() as port:
        store = SQLStore.from_url(server_url(backend, port=port), timeout=0.5)
        try:
            with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable):
                await store.lookup("orders", None)
        finally:
            await store.aclose()


async def test_whole_call_is_bounded_even_on_a_passed_in_engine() -> None:
    """Over an engine without timeouts of its own, a call still gives up, with StoreUnavailable."""
    require_server("postgres")
    async with silent_server() as port:
        url = server_url("postgres", drivername="postgresql+asyncpg", port=port)
        engine = create_async_engine(url, connect_args={"timeout": 600})
        store = SQLStore(engine, timeout=0.25)
        try:
            with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable):
                await store.get_api("orders")
        finally:
            await engine.dispose()


@pytest.mark.parametrize(
    ("backend", "changes"),
    [
        ("mysql", {"password": "wr0ng-passw0rd"}),
        ("postgres", {"username": "kg_no_such_role", "password": "wr0ng-passw0rd"}),
        ("mysql", {"database": "kg_no_such_database"}),
        ("postgres", {"database": "kg_no_such_database"}),
    ],
)
async def test_refused_login_gives_store_unavailable(backend: str, changes: dict[str, str]) -> None:
    """A wrong password, unknown user or missing database gives StoreUnavailable, whose message
    never shows the password."""
    store = SQLStore.from_url(server_url(backend, **changes), timeout=2)
    try:
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable) as caught:
            await store.list_apis()
        assert "wr0ng-passw0rd" not in str(caught.value)
        assert "wr0ng-passw0rd" not in repr(store)
    finally:
        await store.aclose()


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_exhausted_pool_gives_store_unavailable(backend: str, tmp_path: Path) -> None:
    """When every pooled connection stays busy past the timeout, a call gives StoreUnavailable;
    once one is free, calls work again. (The timeout bounds the whole call, first connection
    and schema creation included, so it is not made tiny: the machine may be loaded.)"""
    async with open_sql_test_store(
        backend, tmp_path, timeout=1.5, pool_size=1, max_overflow=0
    ) as store:
        await expose(store)
        async with store.engine.connect():
            with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable):
                await store.get_api("orders")
        assert await store.get_api("orders") is not None


@asynccontextmanager
async def write_lock_held(backend: str, store: SQLStore) -> AsyncIterator[None]:
    """Another transaction holds what a key's insert must lock (SQLite: the database's
    write lock; the servers: the API's row), released when the block ends."""
    if backend == "sqlite":
        database = store.engine.url.database
        assert database is not None
        holder = sqlite3.connect(database, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # the database's write lock
            yield
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        return
    apis = table(f"{store.table_prefix}apis", column("name"))
    async with side_engine(store) as other, other.connect() as conn:
        await conn.execute(select(column("name")).select_from(apis).with_for_update())
        yield
        await conn.rollback()


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_lock_wait_gives_store_unavailable_then_recovers(
    backend: str, tmp_path: Path
) -> None:
    """A write stuck behind another transaction's lock gives StoreUnavailable within the
    timeout, and succeeds once the lock is gone."""
    async with (
        open_sql_test_store(backend, tmp_path) as owner,
        same_tables(owner, timeout=0.5) as store,
    ):
        await expose(owner)
        assert await store.get_api("orders") is not None  # tables known: only the write waits
        async with write_lock_held(backend, store):
            with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable):
                await store.insert_key(record())
        await store.insert_key(record())
        assert len(await store.list_keys("orders")) == 1


async def test_a_connection_cut_on_its_first_call_is_not_pooled_again(tmp_path: Path) -> None:
    """A call that fails cuts its connection; one cut on its very first call, after its
    transaction was rolled back (an error the server reported), used to go back to the
    pool as if sound, and the next call drawing it failed with StoreUnavailable
    ("connection is closed": not retried, since that connection had never served). The
    cut connection is discarded: the next call connects anew."""
    async with (
        open_sql_test_store("postgres", tmp_path) as owner,
        same_tables(owner, pool_size=1, max_overflow=0) as store,
    ):
        await expose(owner)
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable, match="0x00"):
            await store.list_audit(before="\x00")  # PostgreSQL refuses a NUL in text
        with anyio.fail_after(BOUND):
            found = await store.get_api("orders")
        assert found is not None
        assert found.exposed


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_a_write_cancelled_while_it_waits_for_a_lock_is_cancelled(
    backend: str, tmp_path: Path
) -> None:
    """A caller's cancellation of a write waiting behind another transaction's lock ends it
    with CancelledError, not as an outage (on SQLite the restore of the lock wait used to
    fail on the cut statement and replace it: StoreUnavailable), and the store works once
    the lock is gone, with the usual lock wait for the next writer."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        async with write_lock_held(backend, store):
            task = asyncio.ensure_future(store.insert_key(record()))
            await asyncio.sleep(0.3)  # waiting for the lock by now (timeout: 3 s)
            assert not task.done()
            task.cancel()
            with anyio.fail_after(BOUND), pytest.raises(asyncio.CancelledError):
                await task
        with anyio.fail_after(BOUND):
            await store.insert_key(record())
        assert len(await store.list_keys("orders")) == 1


@pytest.mark.parametrize("backend", SERVERS)
async def test_recovers_after_its_connection_is_killed(backend: str, tmp_path: Path) -> None:
    """When the server kills the store's pooled connection, the next call still succeeds."""
    async with open_sql_test_store(backend, tmp_path, pool_size=1, max_overflow=0) as store:
        await expose(store)
        which = "SELECT pg_backend_pid()" if backend == "postgres" else "SELECT CONNECTION_ID()"
        async with store.engine.connect() as conn:
            victim = (await conn.execute(text(which))).scalar_one()
        kill = (
            f"SELECT pg_terminate_backend({int(victim)})"
            if backend == "postgres"
            else f"KILL {int(victim)}"
        )
        async with side_engine(store) as other, other.begin() as conn:
            await conn.execute(text(kill))
        with anyio.fail_after(BOUND):
            api = await store.get_api("orders")
            await store.insert_key(record())
        assert api is not None
        assert api.exposed is True
        async with store.engine.connect() as conn:
            assert (await conn.execute(text(which))).scalar_one() != victim


async def test_key_limit_still_reported_as_a_rule(tmp_path: Path) -> None:
    """Rule errors pass through the failure handling unchanged (not StoreUnavailable)."""
    async with open_sql_test_store("sqlite", tmp_path) as store:
        await store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=0, default_max_keys_per_kind=5
        )
        with pytest.raises(KeyLimitReached):
            await store.insert_key(record())


async def test_an_engine_that_shows_parameters_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An app's engine that would quote statement parameters (secret hashes) in its errors
    gets a warning; one created with hide_parameters=True does not."""
    from sqlalchemy.ext.asyncio import create_async_engine

    for hide, warned in ((False, True), (True, False)):
        caplog.clear()
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", hide_parameters=hide
        )
        try:
            SQLStore(engine)
        finally:
            await engine.dispose()
        assert any("hide_parameters" in r.getMessage() for r in caplog.records) is warned


# -- the lifecycle columns (issue 14) ----------------------------------------------------------

# Non-ASCII of every width UTF-8 has (2, 3 and 4 bytes: the last needs utf8mb4 on MariaDB).
ODD_TEXT = "Straße ﬃ café 東京 𝄞 🔑"


def meta_of_exactly(size: int) -> Mapping[str, Any]:
    """A non-ASCII meta whose compact UTF-8 JSON is exactly ``size`` bytes."""
    base = {"text": ODD_TEXT, "pad": ""}
    missing = size - len(dump_meta(base).encode("utf-8"))
    meta = parse_meta({"text": ODD_TEXT, "pad": "x" * missing})
    assert len(dump_meta(meta).encode("utf-8")) == size
    return meta


async def raw_columns(store: SQLStore, client_id: str, *names: str) -> tuple[Any, ...]:
    """The raw values of the key's columns ``names``, read past the store."""
    keys = table(
        f"{store.table_prefix}keys", *(column(name) for name in names), column("client_id")
    )
    async with side_engine(store) as other, other.connect() as conn:
        row = (
            await conn.execute(
                select(*(keys.c[name] for name in names)).where(keys.c.client_id == client_id)
            )
        ).one()
    return tuple(row)


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_non_ascii_meta_of_the_full_size_round_trips(backend: str, tmp_path: Path) -> None:
    """A meta of non-ASCII text (astral characters included) and of exactly 4,096 bytes is
    stored as its compact UTF-8 JSON, unescaped, and reads back equal, at insertion and on
    update."""
    small = parse_meta({"name": ODD_TEXT, "nested": {"ü": [ODD_TEXT, 1, None, True]}})
    full = meta_of_exactly(MAX_META_BYTES)
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        for first, second in ((small, full), (full, small)):
            rec = dataclasses.replace(record(name=f"first {len(dump_meta(first))}"), meta=first)
            await store.insert_key(rec)
            got = await store.get_key("orders", rec.client_id)
            assert got is not None
            assert got.meta == first
            assert await raw_columns(store, rec.client_id, "meta") == (dump_meta(first),)
            updated = await store.update_key("orders", rec.client_id, KeyChanges(meta=second))
            assert updated is not None
            assert updated.meta == second
            assert await store.get_key("orders", rec.client_id) == updated
            assert await raw_columns(store, rec.client_id, "meta") == (dump_meta(second),)
        listed = {key.client_id: key.meta for key in await store.list_keys("orders")}
        assert sorted(map(dump_meta, listed.values())) == sorted(
            [dump_meta(small), dump_meta(full)]
        )


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_inherited_and_unlimited_rate_limits_are_kept_apart(
    backend: str, tmp_path: Path
) -> None:
    """A key's rate_limits None (inherit the API's) is stored as NULL and () (unlimited) as
    '[]', each reading back as it was, through insertion, update and listing; an API's are
    '[]' until set, and upsert_api without rate_limits leaves them."""
    async with open_sql_test_store(backend, tmp_path) as store:
        api = await expose(store)
        assert api.rate_limits == ()
        inherit = record(name="inherit")
        unlimited = dataclasses.replace(record(name="unlimited", offset=1), rate_limits=())
        for rec in (inherit, unlimited):
            await store.insert_key(rec)
        assert await raw_columns(store, inherit.client_id, "rate_limits") == (None,)
        assert await raw_columns(store, unlimited.client_id, "rate_limits") == ("[]",)
        listed = await store.list_keys("orders")
        assert [key.rate_limits for key in listed] == [None, ()]
        # Swap them by update.
        await store.update_key("orders", inherit.client_id, KeyChanges(rate_limits=()))
        await store.update_key("orders", unlimited.client_id, KeyChanges(rate_limits=None))
        assert await raw_columns(store, inherit.client_id, "rate_limits") == ("[]",)
        assert await raw_columns(store, unlimited.client_id, "rate_limits") == (None,)
        exposed, found = await store.lookup("orders", unlimited.client_id)
        assert exposed is True
        assert found is not None
        assert found.rate_limits is None
        # The API's own list.
        limits = (RateLimit(5, "second"), RateLimit(1000, "day"))
        api = await store.upsert_api(
            "orders",
            exposed=None,
            max_keys_per_kind=None,
            default_max_keys_per_kind=5,
            rate_limits=limits,
        )
        assert api.rate_limits == limits
        api = await store.upsert_api(
            "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        assert api.rate_limits == limits
        assert [found.rate_limits for found in await store.list_apis()] == [limits]
        cleared = await store.upsert_api(
            "orders",
            exposed=None,
            max_keys_per_kind=None,
            default_max_keys_per_kind=5,
            rate_limits=(),
        )
        assert cleared.rate_limits == ()
        apis = table(f"{store.table_prefix}apis", column("rate_limits"))
        async with side_engine(store) as other, other.connect() as conn:
            assert (await conn.execute(select(apis.c.rate_limits))).scalar_one() == "[]"


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_update_and_roll_are_one_update_each(backend: str, tmp_path: Path) -> None:
    """update_key sends one UPDATE naming only the columns it changes, and a roll one UPDATE;
    each reads the key back afterwards."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        rec = record(secret_hash="h0")
        await store.insert_key(rec)
        with counting_statements(store.engine) as sent:
            changed = await store.update_key(
                "orders", rec.client_id, KeyChanges(enabled=False, name="Renamed")
            )
        assert changed is not None
        assert (changed.enabled, changed.name) == (False, "Renamed")
        updates = [s for s in sent if s.lstrip().upper().startswith("UPDATE")]
        assert len(updates) == 1, sent
        assignments = updates[0].upper().split(" SET ", 1)[1].split(" WHERE ", 1)[0]
        assert sorted(part.split("=")[0].strip() for part in assignments.split(",")) == [
            "ENABLED",
            "NAME",
            "NAME_KEY",
        ]
        until = utcnow() + timedelta(hours=1)
        with counting_statements(store.engine) as sent:
            rolled = await store.set_secret_hash(
                "orders", rec.client_id, "h1", previous_until=until
            )
        assert rolled is not None
        assert (rolled.secret_hash, rolled.previous_secret_hash) == ("h1", "h0")
        assert rolled.previous_secret_expires_at == until
        assert len([s for s in sent if s.lstrip().upper().startswith("UPDATE")]) == 1, sent


async def lock_waiters(conn: AsyncConnection, backend: str, prefix: str) -> int:
    """How many statements on ``prefix``'s keys table the server holds, waiting for a lock.

    PostgreSQL tells lock waits apart; MariaDB lists them only as statements in flight,
    which while the test holds the rows' lock are the ones waiting for it.
    """
    if backend == "postgres":
        query = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND query LIKE :pattern"
        )
    else:
        query = text(
            "SELECT count(*) FROM information_schema.processlist "
            "WHERE info LIKE :pattern AND id <> CONNECTION_ID()"
        )
    count = int((await conn.execute(query, {"pattern": f"%{prefix}keys%"})).scalar_one())
    # PostgreSQL shows a transaction pg_stat_activity as it was at the transaction's first
    # look: ending it lets the next poll see the calls that reached the lock since.
    await conn.rollback()
    return count


@asynccontextmanager
async def rows_held(
    store: SQLStore, backend: str, *client_ids: str
) -> AsyncIterator[Callable[[int], Awaitable[None]]]:
    """Hold the write lock on the keys ``client_ids`` (SQLite: on the whole database) until
    the block ends; yields a wait for that many store calls to queue behind it."""
    prefix = store.table_prefix
    if backend == "sqlite":
        database = store.engine.url.database
        assert database is not None
        file_lock = sqlite3.connect(database, isolation_level=None)
        try:
            file_lock.execute("BEGIN IMMEDIATE")

            async def settle(count: int) -> None:
                # SQLite cannot tell who waits for its lock: give the calls time to start.
                await anyio.sleep(0.3)

            yield settle
            file_lock.execute("ROLLBACK")
        finally:
            file_lock.close()
        return
    keys = table(f"{prefix}keys", column("client_id"))
    async with side_engine(store) as other, other.connect() as holder, other.connect() as watcher:
        await holder.execute(
            select(keys.c.client_id).where(keys.c.client_id.in_(client_ids)).with_for_update()
        )

        async def queued(count: int) -> None:
            with anyio.fail_after(BOUND):
                # Polling the server: nothing in this process could signal it.
                while await lock_waiters(watcher, backend, prefix) < count:  # noqa: ASYNC110
                    await anyio.sleep(0.02)

        yield queued
        await holder.rollback()


@pytest.mark.parametrize("backend", SERVERS)
async def test_two_processes_rename_two_keys_to_one_name(backend: str, tmp_path: Path) -> None:
    """Two stores (as two processes) renaming two keys to one name at the same instant:
    exactly one rename wins, the other raises DuplicateName and leaves its key as it was."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        first, second = record(name="first"), record(name="second", offset=1)
        for rec in (first, second):
            await store.insert_key(rec)
        other = SQLStore(
            create_async_engine(store.engine.url, hide_parameters=True),
            table_prefix=store.table_prefix,
        )
        outcomes: dict[str, str] = {}

        async def rename(on: SQLStore, rec: KeyRecord) -> None:
            try:
                await on.update_key("orders", rec.client_id, KeyChanges(name="WINNER"))
            except DuplicateName:
                outcomes[rec.client_id] = "duplicate"
            else:
                outcomes[rec.client_id] = "renamed"

        try:
            await expose(other)  # its schema read before the race
            # The lock goes first, releasing both renames together; the group waits for them.
            async with (
                anyio.create_task_group() as group,
                rows_held(store, backend, first.client_id, second.client_id) as queued,
            ):
                group.start_soon(rename, store, first)
                group.start_soon(rename, other, second)
                await queued(2)
        finally:
            await other.engine.dispose()
        assert sorted(outcomes.values()) == ["duplicate", "renamed"]
        names = {key.client_id: key.name for key in await store.list_keys("orders")}
        winner = next(cid for cid, outcome in outcomes.items() if outcome == "renamed")
        loser = next(cid for cid, outcome in outcomes.items() if outcome == "duplicate")
        assert names[winner] == "WINNER"
        assert names[loser] == ("first" if loser == first.client_id else "second")
        assert await raw_columns(store, loser, "name_key") == (names[loser],)


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_two_processes_roll_one_secret_at_once(backend: str, tmp_path: Path) -> None:
    """Two stores (as two processes) rolling one key's secret with grace periods at the same
    instant are serialized: the later roll keeps the earlier one's hash as the previous
    secret, with its own deadline, and that whole pair is what is stored."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        rec = record(secret_hash="h0")
        await store.insert_key(rec)
        other = SQLStore(
            create_async_engine(store.engine.url, hide_parameters=True),
            table_prefix=store.table_prefix,
        )
        now = utcnow()
        deadlines = {"h1": now + timedelta(hours=1), "h2": now + timedelta(hours=2)}
        results: list[KeyRecord | None] = []

        async def roll(on: SQLStore, new_hash: str) -> None:
            rolled = await on.set_secret_hash(
                "orders", rec.client_id, new_hash, previous_until=deadlines[new_hash]
            )
            results.append(rolled)

        try:
            await expose(other)
            async with (
                anyio.create_task_group() as group,
                rows_held(store, backend, rec.client_id) as queued,
            ):
                group.start_soon(roll, store, "h1")
                group.start_soon(roll, other, "h2")
                await queued(2)
        finally:
            await other.engine.dispose()
        assert len(results) == 2
        assert all(rolled is not None for rolled in results)
        done = [rolled for rolled in results if rolled is not None]
        earlier = next(rolled for rolled in done if rolled.previous_secret_hash == "h0")
        later = next(rolled for rolled in done if rolled is not earlier)
        assert earlier.previous_secret_expires_at == deadlines[str(earlier.secret_hash)]
        assert later.previous_secret_hash == earlier.secret_hash
        assert later.previous_secret_expires_at == deadlines[str(later.secret_hash)]
        assert await store.get_key("orders", rec.client_id) == later


async def test_a_sqlite_file_in_a_missing_folder_is_unavailable_without_a_thread(
    tmp_path: Path,
) -> None:
    """A SQLite path whose folder does not exist: StoreUnavailable naming the folder, on
    every call, and no driver worker thread left behind (aiosqlite's, after a failed
    open, can print a traceback once the loop has closed)."""
    import threading

    before = set(threading.enumerate())
    folder = tmp_path / "no" / "such"
    store = SQLStore.from_url(f"sqlite:///{folder / 'keys.db'}", table_prefix=unique_prefix())
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable, match="does not exist") as raised:
                await store.lookup("orders", None)
            assert str(folder) in str(raised.value)
        assert not folder.exists()
        assert set(threading.enumerate()) - before == set()
    finally:
        await store.aclose()


async def test_the_tag_keys_first_read_is_bounded_as_one_call(tmp_path: Path) -> None:
    """Making the client id tag key on first need (read, look for tagged ids, insert,
    read back) is one store call, bounded by ``timeout`` as a whole: four statements
    each well within the timeout but not together end in StoreUnavailable (each step
    used to get a whole ``timeout`` of its own: four times the bound)."""
    store = SQLStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}", timeout=1.0)
    try:
        assert await store.get_api("orders") is None  # the tables, made first
        slow: list[str] = []

        def one_slow_read(_c: Any, _cur: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                slow.append(statement)
                time.sleep(0.45)  # each read within the timeout; three of them, past it

        event.listen(store.engine.sync_engine, "before_cursor_execute", one_slow_read)
        with anyio.fail_after(BOUND), pytest.raises(StoreUnavailable, match="no answer"):
            await store.id_tag_key()
        assert 2 <= len(slow) <= 3
        event.remove(store.engine.sync_engine, "before_cursor_execute", one_slow_read)
        assert len(await store.id_tag_key()) == 32  # and the next call finds or makes it
    finally:
        await store.aclose()


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_usage_of_an_id_no_key_can_have_costs_nothing_else(
    backend: str, tmp_path: Path
) -> None:
    """A usage count for a client id no key could have (a NUL, past 64 characters) is
    skipped with its last use, as its bucket already was: the rest of the write is made
    (PostgreSQL refused the whole transaction over the NUL, StoreUnavailable, and every
    other count of the flush went with it)."""
    from keyguard.usage import UsageCount

    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        now = utcnow()
        hour = now.replace(minute=0, second=0, microsecond=0)
        await store.record_usage(
            [
                UsageCount("orders", rec.client_id, hour, 2, 0, now),
                UsageCount("orders", "made\x00up", hour, 1, 0, now),
                UsageCount("orders", "x" * 65, hour, 1, 0, now),
            ]
        )
        found = await store.read_usage("orders", None, hour)
        assert [(c.client_id, c.requests) for c in found] == [(rec.client_id, 2)]
        stored = await store.get_key("orders", rec.client_id)
        assert stored is not None
        assert stored.last_used_at == now
