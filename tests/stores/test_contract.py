"""The KeyStore contract: one suite, run against every store (see ``tests/backends``).

Each test drives the store directly, as ``KeyManager`` does, and pins one
promise of ``keyguard.stores.base.KeyStore``.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import anyio
import pytest

from keyguard import KeyStore
from keyguard.errors import ApiHasKeys, ApiNotExposed, DuplicateName, KeyLimitReached
from keyguard.models import Api, KeyKind, utcnow
from keyguard.secrets import new_client_id
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio

INTERNAL = KeyKind.INTERNAL
EXTERNAL = KeyKind.EXTERNAL


# -- APIs ---------------------------------------------------------------------------------


async def test_unknown_api_is_absent(store: KeyStore) -> None:
    """An API nobody created is not returned and looks unexposed with no keys."""
    assert await store.get_api("nobody") is None
    assert await store.list_apis() == []
    assert await store.lookup("nobody", None) == (False, None)
    assert await store.list_keys("nobody") == []


async def test_upsert_creates_unexposed_with_default_limit(store: KeyStore) -> None:
    """Creating an API with no fields set gives an unexposed API with the default limit."""
    api = await store.upsert_api(
        "orders", exposed=None, max_keys_per_kind=None, default_max_keys_per_kind=7
    )
    assert api == Api("orders", exposed=False, max_keys_per_kind=7)
    assert await store.get_api("orders") == api


async def test_upsert_sets_only_given_fields(store: KeyStore) -> None:
    """Each upsert changes only the fields it is given; the default applies only at creation."""
    await expose(store, limit=3)
    api = await store.upsert_api(
        "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=9
    )
    assert (api.exposed, api.max_keys_per_kind) == (False, 3)
    api = await store.upsert_api(
        "orders", exposed=None, max_keys_per_kind=8, default_max_keys_per_kind=9
    )
    assert (api.exposed, api.max_keys_per_kind) == (False, 8)


async def test_list_apis_sorted_with_counts(store: KeyStore) -> None:
    """APIs are listed by name, each with its count of keys per kind."""
    await expose(store, "zeta")
    await expose(store, "alpha")
    await store.insert_key(record("zeta", "a", INTERNAL, "h"))
    await store.insert_key(record("zeta", "b", EXTERNAL))
    await store.insert_key(record("zeta", "c", EXTERNAL))
    apis = await store.list_apis()
    assert [a.name for a in apis] == ["alpha", "zeta"]
    assert (apis[1].internal_keys, apis[1].external_keys) == (1, 2)
    assert (apis[0].internal_keys, apis[0].external_keys) == (0, 0)
    got = await store.get_api("zeta")
    assert got is not None
    assert (got.internal_keys, got.external_keys) == (1, 2)


# -- inserting keys (R1, R2, R3) ------------------------------------------------------------


async def test_insert_and_read_back_exactly(store: KeyStore) -> None:
    """A key reads back field for field, created_at as an aware UTC datetime, hash intact."""
    await expose(store)
    rec = record(kind=INTERNAL, secret_hash="$pbkdf2-sha256$1$c2FsdA$aGFzaA")
    await store.insert_key(rec)
    got = await store.get_key("orders", rec.client_id)
    assert got == rec
    assert got is not None
    assert got.created_at.utcoffset() == timedelta(0)


async def test_insert_refused_for_unknown_or_unexposed_api(store: KeyStore) -> None:
    """R1: no key can be added to an API that is unknown or not exposed."""
    with pytest.raises(ApiNotExposed):
        await store.insert_key(record("ghost"))
    await store.upsert_api(
        "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    with pytest.raises(ApiNotExposed):
        await store.insert_key(record())
    assert await store.list_keys("orders") == []
    assert await store.list_keys("ghost") == []


async def test_limit_per_kind(store: KeyStore) -> None:
    """R2: the sixth key of a kind is refused; the other kind still has room."""
    await expose(store)
    for i in range(5):
        await store.insert_key(record(name=f"ext {i}", kind=EXTERNAL))
    with pytest.raises(KeyLimitReached):
        await store.insert_key(record(name="ext 5", kind=EXTERNAL))
    await store.insert_key(record(name="int 0", kind=INTERNAL, secret_hash="h"))
    api = await store.get_api("orders")
    assert api is not None
    assert (api.internal_keys, api.external_keys) == (1, 5)


async def test_limit_is_the_apis_own(store: KeyStore) -> None:
    """R2 uses the limit stored with the API, not a default."""
    await expose(store, limit=2)
    await store.insert_key(record(name="a"))
    await store.insert_key(record(name="b"))
    with pytest.raises(KeyLimitReached):
        await store.insert_key(record(name="c"))


async def test_lowering_the_limit_deletes_nothing_and_blocks_new_keys(store: KeyStore) -> None:
    """Lowering the limit below the count keeps every key and refuses new ones."""
    await expose(store)
    for i in range(3):
        await store.insert_key(record(name=f"k{i}"))
    await expose(store, limit=1)
    assert len(await store.list_keys("orders")) == 3
    with pytest.raises(KeyLimitReached) as refused:
        await store.insert_key(record(name="k3"))
    # Says why without claiming a count the API does not have ("already has 1 … keys").
    assert "no room for another" in str(refused.value)
    assert "already has" not in str(refused.value)


async def test_deleting_frees_a_place(store: KeyStore) -> None:
    """After a delete, the kind's count drops and a new key fits again."""
    await expose(store, limit=1)
    first = record(name="one")
    await store.insert_key(first)
    assert await store.delete_key("orders", first.client_id) is True
    await store.insert_key(record(name="two"))
    api = await store.get_api("orders")
    assert api is not None
    assert api.external_keys == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [("Acme", "acme"), ("ACME", "acme"), ("Straße", "STRASSE"), ("Ǆ", "ǆ")],
)
async def test_duplicate_names_compared_casefolded(
    store: KeyStore, first: str, second: str
) -> None:
    """R3: names equal under str.casefold() cannot coexist in one API, whatever the kind."""
    await expose(store)
    await store.insert_key(record(name=first, kind=INTERNAL, secret_hash="h"))
    with pytest.raises(DuplicateName):
        await store.insert_key(record(name=second, kind=EXTERNAL))
    keys = await store.list_keys("orders")
    assert [k.name for k in keys] == [first]


async def test_same_name_in_two_apis(store: KeyStore) -> None:
    """R3 is per API: two APIs may each have a key named Acme."""
    await expose(store, "a")
    await expose(store, "b")
    await store.insert_key(record("a", "Acme"))
    await store.insert_key(record("b", "Acme"))
    assert len(await store.list_keys("a")) == len(await store.list_keys("b")) == 1


async def test_name_reusable_after_delete(store: KeyStore) -> None:
    """A deleted key's name can be given to a new key."""
    await expose(store)
    rec = record(name="Acme")
    await store.insert_key(rec)
    await store.delete_key("orders", rec.client_id)
    await store.insert_key(record(name="ACME"))
    assert [k.name for k in await store.list_keys("orders")] == ["ACME"]


async def test_distinct_names_that_only_look_alike(store: KeyStore) -> None:
    """Names that differ after casefolding (accents, spacing) are distinct keys."""
    await expose(store)
    for name in ("Cafe", "Café", "Ca fe"):
        await store.insert_key(record(name=name))
    assert len(await store.list_keys("orders")) == 3


async def test_concurrent_inserts_respect_the_limit(store: KeyStore) -> None:
    """R2 holds when many tasks insert at once: exactly five per kind get in."""
    await expose(store)
    accepted: list[str] = []
    refused: list[str] = []

    async def create(i: int, kind: KeyKind) -> None:
        try:
            await store.insert_key(record(name=f"{kind.value} {i}", kind=kind))
        except KeyLimitReached:
            refused.append(kind.value)
        else:
            accepted.append(kind.value)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            for kind in KeyKind:
                tg.start_soon(create, i, kind)
    assert sorted(accepted) == ["external"] * 5 + ["internal"] * 5
    assert len(refused) == 14
    api = await store.get_api("orders")
    assert api is not None
    assert (api.internal_keys, api.external_keys) == (5, 5)


async def test_concurrent_duplicate_names(store: KeyStore) -> None:
    """R3 holds under concurrency: of many same-named inserts, exactly one wins."""
    await expose(store)
    outcomes: list[str] = []

    async def create(i: int) -> None:
        try:
            await store.insert_key(record(name="Acme" if i % 2 else "ACME"))
        except DuplicateName:
            outcomes.append("dup")
        else:
            outcomes.append("ok")

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(create, i)
    assert sorted(outcomes) == ["dup", "dup", "dup", "ok"]


# -- reading keys -----------------------------------------------------------------------------


async def test_lookup_returns_state_and_key_together(store: KeyStore) -> None:
    """lookup answers whether the API is exposed and gives the key, in one call."""
    await expose(store)
    rec = record()
    await store.insert_key(rec)
    assert await store.lookup("orders", rec.client_id) == (True, rec)
    assert await store.lookup("orders", None) == (True, None)
    assert await store.lookup("orders", new_client_id()) == (True, None)


async def test_lookup_ignores_keys_of_other_apis(store: KeyStore) -> None:
    """A key of one API is never found through another API."""
    await expose(store, "a")
    await expose(store, "b")
    rec = record("a")
    await store.insert_key(rec)
    assert await store.lookup("b", rec.client_id) == (True, None)
    assert await store.get_key("b", rec.client_id) is None


async def test_unexposed_api_keeps_its_keys(store: KeyStore) -> None:
    """R8: un-exposing keeps the keys; lookup says unexposed; re-exposing restores them."""
    await expose(store)
    rec = record()
    await store.insert_key(rec)
    await store.upsert_api(
        "orders", exposed=False, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    exposed, _ = await store.lookup("orders", rec.client_id)
    assert exposed is False
    assert await store.list_keys("orders") == [rec]
    await expose(store)
    assert await store.lookup("orders", rec.client_id) == (True, rec)


@pytest.mark.parametrize("transform", [str.upper, lambda s: s + " ", lambda s: s[:-1]])
async def test_client_ids_compare_exactly(store: KeyStore, transform: object) -> None:
    """R6: a client id in another case, or padded, or cut, finds nothing."""
    assert callable(transform)
    await expose(store)
    rec = record()
    await store.insert_key(rec)
    other = transform(rec.client_id)
    assert other != rec.client_id
    assert await store.get_key("orders", other) is None
    assert await store.lookup("orders", other) == (True, None)


async def test_list_keys_ordered_by_creation(store: KeyStore) -> None:
    """Keys are listed oldest first, whatever order their ids or names sort in."""
    await expose(store)
    recs = [
        record(name="zz", offset=0, client_id="f" * 32),
        record(name="aa", offset=5, client_id="0" * 32),
        record(name="mm", offset=10, client_id="8" * 32),
    ]
    for rec in recs:
        await store.insert_key(rec)
    assert await store.list_keys("orders") == recs


async def test_list_keys_same_timestamp_keeps_insertion_order(store: KeyStore) -> None:
    """Keys created in the same microsecond are listed in the order they were added."""
    await expose(store)
    moment = utcnow()
    recs = [
        dataclasses.replace(record(name=n, client_id=c * 32), created_at=moment)
        for n, c in (("b", "9"), ("a", "1"), ("c", "5"))
    ]
    for rec in recs:
        await store.insert_key(rec)
    assert [k.name for k in await store.list_keys("orders")] == ["b", "a", "c"]


# -- secrets and deletes (R4, R7) --------------------------------------------------------------


async def test_set_secret_hash_on_external_key(store: KeyStore) -> None:
    """An external key takes a secret hash, and a later one replaces it."""
    await expose(store)
    rec = record()
    await store.insert_key(rec)
    assert await store.set_secret_hash("orders", rec.client_id, "first") is not None
    assert await store.set_secret_hash("orders", rec.client_id, "second") is not None
    got = await store.get_key("orders", rec.client_id)
    assert got is not None
    assert got.secret_hash == "second"
    assert got.name == rec.name
    assert got.created_at == rec.created_at


async def test_set_secret_hash_refuses_internal_and_unknown(store: KeyStore) -> None:
    """R4: an internal key's hash never changes; unknown keys change nothing."""
    await expose(store)
    rec = record(kind=INTERNAL, secret_hash="original")
    await store.insert_key(rec)
    assert await store.set_secret_hash("orders", rec.client_id, "new") is None
    assert await store.set_secret_hash("orders", new_client_id(), "new") is None
    assert await store.set_secret_hash("elsewhere", rec.client_id, "new") is None
    got = await store.get_key("orders", rec.client_id)
    assert got is not None
    assert got.secret_hash == "original"


async def test_delete_key(store: KeyStore) -> None:
    """R7: a deleted key is gone from lookup, get and list; deleting again says False."""
    await expose(store)
    keep, gone = record(name="keep"), record(name="gone")
    await store.insert_key(keep)
    await store.insert_key(gone)
    assert await store.delete_key("other-api", gone.client_id) is False
    assert await store.delete_key("orders", gone.client_id) is True
    assert await store.lookup("orders", gone.client_id) == (True, None)
    assert await store.get_key("orders", gone.client_id) is None
    assert await store.list_keys("orders") == [keep]
    assert await store.delete_key("orders", gone.client_id) is False


async def test_api_names_are_case_sensitive(store: KeyStore) -> None:
    """'Orders' and 'orders' are two APIs."""
    await expose(store, "orders")
    assert await store.get_api("Orders") is None
    await store.insert_key(record("orders"))
    with pytest.raises(ApiNotExposed):
        await store.insert_key(record("Orders", name="other"))


async def test_names_keep_unicode(store: KeyStore) -> None:
    """Names with any printable Unicode (and 100 characters) are stored as given."""
    await expose(store)
    names = ["Ünïcødé 株式会社 🚀", "x" * 100]
    for name in names:
        await store.insert_key(record(name=name))
    assert [k.name for k in await store.list_keys("orders")] == names


async def test_delete_api_without_keys(store: KeyStore) -> None:
    """delete_api removes an API without keys; a second delete finds nothing."""
    await expose(store)
    assert await store.delete_api("orders", force=False) is True
    assert await store.get_api("orders") is None
    assert await store.list_apis() == []
    assert await store.lookup("orders", None) == (False, None)
    assert await store.delete_api("orders", force=False) is False


async def test_delete_api_of_an_unknown_api_is_false(store: KeyStore) -> None:
    """delete_api of an API never created changes nothing and answers False, forced or not."""
    assert await store.delete_api("nosuch", force=False) is False
    assert await store.delete_api("nosuch", force=True) is False
    assert await store.list_apis() == []


async def test_delete_api_with_keys_needs_force(store: KeyStore) -> None:
    """Without force an API with keys is ApiHasKeys and keeps every key; force deletes them."""
    await expose(store)
    await expose(store, "billing")
    kept = record(api="billing", name="Other", kind=INTERNAL, secret_hash="h")
    await store.insert_key(kept)
    doomed = record(name="Acme", kind=INTERNAL, secret_hash="h")
    await store.insert_key(doomed)
    with pytest.raises(ApiHasKeys, match=r"^API 'orders' has 1 key$"):
        await store.delete_api("orders", force=False)
    assert [k.client_id for k in await store.list_keys("orders")] == [doomed.client_id]
    assert await store.delete_api("orders", force=True) is True
    assert await store.get_api("orders") is None
    assert await store.list_keys("orders") == []
    assert await store.get_key("orders", doomed.client_id) is None
    assert await store.lookup("orders", doomed.client_id) == (False, None)
    assert [a.name for a in await store.list_apis()] == ["billing"]
    assert (await store.get_key("billing", kept.client_id)) is not None


async def test_deleted_api_can_be_created_again_empty(store: KeyStore) -> None:
    """After a forced delete the same name is a new, unexposed API without keys or names."""
    await expose(store, limit=1)
    await store.insert_key(record(name="Acme"))
    await store.delete_api("orders", force=True)
    again = await store.upsert_api(
        "orders", exposed=None, max_keys_per_kind=None, default_max_keys_per_kind=5
    )
    assert (again.exposed, again.max_keys_per_kind, again.external_keys) == (False, 5, 0)
    await expose(store)
    await store.insert_key(record(name="Acme"))  # the name is free again
    assert [k.name for k in await store.list_keys("orders")] == ["Acme"]
