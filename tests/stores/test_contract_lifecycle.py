"""The KeyStore contract for the key lifecycle (SPEC §8): run against every store.

Every field of a ``KeyRecord`` is kept and read back exactly; ``update_key``
changes only what it is given and keeps R3 atomically on a rename;
``set_secret_hash`` rolls a secret keeping one previous hash on request.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import anyio
import pytest

from keyguard import KeyStore
from keyguard.errors import DuplicateName
from keyguard.models import (
    EMPTY_META,
    KeyChanges,
    KeyKind,
    KeyRecord,
    RateLimit,
    parse_meta,
    utcnow,
)
from keyguard.secrets import new_client_id
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio

INTERNAL = KeyKind.INTERNAL
EXTERNAL = KeyKind.EXTERNAL
BIG_META = parse_meta({"note": "é" * 2030, "n": 1})  # close to 4,096 bytes as UTF-8


def full_record(kind: KeyKind = EXTERNAL, name: str = "Acme") -> KeyRecord:
    """A record with every lifecycle field set to something other than its default."""
    now = utcnow()
    return dataclasses.replace(
        record("orders", name, kind, "current-hash"),
        enabled=False,
        expires_at=now + timedelta(days=3, microseconds=7),
        meta=parse_meta({"customer": "c-42", "plan": "gold", "tags": ["a", "ü"], "x": None}),
        previous_secret_hash="previous-hash",
        previous_secret_expires_at=now + timedelta(hours=1),
        last_used_at=now - timedelta(minutes=5),
        rate_limits=(RateLimit(100, "minute"), RateLimit(10, "second")),
    )


async def test_new_fields_default_on_a_plain_record(store: KeyStore) -> None:
    """A record made with only the first version's fields reads back with the defaults."""
    await expose(store)
    rec = record()
    await store.insert_key(rec)
    got = await store.get_key("orders", rec.client_id)
    assert got is not None
    assert got.enabled is True
    assert got.expires_at is None
    assert got.meta == EMPTY_META
    assert got.previous_secret_hash is None
    assert got.previous_secret_expires_at is None
    assert got.last_used_at is None
    assert got.rate_limits is None


@pytest.mark.parametrize("kind", [INTERNAL, EXTERNAL])
async def test_every_field_reads_back_exactly(store: KeyStore, kind: KeyKind) -> None:
    """Each field written at insertion reads back equal, through every read."""
    await expose(store)
    rec = full_record(kind)
    await store.insert_key(rec)
    got = await store.get_key("orders", rec.client_id)
    assert got == rec
    assert (await store.list_keys("orders")) == [rec]
    assert await store.lookup("orders", rec.client_id) == (True, rec)
    assert got is not None
    assert got.expires_at is not None
    assert got.expires_at.utcoffset() == timedelta(0)


async def test_meta_near_the_limit_and_unlimited_rate_limits_round_trip(store: KeyStore) -> None:
    """A meta of almost 4 KB of non-ASCII text, and ``[]`` limits (unlimited, not inherit)."""
    await expose(store)
    rec = dataclasses.replace(record(), meta=BIG_META, rate_limits=())
    await store.insert_key(rec)
    got = await store.get_key("orders", rec.client_id)
    assert got is not None
    assert got.meta == BIG_META
    assert got.rate_limits == ()


async def test_api_rate_limits(store: KeyStore) -> None:
    """An API starts with no limits; ``None`` leaves them, a tuple replaces them."""
    api = await expose(store)
    assert api.rate_limits == ()
    limits = (RateLimit(5, "second"), RateLimit(1000, "day"))
    api = await store.upsert_api(
        "orders",
        exposed=None,
        max_keys_per_kind=None,
        default_max_keys_per_kind=5,
        rate_limits=limits,
    )
    assert api.rate_limits == limits
    again = await store.upsert_api(
        "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    assert again.rate_limits == limits
    got = await store.get_api("orders")
    assert got is not None
    assert got.rate_limits == limits
    assert (await store.list_apis())[0].rate_limits == limits
    cleared = await store.upsert_api(
        "orders", exposed=None, max_keys_per_kind=None, default_max_keys_per_kind=5, rate_limits=()
    )
    assert cleared.rate_limits == ()


# -- update_key -----------------------------------------------------------------------------


async def test_update_changes_only_given_fields(store: KeyStore) -> None:
    """Each update changes exactly its fields; the rest, hashes included, stay."""
    await expose(store)
    rec = full_record()
    await store.insert_key(rec)
    later = utcnow() + timedelta(days=9)
    updated = await store.update_key(
        "orders", rec.client_id, KeyChanges(enabled=True, expires_at=later)
    )
    assert updated == dataclasses.replace(rec, enabled=True, expires_at=later)
    assert await store.get_key("orders", rec.client_id) == updated
    cleared = await store.update_key(
        "orders", rec.client_id, KeyChanges(expires_at=None, meta=EMPTY_META, rate_limits=None)
    )
    assert cleared == dataclasses.replace(
        rec, enabled=True, expires_at=None, meta=EMPTY_META, rate_limits=None
    )
    assert await store.get_key("orders", rec.client_id) == cleared
    unchanged = await store.update_key("orders", rec.client_id, KeyChanges())
    assert unchanged == cleared


@pytest.mark.parametrize("kind", [INTERNAL, EXTERNAL])
async def test_update_works_on_both_kinds(store: KeyStore, kind: KeyKind) -> None:
    """R11: name, enabled, expiry, meta and limits change on internal keys too."""
    await expose(store)
    rec = record(kind=kind)
    await store.insert_key(rec)
    meta = parse_meta({"plan": "silver"})
    updated = await store.update_key(
        "orders",
        rec.client_id,
        KeyChanges(name="Acme Corp", enabled=False, meta=meta, rate_limits=()),
    )
    assert updated is not None
    assert (updated.name, updated.enabled, updated.meta, updated.rate_limits) == (
        "Acme Corp",
        False,
        meta,
        (),
    )
    assert updated.secret_hash == rec.secret_hash
    assert updated.created_at == rec.created_at
    assert updated.kind is kind


async def test_update_unknown_key_changes_nothing(store: KeyStore) -> None:
    """An unknown key, or a key of another API, is ``None``."""
    await expose(store)
    await expose(store, "elsewhere")
    rec = record()
    await store.insert_key(rec)
    assert await store.update_key("orders", new_client_id(), KeyChanges(enabled=False)) is None
    assert await store.update_key("elsewhere", rec.client_id, KeyChanges(enabled=False)) is None
    assert await store.update_key("nobody", rec.client_id, KeyChanges(enabled=False)) is None
    got = await store.get_key("orders", rec.client_id)
    assert got is not None
    assert got.enabled is True


async def test_rename_keeps_names_unique(store: KeyStore) -> None:
    """R3 on rename: a casefolded clash is refused and changes nothing; the old name is free."""
    await expose(store)
    first, second = record(name="Acme"), record(name="Globex", offset=1)
    await store.insert_key(first)
    await store.insert_key(second)
    with pytest.raises(DuplicateName):
        await store.update_key("orders", second.client_id, KeyChanges(name="ACME", enabled=False))
    got = await store.get_key("orders", second.client_id)
    assert got == second
    renamed = await store.update_key("orders", first.client_id, KeyChanges(name="Initech"))
    assert renamed is not None
    assert renamed.name == "Initech"
    # The old name is free again, for a rename and for a new key.
    assert await store.update_key("orders", second.client_id, KeyChanges(name="acme")) is not None
    await store.insert_key(record(name="Globex", offset=2))
    with pytest.raises(DuplicateName):
        await store.insert_key(record(name="INITECH", offset=3))


async def test_rename_to_another_casing_of_its_own_name(store: KeyStore) -> None:
    """A key may be renamed to a different casing of its own name."""
    await expose(store)
    rec = record(name="acme")
    await store.insert_key(rec)
    renamed = await store.update_key("orders", rec.client_id, KeyChanges(name="ACME"))
    assert renamed is not None
    assert renamed.name == "ACME"


async def test_names_are_per_api_on_rename(store: KeyStore) -> None:
    """Another API's key of the same name does not block a rename."""
    await expose(store)
    await expose(store, "elsewhere")
    await store.insert_key(record("elsewhere", "Acme"))
    rec = record(name="Globex")
    await store.insert_key(rec)
    renamed = await store.update_key("orders", rec.client_id, KeyChanges(name="Acme"))
    assert renamed is not None
    assert renamed.name == "Acme"


async def test_concurrent_renames_to_one_name(store: KeyStore) -> None:
    """Of several keys renamed to one name at once, exactly one gets it."""
    await expose(store, limit=10)
    recs = [record(name=f"key {n}", offset=n) for n in range(6)]
    for rec in recs:
        await store.insert_key(rec)
    outcomes: list[str] = []

    async def rename(client_id: str) -> None:
        try:
            await store.update_key("orders", client_id, KeyChanges(name="Winner"))
            outcomes.append("ok")
        except DuplicateName:
            outcomes.append("duplicate")

    async with anyio.create_task_group() as group:
        for rec in recs:
            group.start_soon(rename, rec.client_id)
    assert sorted(outcomes) == ["duplicate"] * 5 + ["ok"]
    names = [key.name for key in await store.list_keys("orders")]
    assert names.count("Winner") == 1


# -- rolling secrets ------------------------------------------------------------------------


async def test_roll_keeps_the_previous_hash_until_the_deadline(store: KeyStore) -> None:
    """With ``previous_until``, the replaced hash becomes the previous one."""
    await expose(store)
    rec = record(secret_hash="first")
    await store.insert_key(rec)
    until = utcnow() + timedelta(hours=2)
    rolled = await store.set_secret_hash("orders", rec.client_id, "second", previous_until=until)
    assert rolled is not None
    assert (rolled.secret_hash, rolled.previous_secret_hash) == ("second", "first")
    assert rolled.previous_secret_expires_at == until
    assert await store.get_key("orders", rec.client_id) == rolled
    # Rolling again keeps only the latest previous secret.
    later = until + timedelta(hours=1)
    again = await store.set_secret_hash("orders", rec.client_id, "third", previous_until=later)
    assert again is not None
    assert (again.secret_hash, again.previous_secret_hash) == ("third", "second")
    assert again.previous_secret_expires_at == later
    # Without a grace period the previous secret goes.
    plain = await store.set_secret_hash("orders", rec.client_id, "fourth")
    assert plain is not None
    assert (plain.secret_hash, plain.previous_secret_hash) == ("fourth", None)
    assert plain.previous_secret_expires_at is None
    assert await store.get_key("orders", rec.client_id) == plain


async def test_first_secret_keeps_no_previous(store: KeyStore) -> None:
    """A key that had no secret keeps no previous one, even when asked to."""
    await expose(store)
    rec = record()
    await store.insert_key(rec)
    rolled = await store.set_secret_hash(
        "orders", rec.client_id, "first", previous_until=utcnow() + timedelta(hours=1)
    )
    assert rolled is not None
    assert (rolled.secret_hash, rolled.previous_secret_hash) == ("first", None)
    assert rolled.previous_secret_expires_at is None


async def test_roll_keeps_the_other_fields(store: KeyStore) -> None:
    """A roll changes the secrets only."""
    await expose(store)
    rec = full_record()
    await store.insert_key(rec)
    until = utcnow() + timedelta(minutes=1)
    rolled = await store.set_secret_hash("orders", rec.client_id, "new", previous_until=until)
    assert rolled == dataclasses.replace(
        rec,
        secret_hash="new",
        previous_secret_hash="current-hash",
        previous_secret_expires_at=until,
    )


async def test_roll_refuses_internal_keys(store: KeyStore) -> None:
    """R4 holds with a grace period too."""
    await expose(store)
    rec = record(kind=INTERNAL, secret_hash="original")
    await store.insert_key(rec)
    assert (
        await store.set_secret_hash(
            "orders", rec.client_id, "new", previous_until=utcnow() + timedelta(hours=1)
        )
        is None
    )
    assert await store.get_key("orders", rec.client_id) == rec


async def test_concurrent_rolls_keep_a_whole_pair(store: KeyStore) -> None:
    """Rolls racing each other leave a current and a previous hash that were both issued."""
    await expose(store)
    rec = record(secret_hash="h0")
    await store.insert_key(rec)
    until = utcnow() + timedelta(hours=1)

    async def roll(n: int) -> None:
        await store.set_secret_hash("orders", rec.client_id, f"h{n}", previous_until=until)

    async with anyio.create_task_group() as group:
        for n in range(1, 7):
            group.start_soon(roll, n)
    got = await store.get_key("orders", rec.client_id)
    assert got is not None
    issued = {f"h{n}" for n in range(7)}
    assert got.secret_hash in issued - {"h0"}
    assert got.previous_secret_hash in issued
    assert got.previous_secret_hash != got.secret_hash
