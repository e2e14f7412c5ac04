"""The key lifecycle (SPEC §8, R10, R11) through KeyManager and the request path, on every store.

The clock the rules read is ``utcnow`` in each module of ``keyguard.manager``; tests
that need time to pass move that clock instead of sleeping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyInfo, KeyManager, KeyStore
from keyguard.errors import DuplicateName, InvalidRequest, KeyImmutable, KeyNotFound
from keyguard.manager import Denial
from keyguard.models import UNCHANGED, RateLimit, parse_duration, thaw, utcnow
from keyguard.stores.cache import CachedStore

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"
SECRET = "X-IBM-Client-Secret"


MANAGER_MODULES = (
    "keyguard.manager._manager",
    "keyguard.manager._reads",
    "keyguard.manager._requests",
)


class Clock:
    """A settable ``utcnow`` for ``keyguard.manager``."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    moved = Clock()
    for module in MANAGER_MODULES:
        monkeypatch.setattr(f"{module}.utcnow", moved)
    return moved


async def whoami(request: Request) -> JSONResponse:
    info: KeyInfo = request.state.keyguard
    return JSONResponse({"name": info.name, "meta": thaw(info.meta)})


@pytest.fixture
async def http(store: KeyStore) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=[Route("/whoami", whoami)])
    app.add_middleware(KeyGuard, store=store, api="orders")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        yield c


def refused(response: httpx.Response, message: str) -> bool:
    """Whether ``response`` is the 401 of SPEC §4 with ``message``."""
    return (
        response.status_code == 401
        and response.json()
        == {"httpCode": "401", "httpMessage": "Unauthorized", "moreInformation": message}
        and response.headers["www-authenticate"] == 'APIKey realm="orders"'
        and response.headers["cache-control"] == "no-store"
    )


# -- creation and the fields ------------------------------------------------------------------


async def test_create_with_lifecycle_fields(manager: KeyManager) -> None:
    """create_key takes expires_at (any zone, kept in UTC), enabled, meta and rate_limits."""
    await manager.expose("orders")
    issued = await manager.create_key(
        "orders",
        name="Acme",
        kind="internal",
        expires_at="2031-01-02T03:04:05.123456+02:00",
        enabled=False,
        meta={"customer": "c-42", "tags": ["gold"]},
        rate_limits=["100/minute", {"limit": 5, "per": "second"}],
    )
    assert issued.secret is not None
    expected_expiry = datetime(2031, 1, 2, 1, 4, 5, 123456, tzinfo=timezone.utc)
    got = await manager.get_key("orders", issued.client_id)
    for info in (issued, got, (await manager.list_keys("orders"))[0]):
        assert info.expires_at == expected_expiry
        assert info.enabled is False
        assert thaw(info.meta) == {"customer": "c-42", "tags": ["gold"]}
        assert info.rate_limits == (RateLimit(100, "minute"), RateLimit(5, "second"))
        assert info.last_used_at is None
        assert info.previous_secret_expires_at is None


async def test_expires_at_takes_any_number_of_second_digits(manager: KeyManager) -> None:
    """RFC 3339 allows any number of digits after the seconds: nanoseconds (Go's, Java's)
    are cut to the microseconds stores keep, one digit means tenths, a space may stand for
    the T; digits other than ASCII ones are not RFC 3339."""
    await manager.expose("orders")
    cases = {
        "2031-01-02T03:04:05.123456789Z": datetime(2031, 1, 2, 3, 4, 5, 123456),
        "2031-01-02 05:04:05.1+02:00": datetime(2031, 1, 2, 3, 4, 5, 100000),
        "2031-01-02t03:04:05.000000000001z": datetime(2031, 1, 2, 3, 4, 5),
    }
    for index, (text, expected) in enumerate(cases.items()):
        issued = await manager.create_key(
            "orders", name=f"K{index}", kind="external", expires_at=text
        )
        got = await manager.get_key("orders", issued.client_id)
        assert got.expires_at == issued.expires_at == expected.replace(tzinfo=timezone.utc)
    with pytest.raises(InvalidRequest, match="RFC 3339"):
        await manager.create_key(
            "orders", name="Arabic", kind="external", expires_at="\u0662031-01-02T03:04:05Z"
        )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (float("inf"), "too long"),
        pytest.param(10**400, "too long", id="10**400"),
        (float("nan"), "NaN"),
        (-1, "negative"),
    ],
)
def test_a_duration_out_of_range_says_why(value: object, words: str) -> None:
    """A duration past every float is "too long" and NaN is not a number of seconds; only a
    negative one "cannot be negative"."""
    with pytest.raises(InvalidRequest, match=words):
        parse_duration(value)


async def test_defaults(manager: KeyManager) -> None:
    """A key made the old way is enabled, never expires, has empty meta and inherits limits."""
    await manager.expose("orders")
    issued = await manager.create_key("orders", name="Acme", kind="external")
    got = await manager.get_key("orders", issued.client_id)
    assert (got.enabled, got.expires_at, dict(got.meta), got.rate_limits) == (True, None, {}, None)


async def test_meta_is_read_only(manager: KeyManager) -> None:
    """The app cannot change a key's meta through what it is given."""
    await manager.expose("orders")
    issued = await manager.create_key("orders", name="Acme", kind="external", meta={"a": [1]})
    with pytest.raises(TypeError):
        issued.meta["a"] = 2  # type: ignore[index]
    with pytest.raises(AttributeError):
        issued.meta["a"].append(2)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("expires_at", "2031-01-02T03:04:05", "zone"),
        ("expires_at", datetime(2031, 1, 2), "time zone"),
        ("expires_at", "tomorrow", "RFC 3339"),
        ("expires_at", 12, "RFC 3339"),
        ("meta", [1, 2], "JSON object"),
        ("meta", "not json", "JSON object"),
        ("meta", {"x": "y" * 4100}, "4096 bytes"),
        ("meta", {"x": float("nan")}, "no NaN or infinity"),
        ("enabled", "yes", "enabled"),
        ("rate_limits", [{"limit": 0, "per": "minute"}], "at least 1"),
        ("rate_limits", [{"limit": -5, "per": "minute"}], "at least 1"),
        ("rate_limits", [{"limit": 5, "per": "week"}], "unit"),
        ("rate_limits", ["1/second"] * 5, "at most 4"),
        ("rate_limits", "100/minute", "list"),
    ],
)
async def test_bad_fields_are_invalid_requests(
    manager: KeyManager, field: str, value: object, words: str
) -> None:
    """Each bad value is a clear invalid_request naming the field, at creation and update."""
    await manager.expose("orders")
    with pytest.raises(InvalidRequest, match=words) as created:
        await manager.create_key("orders", name="Acme", kind="external", **{field: value})  # type: ignore[arg-type]
    assert field.split("_")[0] in str(created.value)
    assert await manager.list_keys("orders") == []
    key = await manager.create_key("orders", name="Acme", kind="external")
    before = await manager.get_key("orders", key.client_id)
    with pytest.raises(InvalidRequest, match=words):
        await manager.update_key("orders", key.client_id, **{field: value})  # type: ignore[arg-type]
    assert await manager.get_key("orders", key.client_id) == before


async def test_an_unknown_field_is_refused(manager: KeyManager) -> None:
    """A field that does not exist is an error, not ignored."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    with pytest.raises(TypeError):
        await manager.update_key("orders", key.client_id, colour="red")  # type: ignore[call-arg]


# -- update_key ---------------------------------------------------------------------------


async def test_update_changes_only_given_fields(manager: KeyManager) -> None:
    """Each call changes its fields only; None clears expiry and inherits limits."""
    await manager.expose("orders")
    key = await manager.create_key(
        "orders", name="Acme", kind="internal", meta={"plan": "gold"}, rate_limits=[]
    )
    disabled = await manager.update_key("orders", key.client_id, enabled=False)
    assert (disabled.enabled, disabled.name, thaw(disabled.meta)) == (
        False,
        "Acme",
        {"plan": "gold"},
    )
    assert disabled.rate_limits == ()
    dated = await manager.update_key(
        "orders", key.client_id, expires_at="2030-05-05T00:00:00Z", name="  Acme\u0301 Corp "
    )
    assert dated.name == "Acm\u00e9 Corp"  # trimmed and NFC-normalized like a new name
    assert dated.expires_at == datetime(2030, 5, 5, tzinfo=timezone.utc)
    assert dated.enabled is False
    cleared = await manager.update_key(
        "orders", key.client_id, expires_at=None, meta=None, rate_limits=None
    )
    assert (cleared.expires_at, dict(cleared.meta), cleared.rate_limits) == (None, {}, None)
    same = await manager.update_key("orders", key.client_id, name=UNCHANGED)
    assert same == cleared
    assert await manager.get_key("orders", key.client_id) == cleared


async def test_rename_rules(manager: KeyManager) -> None:
    """R3 on rename: blank and clashing names are refused; the key keeps its name."""
    await manager.expose("orders")
    acme = await manager.create_key("orders", name="Acme", kind="external")
    globex = await manager.create_key("orders", name="Globex", kind="internal")
    with pytest.raises(DuplicateName):
        await manager.update_key("orders", globex.client_id, name=" acme ")
    with pytest.raises(InvalidRequest, match="blank"):
        await manager.update_key("orders", globex.client_id, name="   ")
    with pytest.raises(InvalidRequest, match="control"):
        await manager.update_key("orders", globex.client_id, name="Glo\u202ebex")
    assert (await manager.get_key("orders", globex.client_id)).name == "Globex"
    renamed = await manager.update_key("orders", acme.client_id, name="ACME")
    assert renamed.name == "ACME"


async def test_update_unknown_key(manager: KeyManager) -> None:
    """An unknown key is key_not_found."""
    await manager.expose("orders")
    with pytest.raises(KeyNotFound):
        await manager.update_key("orders", "x" * 22, enabled=False)
    with pytest.raises(KeyNotFound):
        await manager.update_key("nobody", "x" * 22, enabled=False)


# -- the request path: R10 ------------------------------------------------------------------


async def test_disabled_key_is_refused_only_with_its_credentials(
    manager: KeyManager, http: httpx.AsyncClient
) -> None:
    """A disabled key's state is told only to a caller holding its credentials."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="internal")
    assert key.secret is not None
    good = {ID: key.client_id, SECRET: key.secret}
    assert (await http.get("/whoami", headers=good)).status_code == 200
    await manager.update_key("orders", key.client_id, enabled=False)
    assert refused(await http.get("/whoami", headers=good), "Client id disabled.")
    wrong = {ID: key.client_id, SECRET: "wrong"}
    assert refused(await http.get("/whoami", headers=wrong), "Invalid client id or secret.")
    missing = {ID: key.client_id}
    assert refused(await http.get("/whoami", headers=missing), "Invalid client id or secret.")
    await manager.update_key("orders", key.client_id, enabled=True)
    assert (await http.get("/whoami", headers=good)).status_code == 200


async def test_disabled_secretless_key(manager: KeyManager, http: httpx.AsyncClient) -> None:
    """An external key without a secret: its id is its credential."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external", enabled=False)
    assert refused(await http.get("/whoami", headers={ID: key.client_id}), "Client id disabled.")
    sent = {ID: key.client_id, SECRET: "anything"}
    assert refused(await http.get("/whoami", headers=sent), "Invalid client id or secret.")


async def test_expiry_is_judged_at_each_request(
    manager: KeyManager, http: httpx.AsyncClient, clock: Clock
) -> None:
    """A key admits requests until its expires_at, then none: the clock is read per request,
    not when the key was cached or looked up."""
    await manager.expose("orders")
    key = await manager.create_key(
        "orders", name="Acme", kind="external", expires_at=utcnow() + timedelta(hours=1)
    )
    headers = {ID: key.client_id}
    assert (await http.get("/whoami", headers=headers)).status_code == 200
    clock.offset = timedelta(minutes=59, seconds=59)
    assert (await http.get("/whoami", headers=headers)).status_code == 200
    clock.offset = timedelta(hours=1)
    assert refused(await http.get("/whoami", headers=headers), "Client id expired.")
    await manager.update_key("orders", key.client_id, expires_at=None)
    assert (await http.get("/whoami", headers=headers)).status_code == 200


async def test_expiry_with_a_long_cache(store: KeyStore, clock: Clock) -> None:
    """Behind a cache that would keep the key for an hour, expiry still applies on time."""
    cached = CachedStore(store, ttl=3600)
    manager = KeyManager(cached)
    await manager.expose("orders")
    key = await manager.create_key(
        "orders", name="Acme", kind="external", expires_at=utcnow() + timedelta(minutes=10)
    )
    assert isinstance(await manager.authenticate("orders", key.client_id, None), KeyInfo)
    clock.offset = timedelta(minutes=10, seconds=1)
    assert await manager.authenticate("orders", key.client_id, None) is Denial.EXPIRED


async def test_a_time_in_the_past_expires_at_once(
    manager: KeyManager, http: httpx.AsyncClient
) -> None:
    """expires_at may be in the past: the key is expired from the start."""
    await manager.expose("orders")
    key = await manager.create_key(
        "orders", name="Acme", kind="external", expires_at="2000-01-01T00:00:00Z"
    )
    assert refused(await http.get("/whoami", headers={ID: key.client_id}), "Client id expired.")


async def test_disabled_comes_before_expired(manager: KeyManager) -> None:
    """SPEC §4's order: enabled is checked before expires_at."""
    await manager.expose("orders")
    key = await manager.create_key(
        "orders", name="Acme", kind="external", enabled=False, expires_at="2000-01-01T00:00:00Z"
    )
    assert await manager.authenticate("orders", key.client_id, None) is Denial.DISABLED


async def test_meta_reaches_the_app(manager: KeyManager, http: httpx.AsyncClient) -> None:
    """request.state.keyguard.meta is the key's meta, and follows a change at once."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external", meta={"plan": "gold"})
    response = await http.get("/whoami", headers={ID: key.client_id})
    assert response.json() == {"name": "Acme", "meta": {"plan": "gold"}}
    await manager.update_key("orders", key.client_id, meta={"plan": "platinum", "seats": 3})
    response = await http.get("/whoami", headers={ID: key.client_id})
    assert response.json()["meta"] == {"plan": "platinum", "seats": 3}


# -- rolling a secret -----------------------------------------------------------------------


async def test_the_app_sees_a_grace_period_end(manager: KeyManager, clock: Clock) -> None:
    """What the app is shown (``authenticate``'s KeyInfo, request.state.keyguard) has
    previous_secret_expires_at while the grace period lasts and None once it is over,
    though the stored record did not change and was admitted before."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    await manager.set_secret("orders", key.client_id)
    second = await manager.set_secret("orders", key.client_id, grace=3600)
    for _ in range(2):  # the second time from what was remembered of the first
        during = await manager.authenticate("orders", key.client_id, second)
        assert isinstance(during, KeyInfo)
        assert during.previous_secret_expires_at == second.previous_secret_expires_at
    clock.offset = timedelta(hours=1, seconds=1)
    after = await manager.authenticate("orders", key.client_id, second)
    assert isinstance(after, KeyInfo)
    assert after.previous_secret_expires_at is None


async def test_roll_with_grace(manager: KeyManager, http: httpx.AsyncClient, clock: Clock) -> None:
    """Both secrets verify until the deadline; then only the new one; rolling again keeps
    only the latest previous secret."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    first = await manager.set_secret("orders", key.client_id)
    assert first.previous_secret_expires_at is None
    before = utcnow()
    second = await manager.set_secret("orders", key.client_id, grace=3600)
    assert second.client_id == key.client_id
    assert second.previous_secret_expires_at is not None
    assert timedelta(0) <= second.previous_secret_expires_at - before - timedelta(hours=1)
    assert second.previous_secret_expires_at - before - timedelta(hours=1) < timedelta(minutes=1)
    info = await manager.get_key("orders", key.client_id)
    assert info.previous_secret_expires_at == second.previous_secret_expires_at

    def call(secret: str) -> dict[str, str]:
        return {ID: key.client_id, SECRET: secret}

    for secret in (first, second, first, second):  # (twice: remembered ones too)
        assert (await http.get("/whoami", headers=call(secret))).status_code == 200
    clock.offset = timedelta(hours=1, seconds=1)
    assert refused(await http.get("/whoami", headers=call(first)), "Invalid client id or secret.")
    assert (await http.get("/whoami", headers=call(second))).status_code == 200
    listed = (await manager.list_keys("orders"))[0]
    assert listed.previous_secret_expires_at is None  # the grace period is over

    clock.offset = timedelta(0)
    third = await manager.set_secret("orders", key.client_id, grace="1d")
    assert (await http.get("/whoami", headers=call(third))).status_code == 200
    assert (await http.get("/whoami", headers=call(second))).status_code == 200
    assert refused(await http.get("/whoami", headers=call(first)), "Invalid client id or secret.")
    fourth = await manager.set_secret("orders", key.client_id)
    assert fourth.previous_secret_expires_at is None
    for old in (first, second, third):
        assert refused(await http.get("/whoami", headers=call(old)), "Invalid client id or secret.")
    assert (await http.get("/whoami", headers=call(fourth))).status_code == 200


@pytest.mark.parametrize(
    "grace",
    [
        *(-1, 30 * 86400 + 1, "31d", "soon", True, float("inf"), float("nan")),
        pytest.param(10**400, id="10**400"),
        pytest.param(-(10**400), id="-10**400"),
    ],
)
async def test_bad_grace(manager: KeyManager, grace: object) -> None:
    """A grace period is 0 to 30 days; a number past any float or not a number at all is
    refused as invalid too (not an OverflowError)."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    with pytest.raises(InvalidRequest, match="grace"):
        await manager.set_secret("orders", key.client_id, grace=grace)  # type: ignore[arg-type]
    assert not (await manager.get_key("orders", key.client_id)).has_secret


async def test_internal_keys_cannot_roll(manager: KeyManager) -> None:
    """R4: no secret of an internal key changes, grace or not."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Staff", kind="internal")
    with pytest.raises(KeyImmutable):
        await manager.set_secret("orders", key.client_id, grace=60)


async def test_issued_secret_hides_itself(manager: KeyManager) -> None:
    """The returned secret is a str, but its repr does not show it."""
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    secret = await manager.set_secret("orders", key.client_id)
    assert isinstance(secret, str)
    assert str(secret) not in repr(secret)
    assert json.dumps({"s": secret}) == json.dumps({"s": str(secret)})
