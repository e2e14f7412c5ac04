"""The KeyStore contract for the audit log (SPEC §10, R12): run against every store.

An event handed to a changing method is written with the change, atomically:
it exists if and only if the change was made. ``list_audit`` reads events
back newest first, filtered and paginated, and never past the retention.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from keyguard import KeyStore
from keyguard.audit import AuditEvent, new_event
from keyguard.errors import ApiHasKeys, ApiNotExposed, DuplicateName, KeyLimitReached
from keyguard.models import KeyChanges, KeyKind, utcnow
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio


def event(action: str = "api.update", api: str = "orders", **fields: object) -> AuditEvent:
    """A new event of ``action`` by actor ``test``."""
    return new_event(actor="test", action=action, api=api, **fields)  # type: ignore[arg-type]


async def listed(store: KeyStore, **query: object) -> list[str]:
    """The ids ``list_audit`` answers for ``query``."""
    return [found.id for found in await store.list_audit(**query)]  # type: ignore[arg-type]


async def test_each_change_writes_its_event(store: KeyStore) -> None:
    """Every changing method writes the event it is given, read back field for field,
    newest first."""
    written: list[AuditEvent] = []

    def new(action: str, **fields: Any) -> AuditEvent:
        made = event(action, **fields)
        written.append(made)
        return made

    await store.upsert_api(
        "orders",
        exposed=True,
        max_keys_per_kind=None,
        default_max_keys_per_kind=5,
        audit=new("api.expose", changes={"exposed": True}),
    )
    key = record(name="Acme")
    await store.insert_key(
        key,
        audit=new(
            "key.create",
            client_id=key.client_id,
            name="Acme",
            changes={"kind": "external", "meta": {"plan": ["gold", 1]}, "expires_at": None},
        ),
    )
    updated = await store.update_key(
        "orders",
        key.client_id,
        KeyChanges(name="Acme Corp"),
        audit=new("key.update", client_id=key.client_id, name="Acme", changes={"name": "Ac"}),
    )
    assert updated is not None
    rolled = await store.set_secret_hash(
        "orders",
        key.client_id,
        "$pbkdf2-sha256$1$x",
        audit=new("key.secret", client_id=key.client_id, name="Acme Corp"),
    )
    assert rolled is not None
    assert await store.delete_key(
        "orders", key.client_id, audit=new("key.delete", client_id=key.client_id)
    )
    assert await store.delete_api("orders", force=False, audit=new("api.delete"))
    found = await store.list_audit()
    assert [e.as_json() for e in found] == [e.as_json() for e in reversed(written)]
    created = next(e for e in found if e.action == "key.create")
    assert created.changes == {
        "kind": "external",
        "meta": {"plan": ["gold", 1]},
        "expires_at": None,
    }
    assert created.at == written[1].at


async def test_refused_changes_write_no_event(store: KeyStore) -> None:
    """A change refused by a rule (R1, R2, R3 at insertion and rename, R4, unknown key or
    API, an API with keys) leaves no event behind."""
    await store.upsert_api(
        "closed", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    with pytest.raises(ApiNotExposed):
        await store.insert_key(record(api="closed"), audit=event("key.create", api="closed"))
    await expose(store, limit=1)
    first = record(name="Acme")
    await store.insert_key(first)
    with pytest.raises(KeyLimitReached):
        await store.insert_key(record(name="Other"), audit=event("key.create"))
    await expose(store, limit=5)
    with pytest.raises(DuplicateName):
        await store.insert_key(record(name="ACME"), audit=event("key.create"))
    second = record(name="Beta")
    await store.insert_key(second)
    with pytest.raises(DuplicateName):
        await store.update_key(
            "orders", second.client_id, KeyChanges(name="acme"), audit=event("key.update")
        )
    assert (await store.get_key("orders", second.client_id)).name == "Beta"  # type: ignore[union-attr]
    internal = record(name="Staff", kind=KeyKind.INTERNAL)
    await store.insert_key(internal)
    assert (
        await store.set_secret_hash(
            "orders", internal.client_id, "$pbkdf2-sha256$1$y", audit=event("key.secret")
        )
        is None
    )
    missing = record().client_id
    assert (
        await store.update_key(
            "orders", missing, KeyChanges(enabled=False), audit=event("key.update")
        )
        is None
    )
    assert await store.set_secret_hash("orders", missing, "h", audit=event("key.secret")) is None
    assert not await store.delete_key("orders", missing, audit=event("key.delete"))
    with pytest.raises(ApiHasKeys):
        await store.delete_api("orders", force=False, audit=event("api.delete"))
    assert not await store.delete_api("never", force=True, audit=event("api.delete", api="never"))
    assert await store.list_audit() == []


async def test_filters_and_pages(store: KeyStore) -> None:
    """Events can be listed for one API or one key, ``limit`` at a time, the next page
    starting below the last id seen; events outlive their API."""
    await expose(store)
    await expose(store, "billing")
    keys = [record(name=f"K{i}") for i in range(3)]
    ids: list[str] = []
    for key in keys:
        made = event("key.create", client_id=key.client_id, name=key.name)
        await store.insert_key(key, audit=made)
        ids.append(made.id)
        changed = event("key.update", client_id=key.client_id)
        await store.update_key("orders", key.client_id, KeyChanges(enabled=False), audit=changed)
        ids.append(changed.id)
    other = event("api.update", api="billing")
    await store.upsert_api(
        "billing", exposed=None, max_keys_per_kind=3, default_max_keys_per_kind=5, audit=other
    )
    newest_first = list(reversed(ids))
    assert await listed(store) == [other.id, *newest_first]
    assert await listed(store, api="orders") == newest_first
    assert await listed(store, api="billing") == [other.id]
    assert await listed(store, api="nowhere") == []
    assert await listed(store, client_id=keys[1].client_id) == [ids[3], ids[2]]
    assert await listed(store, api="billing", client_id=keys[1].client_id) == []
    assert await listed(store, api="orders", limit=2) == newest_first[:2]
    assert await listed(store, api="orders", limit=2, before=newest_first[1]) == newest_first[2:4]
    assert await listed(store, limit=100, before=ids[0]) == []
    assert await store.delete_api("orders", force=True, audit=event("api.delete"))
    assert (await listed(store, api="orders"))[1:] == newest_first


async def test_events_past_retention_are_not_listed(store: KeyStore) -> None:
    """An event older than the store's retention (400 days by default) is never listed."""
    fresh = event()
    old = dataclasses.replace(fresh, id=_id_at(utcnow() - timedelta(days=401)))
    await store.upsert_api(
        "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5, audit=old
    )
    recent = dataclasses.replace(fresh, id=_id_at(utcnow() - timedelta(days=399)))
    await store.upsert_api(
        "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5, audit=recent
    )
    assert await listed(store) == [recent.id]


def _id_at(moment: object) -> str:
    """An event id for ``moment`` (the first 14 hex digits are microseconds)."""
    from keyguard.audit import cutoff_id

    return cutoff_id(timedelta(0), moment) + "0" * 12  # type: ignore[arg-type]
