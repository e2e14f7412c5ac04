"""The request path's SQL reads on kept driver connections (``stores/sql/_direct.py``):
the same answers as through SQLAlchemy, every commit seen at once, and never a wrong or
stuck answer when a kept connection times out, is cancelled, dies or is closed.

Every SQL backend where it applies; the failure cases on PostgreSQL, whose server can
show and end a single backend (``pg_terminate_backend`` of this test's own connection:
the shared server is not disturbed) and lock a table of the test's own prefix.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from keyguard.errors import StoreUnavailable
from keyguard.models import KeyChanges, KeyKind, RateLimit, utcnow
from keyguard.stores.sql import SQLStore
from keyguard.stores.sql._direct import KEPT, DirectReads
from tests.backends.sql import SQL_BACKENDS, open_sql_test_store, same_tables
from tests.helpers import expose, record
from tests.stores.test_sql import counting_statements

pytestmark = pytest.mark.anyio


def direct(store: SQLStore) -> DirectReads:
    """The running loop's kept connections of ``store`` (after a first call)."""
    bound = store._current
    assert bound is not None, "no direct reads on this store"
    assert bound.direct is not None, "no direct reads on this store"
    return bound.direct


async def full_key(store: SQLStore) -> str:
    """A key with every column set (an expiry, meta, limits, a previous secret in its
    grace period, a last use), of an API with limits: what the result processing sees."""
    await expose(store)
    await store.upsert_api(
        "orders",
        exposed=None,
        max_keys_per_kind=None,
        default_max_keys_per_kind=5,
        rate_limits=(RateLimit(100, "minute"),),
    )
    rec = record(kind=KeyKind.EXTERNAL, secret_hash="$pbkdf2-sha256$1$old", name="Straße ✓")
    await store.insert_key(rec)
    soon = utcnow() + timedelta(days=3, microseconds=123)
    await store.update_key(
        "orders",
        rec.client_id,
        KeyChanges(
            expires_at=soon,
            meta={"tier": "gold", "n": [1, 2]},
            rate_limits=(RateLimit(5, "second"), RateLimit(1000, "day")),
        ),
    )
    await store.set_secret_hash(
        "orders", rec.client_id, "$pbkdf2-sha256$1$new", previous_until=soon
    )
    return rec.client_id


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_hot_reads_answer_as_sqlalchemy_does(backend: str, tmp_path: Path) -> None:
    """lookup and snapshot on a kept connection return exactly what the same statements
    return through SQLAlchemy: every column, processed the same way (aware UTC datetimes
    to the microsecond, booleans, JSON text)."""
    async with open_sql_test_store(backend, tmp_path) as store:
        client_id = await full_key(store)
        unknown = record().client_id
        calls = [
            ("lookup", ("orders", client_id)),
            ("lookup", ("orders", None)),
            ("lookup", ("orders", unknown)),
            ("lookup", ("nobody", client_id)),
        ]
        fast = [await store.lookup(*args) for _, args in calls]
        fast_snapshot = await store.snapshot("orders", max_keys=10)
        served = direct(store).served
        assert served >= len(calls) + 1
        with counting_statements(store.engine) as sent:
            slow = [await store.lookup(*args) for _, args in calls]
            slow_snapshot = await store.snapshot("orders", max_keys=10)
        assert len(sent) == len(calls) + 1  # through SQLAlchemy this time, one statement each
        assert direct(store).served == served
        assert fast == slow
        assert fast_snapshot == slow_snapshot
        exposed, found = fast[0]
        assert exposed is True
        assert found is not None
        assert found.expires_at is not None
        assert found.expires_at.utcoffset() == timedelta(0)
        assert found.meta == {"tier": "gold", "n": (1, 2)}  # frozen
        assert found.previous_secret_hash == "$pbkdf2-sha256$1$old"
        assert found.name == "Straße ✓"
        assert found.rate_limits == (RateLimit(5, "second"), RateLimit(1000, "day"))
        api, records = fast_snapshot
        assert api is not None
        assert api.rate_limits == (RateLimit(100, "minute"),)
        assert records == [found]
        assert fast[1:] == [(True, None), (True, None), (False, None)]


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_a_commit_elsewhere_is_seen_by_the_next_read(backend: str, tmp_path: Path) -> None:
    """Kept connections read in autocommit: a change committed by another engine (another
    process) is seen by the very next lookup, every time — never a snapshot held from an
    earlier read (MariaDB's REPEATABLE READ, a transaction left open)."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        other = SQLStore(
            create_async_engine(store.engine.url, hide_parameters=True),
            table_prefix=store.table_prefix,
        )
        try:
            for round_ in range(4):
                enabled = round_ % 2 == 1
                await other.update_key("orders", rec.client_id, KeyChanges(enabled=enabled))
                _, found = await store.lookup("orders", rec.client_id)
                assert found is not None, round_
                assert found.enabled is enabled, round_
                await other.upsert_api(
                    "orders",
                    exposed=enabled,
                    max_keys_per_kind=None,
                    default_max_keys_per_kind=5,
                )
                assert (await store.lookup("orders", None))[0] is enabled, round_
                found_api, _ = await store.snapshot("orders", max_keys=10)
                assert found_api is not None, round_
                assert found_api.exposed is enabled, round_
            assert direct(store).served >= 12
        finally:
            await other.engine.dispose()


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_concurrent_reads_beyond_the_kept_connections(backend: str, tmp_path: Path) -> None:
    """More reads at once than kept connections: each is answered (the rest through the
    pool), right, and no more than ``KEPT`` connections are ever kept."""
    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        recs = [record(name=f"Key {i}", offset=i) for i in range(5)]
        for rec in recs:
            await store.insert_key(rec)
        answers: dict[int, Any] = {}

        async def read(i: int) -> None:
            answers[i] = await store.lookup("orders", recs[i % 5].client_id)

        async with anyio.create_task_group() as group:
            for i in range(40):
                group.start_soon(read, i)
        for i, (exposed, found) in answers.items():
            assert exposed is True
            assert found is not None
            assert found.client_id == recs[i % 5].client_id
        assert len(answers) == 40
        assert 1 <= direct(store).kept <= KEPT


async def test_a_small_pool_keeps_no_connection(tmp_path: Path) -> None:
    """A pool of one connection is not halved: nothing is kept, reads go through it."""
    async with open_sql_test_store("sqlite", tmp_path, pool_size=1, max_overflow=0) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        assert (await store.lookup("orders", rec.client_id))[1] == rec
        bound = store._current
        assert bound is not None
        assert bound.direct is None
        await store.update_key("orders", rec.client_id, KeyChanges(name="Renamed"))
        _, found = await store.lookup("orders", rec.client_id)
        assert found is not None
        assert found.name == "Renamed"


# -- failures (PostgreSQL) -------------------------------------------------------------------


def backend_pids(store: SQLStore) -> set[int]:
    """The server pids of ``store``'s idle kept connections."""
    pids = set()
    for kept in direct(store)._idle:
        pids.add(int(kept.driver.get_server_pid()))
    return pids


async def test_a_kept_connection_killed_costs_no_error() -> None:
    """The server ends a kept connection (a restart, an idle timeout): the next read is
    still answered — through the pool, which reconnects — and later reads keep a new one."""
    async with open_sql_test_store("postgres", Path()) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        await store.lookup("orders", rec.client_id)
        pids = backend_pids(store)
        assert pids
        admin = create_async_engine(store.engine.url)
        try:
            async with admin.connect() as conn:
                for pid in pids:
                    await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            for _ in range(3):
                assert (await store.lookup("orders", rec.client_id))[1] == rec
            assert not pids & backend_pids(store)
            assert direct(store).kept >= 1
        finally:
            await admin.dispose()


async def test_a_read_past_the_timeout_is_503_and_cuts_its_connection() -> None:
    """A read held by a lock past the store's timeout raises StoreUnavailable on time; its
    connection is cut (not reused mid-statement), and reads after the lock work."""
    async with (
        open_sql_test_store("postgres", Path()) as owner,
        same_tables(owner, timeout=0.5) as store,
    ):
        await expose(owner)
        rec = record()
        await owner.insert_key(rec)
        await store.lookup("orders", None)  # bound, tables known
        await store.lookup("orders", rec.client_id)  # on a kept connection
        pids = backend_pids(store)
        assert pids
        locker = create_async_engine(store.engine.url)
        try:
            async with locker.connect() as conn:
                await conn.execute(
                    text(f"LOCK TABLE {store.table_prefix}keys IN ACCESS EXCLUSIVE MODE")
                )
                with pytest.raises(StoreUnavailable, match=r"no answer within 0\.5 s"):
                    await store.lookup("orders", rec.client_id)
                await conn.rollback()
            assert (await store.lookup("orders", rec.client_id))[1] == rec
            assert pids - backend_pids(store)  # the held one is gone
        finally:
            await locker.dispose()


async def test_a_cancelled_read_leaves_no_connection_mid_statement() -> None:
    """A read cancelled while the server works on it (its client gone) drops that
    connection: the next reads are answered, right, on connections in a clean state."""
    async with open_sql_test_store("postgres", Path()) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        await store.lookup("orders", rec.client_id)
        locker = create_async_engine(store.engine.url)
        try:
            async with locker.connect() as conn:
                await conn.execute(
                    text(f"LOCK TABLE {store.table_prefix}keys IN ACCESS EXCLUSIVE MODE")
                )
                with anyio.move_on_after(0.3) as scope:
                    await store.lookup("orders", rec.client_id)
                assert scope.cancelled_caught
                await conn.rollback()
            for _ in range(2 * KEPT + 1):
                assert (await store.lookup("orders", rec.client_id))[1] == rec
            assert 1 <= direct(store).kept <= KEPT
        finally:
            await locker.dispose()


async def reading_on_an_apps_engine(owner: SQLStore) -> tuple[SQLStore, AsyncEngine, Any]:
    """A store over an engine of the app's own on ``owner``'s tables, with a key it has
    just read, once alone (the fast path from then on) and four times at once."""
    await expose(owner)
    rec = record()
    await owner.insert_key(rec)
    engine = create_async_engine(owner.engine.url, hide_parameters=True)
    store = SQLStore(engine, table_prefix=owner.table_prefix)
    await store.lookup("orders", rec.client_id)
    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(store.lookup, "orders", rec.client_id)
    return store, engine, rec


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_closing_the_store_returns_kept_connections(backend: str, tmp_path: Path) -> None:
    """``aclose`` gives the kept connections back before the engine goes: on an engine the
    application passed in (which the store does not dispose), none stays checked out."""
    async with open_sql_test_store(backend, tmp_path) as owner:
        store, engine, rec = await reading_on_an_apps_engine(owner)
        try:
            reads = direct(store)
            assert reads.kept >= 1
            pool: Any = engine.sync_engine.pool
            assert pool.checkedout() >= reads.kept
            await store.aclose()
            assert reads.kept == 0
            assert pool.checkedout() == 0
            with pytest.raises(StoreUnavailable):
                await store.lookup("orders", rec.client_id)
        finally:
            await engine.dispose()


async def test_a_failed_direct_read_leaves_the_pooled_retry_only_the_rest_of_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kept connection that fails after a while (fault injected into the driver call):
    the pooled path that answers instead is given what is left of the store's timeout,
    not a whole one more, so the call as a whole keeps to ``timeout``."""
    async with open_sql_test_store("postgres", Path(), timeout=2.0) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        await store.lookup("orders", rec.client_id)  # bound, tables known, one kept

        async def failing(self: DirectReads, driver: Any, sql: str, params: list[Any]) -> Any:
            await anyio.sleep(0.3)
            raise ConnectionResetError("injected")

        given: list[float | None] = []
        run = store._run

        async def recording(*args: Any, **kwargs: Any) -> Any:
            given.append(kwargs.get("within"))
            return await run(*args, **kwargs)

        monkeypatch.setattr(DirectReads, "_run", failing)
        monkeypatch.setattr(store, "_run", recording)
        assert (await store.lookup("orders", rec.client_id))[1] == rec
        assert len(given) == 1
        within = given[0]
        assert within is not None
        assert within < store.timeout


async def test_a_timeout_while_opening_a_kept_connection_leaves_none_checked_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The timeout cuts a kept connection being opened (its driver connection slow to be
    handed over, injected): a 503 on time, and the connection goes back to the pool —
    not left checked out — so the next reads, unhindered, are answered."""
    from sqlalchemy.ext.asyncio import AsyncConnection

    async with (
        open_sql_test_store("postgres", Path()) as owner,
        same_tables(owner, timeout=0.5) as store,
    ):
        await expose(owner)
        rec = record()
        await owner.insert_key(rec)
        with counting_statements(store.engine):  # (listened to: through the pool)
            await store.lookup("orders", None)  # bound, tables known, nothing kept yet
        assert direct(store).kept == 0
        original = AsyncConnection.get_raw_connection

        async def slow(self: AsyncConnection) -> Any:
            await anyio.sleep(5)
            return await original(self)

        monkeypatch.setattr(AsyncConnection, "get_raw_connection", slow)
        with pytest.raises(StoreUnavailable, match="no answer"):
            await store.lookup("orders", rec.client_id)
        monkeypatch.setattr(AsyncConnection, "get_raw_connection", original)
        await anyio.sleep(0.2)  # the background give-back
        pool: Any = store.engine.sync_engine.pool
        assert direct(store).kept == 0
        assert pool.checkedout() == 0
        assert (await store.lookup("orders", rec.client_id))[1] == rec


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_an_engine_disposed_before_the_store_is_closed_leaves_nothing_open(
    backend: str, tmp_path: Path
) -> None:
    """An app that disposes its own engine and never closes the store: the kept
    connections (checked out, so untouched by dispose) are given up with it, none left
    for the garbage collector to find open (a ResourceWarning, an error in this suite)."""
    import gc

    async with open_sql_test_store(backend, tmp_path) as owner:
        store, engine, _ = await reading_on_an_apps_engine(owner)
        reads = direct(store)
        assert reads.kept >= 1
        await engine.dispose()
        await anyio.sleep(0.2)  # the background give-back
        assert reads.kept == 0
        pool: Any = engine.sync_engine.pool
        assert pool.checkedout() == 0
        del store, reads
        gc.collect()


def test_an_apps_engine_disposed_between_loops_is_left_to_the_app(tmp_path: Path) -> None:
    """An app's engine used in two event loops, disposed between them as SQLAlchemy asks:
    the store's first call in the second loop leaves that engine's pool alone (the
    connections the app checked in there stay pooled, not dropped unclosed) and reads on
    kept connections there again. It used to dispose the app's engine once more (without
    closing its connections), which also ended that loop's fast reads for good."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
    engine = create_async_engine(url, hide_parameters=True)
    store = SQLStore(engine)
    rec = record()

    async def first() -> None:
        await expose(store)
        await store.insert_key(rec)
        for _ in range(3):
            assert (await store.lookup("orders", rec.client_id))[1] == rec
        assert direct(store).served >= 1
        await engine.dispose()
        await anyio.sleep(0.2)  # the kept connections' background give-back (see above)

    async def second() -> None:
        async with engine.connect() as conn:  # the app's own work in this loop
            await conn.execute(text("SELECT 1"))
        pool: Any = engine.sync_engine.pool
        assert pool.checkedin() == 1
        for _ in range(3):
            assert (await store.lookup("orders", rec.client_id))[1] == rec
        assert engine.sync_engine.pool is pool
        assert direct(store).served >= 1
        await store.aclose()
        await engine.dispose()

    anyio.run(first)
    anyio.run(second)


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_reads_are_logged_while_sqlalchemy_logs_statements(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With SQLAlchemy's statement logging turned on through ``logging`` (not ``echo``),
    the request path's reads go through SQLAlchemy and are logged like every other
    statement; they used to vanish from the log, read on kept connections."""
    import logging

    async with open_sql_test_store(backend, tmp_path) as store:
        await expose(store)
        rec = record()
        await store.insert_key(rec)
        caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
        for _ in range(3):
            assert (await store.lookup("orders", rec.client_id))[1] == rec
        logged = [r.getMessage() for r in caplog.records if "LEFT OUTER JOIN" in r.getMessage()]
        assert len(logged) == 3
        bound = store._current
        assert bound is None or bound.direct is None or bound.direct.served == 0
