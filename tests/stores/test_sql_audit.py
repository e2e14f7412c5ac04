"""The SQL store writes an audit event in the transaction of its change (SPEC §10).

Both directions are pinned down by failing the transaction mid-way on real
databases: a change refused after its event was written leaves no event, and
an event that cannot be written undoes its change.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from keyguard import KeyManager
from keyguard.audit import new_event
from keyguard.errors import DuplicateName, KeyLimitReached, StoreUnavailable
from keyguard.models import KeyChanges
from keyguard.stores.sql import SQLStore
from tests.backends.sql import SQL_BACKENDS, open_sql_test_store
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio


async def audit_rows(store: SQLStore) -> int:
    """How many rows the audit table holds, counted past the store's own reads."""
    async with store.engine.connect() as conn:
        count = text(f"SELECT COUNT(*) FROM {store.table_prefix}audit")  # noqa: S608
        return int((await conn.execute(count)).scalar_one())


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_refused_changes_roll_their_event_back(backend: str, tmp_path: Path) -> None:
    """A key creation refused by the name constraint, a rename refused by it (both after the
    event is written in their transaction) and a creation past the limit leave no row."""
    async with open_sql_test_store(backend, tmp_path) as store:
        manager = KeyManager(store, max_keys_per_kind=2)
        await manager.expose("orders")
        await manager.create_key("orders", name="Acme", kind="external")
        beta = await manager.create_key("orders", name="Beta", kind="external")
        before = await audit_rows(store)
        assert before == 3
        with pytest.raises(DuplicateName):
            await manager.create_key("orders", name="Acme", kind="internal")
        with pytest.raises(DuplicateName):
            await manager.update_key("orders", beta.client_id, name="ACME")
        with pytest.raises(KeyLimitReached):
            await manager.create_key("orders", name="Gamma", kind="external")
        assert await audit_rows(store) == before
        assert [e.action for e in (await manager.audit()).events] == [
            "key.create",
            "key.create",
            "api.expose",
        ]
        assert (await manager.get_key("orders", beta.client_id)).name == "Beta"


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_an_event_that_cannot_be_written_undoes_its_change(
    backend: str, tmp_path: Path
) -> None:
    """When the event's insert fails (its id already taken), the change in the same
    transaction is not made: no key, no rename, no delete, no API change."""
    async with open_sql_test_store(backend, tmp_path) as store:
        taken = new_event(actor="test", action="api.expose", api="orders")
        await store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5, audit=taken
        )
        kept = record(name="Acme")
        await store.insert_key(kept)
        with pytest.raises(StoreUnavailable):
            await store.insert_key(record(name="New"), audit=taken)
        with pytest.raises(StoreUnavailable):
            await store.update_key("orders", kept.client_id, KeyChanges(name="X"), audit=taken)
        with pytest.raises(StoreUnavailable):
            await store.delete_key("orders", kept.client_id, audit=taken)
        with pytest.raises(StoreUnavailable):
            await store.upsert_api(
                "orders",
                exposed=False,
                max_keys_per_kind=None,
                default_max_keys_per_kind=5,
                audit=taken,
            )
        with pytest.raises(StoreUnavailable):
            await store.delete_api("orders", force=True, audit=taken)
        assert [key.name for key in await store.list_keys("orders")] == ["Acme"]
        found = await store.get_api("orders")
        assert found is not None
        assert found.exposed
        assert found.external_keys == 1
        assert await audit_rows(store) == 1


@pytest.mark.parametrize("backend", SQL_BACKENDS)
async def test_old_events_are_pruned(backend: str, tmp_path: Path) -> None:
    """Past ``audit_retention``, events are deleted from the table by ``prune_audit``
    (which the store runs after a change at most once an hour), newer ones kept."""
    async with open_sql_test_store(backend, tmp_path, audit_retention=timedelta(days=1)) as store:
        await expose(store)
        old = new_event(actor="t", action="api.update", api="orders")
        # An id from two days ago: its first 14 hex digits are its time in microseconds.
        micros = int(old.id[:14], 16) - 2 * 86_400 * 10**6
        aged = dataclasses.replace(
            old, id=f"{micros:014x}" + old.id[14:], at=old.at - timedelta(days=2)
        )
        await store.upsert_api(
            "orders", exposed=None, max_keys_per_kind=3, default_max_keys_per_kind=5, audit=aged
        )
        fresh = new_event(actor="t", action="api.update", api="orders")
        await store.upsert_api(
            "orders", exposed=None, max_keys_per_kind=4, default_max_keys_per_kind=5, audit=fresh
        )
        assert [e.id for e in await store.list_audit()] == [fresh.id]
        assert await audit_rows(store) == 1  # pruned after the store's first change
        again = dataclasses.replace(aged, id=aged.id[:14] + "f" * 12)
        await store.upsert_api(
            "orders", exposed=None, max_keys_per_kind=2, default_max_keys_per_kind=5, audit=again
        )
        assert await audit_rows(store) == 2  # not an hour later: left for the next pruning
        assert await store.prune_audit() == 1
        assert [e.id for e in await store.list_audit()] == [fresh.id]
        assert await audit_rows(store) == 1


def test_retention_is_validated() -> None:
    """A retention that is not a positive duration is refused at construction."""
    from keyguard.errors import ConfigurationError

    for bad in (0, -1, "400d", timedelta(0), True):
        with pytest.raises(ConfigurationError):
            SQLStore.from_url("sqlite:///x.db", audit_retention=bad)  # type: ignore[arg-type]
