"""KeyManager: the rules of SPEC §3 as every front door meets them, on every store."""

from __future__ import annotations

import threading

import pytest
from passlib.context import CryptContext

from keyguard import Denial, IssuedKey, KeyInfo, KeyKind, KeyManager, MemoryStore, SecretHasher
from keyguard.errors import (
    ApiHasKeys,
    ApiNotExposed,
    ApiNotFound,
    DuplicateName,
    InvalidRequest,
    KeyImmutable,
    KeyLimitReached,
    KeyNotFound,
)
from keyguard.models import RateLimit
from keyguard.secrets import could_be_client_id

pytestmark = pytest.mark.anyio


async def test_expose_creates_api_with_managers_limit() -> None:
    """An API created by a manager gets that manager's limit; later managers keep it."""
    store = MemoryStore()
    api = await KeyManager(store, max_keys_per_kind=3).expose("orders")
    assert (api.name, api.exposed, api.max_keys_per_kind) == ("orders", True, 3)
    again = await KeyManager(store, max_keys_per_kind=9).expose("orders")
    assert again.max_keys_per_kind == 3


async def test_stored_limit_is_enforced_by_every_manager() -> None:
    """SPEC §2: the limit lives with the API, so a manager with a bigger default obeys it."""
    store = MemoryStore()
    await KeyManager(store).expose("orders", max_keys_per_kind=1)
    other = KeyManager(store, max_keys_per_kind=50)
    await other.create_key("orders", name="one", kind="external")
    with pytest.raises(KeyLimitReached):
        await other.create_key("orders", name="two", kind="external")


async def test_get_api_and_list(manager: KeyManager) -> None:
    """get_api gives counts and 404s for an unknown API; list_apis lists every API."""
    with pytest.raises(ApiNotFound):
        await manager.get_api("orders")
    await manager.expose("orders")
    await manager.update_api("billing")
    await manager.create_key("orders", name="a", kind="internal")
    api = await manager.get_api("orders")
    assert (api.internal_keys, api.external_keys) == (1, 0)
    assert [(a.name, a.exposed) for a in await manager.list_apis()] == [
        ("billing", False),
        ("orders", True),
    ]


@pytest.mark.parametrize("name", ["", "-lead", "a b", "x" * 65, "é", "a/b", None, 7])
async def test_invalid_api_names(manager: KeyManager, name: object) -> None:
    """API names outside [A-Za-z0-9][A-Za-z0-9._-]{0,63} are invalid_request everywhere."""
    with pytest.raises(InvalidRequest) as info:
        await manager.expose(name)  # type: ignore[arg-type]
    assert info.value.code == "invalid_request"
    with pytest.raises(InvalidRequest):
        await manager.list_keys(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [-1, 1_000_001, 2.5, True, "5"])
async def test_invalid_limits(manager: KeyManager, limit: object) -> None:
    """max_keys_per_kind must be a whole number from 0 to 1,000,000."""
    with pytest.raises(InvalidRequest):
        await manager.expose("orders", max_keys_per_kind=limit)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        KeyManager(MemoryStore(), max_keys_per_kind=limit)  # type: ignore[arg-type]


async def test_limit_up_to_a_million(manager: KeyManager) -> None:
    """An API may hold up to 1,000,000 keys of each kind (SPEC §11): the ceiling is accepted,
    by the manager's default too."""
    api = await manager.expose("orders", max_keys_per_kind=1_000_000)
    assert api.max_keys_per_kind == 1_000_000
    assert KeyManager(MemoryStore(), max_keys_per_kind=1_000_000).max_keys_per_kind == 1_000_000


# -- creating keys ------------------------------------------------------------------------------


async def test_create_internal_key(manager: KeyManager) -> None:
    """R5/R6: an internal key comes with a generated id and a 256-bit secret, shown once."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="  Staff  ", kind=KeyKind.INTERNAL)
    assert isinstance(key, IssuedKey)
    assert key.name == "Staff"
    assert key.kind is KeyKind.INTERNAL
    assert key.has_secret is True
    assert could_be_client_id(key.client_id)
    assert key.secret is not None
    assert len(key.secret) >= 43  # 32 bytes, URL-safe base64
    assert key.secret not in repr(key)
    assert key.created_at.tzinfo is not None
    stored = await manager.get_key("orders", key.client_id)
    assert stored == KeyInfo(
        "orders", key.client_id, "Staff", KeyKind.INTERNAL, True, key.created_at
    )


async def test_secret_stored_only_as_hash(manager: KeyManager) -> None:
    """R5: the store keeps a passlib hash that verifies the secret, never the secret."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    record = await manager.store.get_key("orders", key.client_id)
    assert record is not None
    assert key.secret is not None
    assert record.secret_hash is not None
    assert key.secret not in record.secret_hash
    assert record.secret_hash.startswith("$pbkdf2-sha256$")
    assert manager.hasher.context.verify(key.secret, record.secret_hash)
    assert key.secret not in repr(record)


async def test_create_external_key(manager: KeyManager) -> None:
    """An external key has a client id and no secret at creation."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    assert key.secret is None
    assert key.has_secret is False


async def test_generated_ids_and_secrets_are_unique(manager: KeyManager) -> None:
    """Every key gets a fresh client id and secret."""
    await manager.expose("orders", max_keys_per_kind=20)
    keys = [await manager.create_key("orders", name=f"k{i}", kind="internal") for i in range(20)]
    assert len({k.client_id for k in keys}) == 20
    assert len({k.secret for k in keys}) == 20


async def test_create_requires_exposed_api(manager: KeyManager) -> None:
    """R1: no key for an unknown or unexposed API."""
    with pytest.raises(ApiNotExposed) as info:
        await manager.create_key("orders", name="Acme", kind="external")
    assert info.value.code == "api_not_exposed"
    await manager.update_api("orders")
    with pytest.raises(ApiNotExposed):
        await manager.create_key("orders", name="Acme", kind="external")


async def test_five_keys_per_kind(manager: KeyManager) -> None:
    """R2: five keys of each kind by default; the sixth is refused with key_limit_reached."""
    await manager.expose("orders")
    for kind in ("internal", "external"):
        for i in range(5):
            await manager.create_key("orders", name=f"{kind} {i}", kind=kind)
    for kind in ("internal", "external"):
        with pytest.raises(KeyLimitReached) as info:
            await manager.create_key("orders", name=f"{kind} extra", kind=kind)
        assert info.value.code == "key_limit_reached"
    assert len(await manager.list_keys("orders")) == 10


@pytest.mark.parametrize(
    "name", ["", "   ", "\t\n", "x" * 101, "bad\x00name", "line\nbreak", None, 42]
)
async def test_invalid_key_names(manager: KeyManager, name: object) -> None:
    """R3: a name is 1-100 printable characters after trimming."""
    await manager.expose("orders")
    with pytest.raises(InvalidRequest):
        await manager.create_key("orders", name=name, kind="external")  # type: ignore[arg-type]
    assert await manager.list_keys("orders") == []


@pytest.mark.parametrize(
    "name",
    [
        "\u202egnp.exe",  # right-to-left override: displays as "exe.png"
        "Ac\u200bme",  # zero-width space
        "Acme\u200d",  # zero-width joiner
        "\ufeffAcme",  # byte order mark
        "Ac\u00adme",  # soft hyphen
        "a\u2066b\u2069",  # bidi isolates
        "line\u2028sep",
        "para\u2029sep",
        "bell\x07",
    ],
)
async def test_names_with_format_or_separator_characters_are_refused(
    manager: KeyManager, name: str
) -> None:
    """R3: a name holding Cc, Cf, Zl or Zp characters is invalid_request and stores nothing."""
    await manager.expose("orders")
    with pytest.raises(InvalidRequest, match="format"):
        await manager.create_key("orders", name=name, kind="external")
    assert await manager.list_keys("orders") == []


async def test_names_are_stored_nfc_normalized(manager: KeyManager) -> None:
    """R3: a decomposed name is stored in NFC, so its composed twin is a duplicate name."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Cafe\u0301", kind="external")
    assert key.name == "Caf\u00e9"
    assert [k.name for k in await manager.list_keys("orders")] == ["Caf\u00e9"]
    with pytest.raises(DuplicateName):
        await manager.create_key("orders", name="CAF\u00c9", kind="internal")
    with pytest.raises(DuplicateName):
        await manager.create_key("orders", name="cafe\u0301", kind="internal")
    assert (await manager.find_key_by_name("orders", "CAFE\u0301")).client_id == key.client_id


async def test_name_of_100_characters_after_trimming(manager: KeyManager) -> None:
    """R3: 100 characters plus surrounding blanks is accepted and stored trimmed."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="  " + "n" * 100 + " ", kind="external")
    assert key.name == "n" * 100


async def test_duplicate_names(manager: KeyManager) -> None:
    """R3: names are unique per API, compared casefolded after trimming."""
    await manager.expose("orders")
    await manager.create_key("orders", name="Acme Corp", kind="internal")
    with pytest.raises(DuplicateName) as info:
        await manager.create_key("orders", name="  ACME CORP ", kind="external")
    assert info.value.code == "duplicate_name"


@pytest.mark.parametrize("kind", ["INTERNAL", "public", "", None, 1])
async def test_invalid_kind(manager: KeyManager, kind: object) -> None:
    """kind must be 'internal' or 'external'."""
    await manager.expose("orders")
    with pytest.raises(InvalidRequest, match="kind"):
        await manager.create_key("orders", name="x", kind=kind)  # type: ignore[arg-type]


# -- secrets ------------------------------------------------------------------------------------


async def test_set_secret_on_external_key(manager: KeyManager) -> None:
    """Set API Secret: an external key gets a generated secret, and again a new one."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    first = await manager.set_secret("orders", key.client_id)
    second = await manager.set_secret("orders", key.client_id)
    assert first != second
    assert len(first) >= 43
    assert (await manager.get_key("orders", key.client_id)).has_secret is True
    assert await manager.authenticate("orders", key.client_id, first) is Denial.INVALID_SECRET
    assert isinstance(await manager.authenticate("orders", key.client_id, second), KeyInfo)


async def test_internal_keys_are_immutable(manager: KeyManager) -> None:
    """R4: an internal key's secret can never be set or replaced."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    before = await manager.store.get_key("orders", key.client_id)
    with pytest.raises(KeyImmutable) as info:
        await manager.set_secret("orders", key.client_id)
    assert info.value.code == "key_immutable"
    assert await manager.store.get_key("orders", key.client_id) == before


async def test_unknown_keys(manager: KeyManager) -> None:
    """Every key operation on an unknown client id is key_not_found, also on unknown APIs."""
    await manager.expose("orders")
    for api in ("orders", "never-created"):
        with pytest.raises(KeyNotFound) as info:
            await manager.get_key(api, "0" * 32)
        assert info.value.code == "key_not_found"
        with pytest.raises(KeyNotFound):
            await manager.set_secret(api, "0" * 32)
        with pytest.raises(KeyNotFound):
            await manager.delete_key(api, "0" * 32)


async def test_listing_never_shows_secrets(manager: KeyManager) -> None:
    """R9: listings carry client_id, name, kind, has_secret, created_at, oldest first."""
    await manager.expose("orders")
    a = await manager.create_key("orders", name="a", kind="internal")
    b = await manager.create_key("orders", name="b", kind="external")
    listed = await manager.list_keys("orders")
    assert [k.client_id for k in listed] == [a.client_id, b.client_id]
    assert all(type(k) is KeyInfo for k in listed)
    assert a.secret is not None
    assert a.secret not in repr(listed)
    assert await manager.list_keys("never-created") == []


async def test_delete_and_find_by_name(manager: KeyManager) -> None:
    """A key can be found by its name (casefolded) and deleted; then it is gone."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    found = await manager.find_key_by_name("orders", " acme ")
    assert found.client_id == key.client_id
    await manager.delete_key("orders", key.client_id)
    with pytest.raises(KeyNotFound):
        await manager.find_key_by_name("orders", "Acme")
    assert await manager.authenticate("orders", key.client_id, None) is (
        Denial.CLIENT_ID_NOT_REGISTERED
    )


# -- authenticate -------------------------------------------------------------------------------


async def test_authenticate_order(manager: KeyManager) -> None:
    """Refusals come in SPEC §4's order: API, then client id, then secret."""
    assert await manager.authenticate("orders", None, None) is Denial.API_NOT_AVAILABLE
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    assert key.secret is not None
    assert await manager.authenticate("orders", None, key.secret) is Denial.CLIENT_ID_MISSING
    assert await manager.authenticate("orders", "f" * 32, None) is (Denial.CLIENT_ID_NOT_REGISTERED)
    assert await manager.authenticate("orders", key.client_id, None) is Denial.INVALID_SECRET
    info = await manager.authenticate("orders", key.client_id, key.secret)
    assert isinstance(info, KeyInfo)
    assert info.name == "Staff"
    await manager.unexpose("orders")
    assert await manager.authenticate("orders", key.client_id, key.secret) is (
        Denial.API_NOT_AVAILABLE
    )


async def test_slow_scheme_runs_off_the_event_loop() -> None:
    """With a custom (slow) passlib context, hashing checks run in a worker thread."""
    context = CryptContext(schemes=["pbkdf2_sha512"], pbkdf2_sha512__default_rounds=2000)
    threads: list[int] = []
    real_verify = context.verify

    def recording_verify(secret: str, hash: str) -> bool:
        threads.append(threading.get_ident())
        return bool(real_verify(secret, hash))

    context.verify = recording_verify
    manager = KeyManager(MemoryStore(), hasher=SecretHasher(context))
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    assert key.secret is not None
    record = await manager.store.get_key("orders", key.client_id)
    assert record is not None
    assert record.secret_hash is not None
    assert record.secret_hash.startswith("$pbkdf2-sha512$2000$")
    assert isinstance(await manager.authenticate("orders", key.client_id, key.secret), KeyInfo)
    assert await manager.authenticate("orders", key.client_id, "wrong") is Denial.INVALID_SECRET
    assert threads
    assert threading.get_ident() not in threads


async def test_repeat_valid_secret_skips_passlib() -> None:
    """A secret that verified once is not re-hashed on the next request; a wrong one always is."""
    context = CryptContext(schemes=["pbkdf2_sha256"], pbkdf2_sha256__default_rounds=1)
    calls: list[str] = []
    real_verify = context.verify

    def counting_verify(secret: str, hash: str) -> bool:
        calls.append(secret)
        return bool(real_verify(secret, hash))

    context.verify = counting_verify
    manager = KeyManager(MemoryStore(), hasher=SecretHasher(context, offload=False))
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    assert key.secret is not None
    for _ in range(3):
        assert isinstance(await manager.authenticate("orders", key.client_id, key.secret), KeyInfo)
    for _ in range(2):
        assert await manager.authenticate("orders", key.client_id, "bad") is Denial.INVALID_SECRET
    assert calls == [key.secret, "bad", "bad"]


def test_manager_repr() -> None:
    """A manager's repr names its store and limit."""
    assert repr(KeyManager(MemoryStore())) == (
        "KeyManager(MemoryStore(apis=0, keys=0), max_keys_per_kind=5)"
    )


async def test_unexpose_of_an_unknown_api_is_api_not_found(manager: KeyManager) -> None:
    """Un-exposing an API nobody created is ApiNotFound and creates nothing (SPEC §2)."""
    with pytest.raises(ApiNotFound):
        await manager.unexpose("nosuch")
    assert await manager.list_apis() == []


async def test_delete_api(manager: KeyManager) -> None:
    """delete_api: ApiNotFound if never created, ApiHasKeys while it has keys, force deletes all."""
    with pytest.raises(ApiNotFound):
        await manager.delete_api("orders")
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="internal")
    with pytest.raises(ApiHasKeys) as refused:
        await manager.delete_api("orders")
    assert refused.value.code == "api_has_keys"
    assert (await manager.get_api("orders")).internal_keys == 1
    await manager.delete_api("orders", force=True)
    with pytest.raises(ApiNotFound):
        await manager.get_api("orders")
    assert key.secret is not None
    assert (
        await manager.authenticate("orders", key.client_id, key.secret) is Denial.API_NOT_AVAILABLE
    )


async def test_new_api_rate_limits_apply_at_once_in_the_process_that_set_them(
    manager: KeyManager,
) -> None:
    """An API's rate limits changed (or the API deleted) through a manager apply to its next
    request at once, even on a store without a cache, whose limits the request path
    remembers for a second: the change forgets what was remembered."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    assert await manager.rate_limits_for("orders", key) == ()
    await manager.set_rate_limits("orders", ["5/second"])
    assert await manager.rate_limits_for("orders", key) == (RateLimit(5, "second"),)
    await manager.update_api("orders", rate_limits=["7/minute"])
    assert await manager.rate_limits_for("orders", key) == (RateLimit(7, "minute"),)
    await manager.delete_api("orders", force=True)
    assert await manager.rate_limits_for("orders", key) == ()
