"""The KeyStore contract for pages of keys (``page_keys``), run against every store.

Each test pins one promise of ``KeyStore.page_keys``: pages in ``list_keys``'s
order, cursors that survive keys created and deleted between pages, the
casefolded substring filter, and clear errors for bad input.
"""

from __future__ import annotations

import base64
import dataclasses
from datetime import timedelta

import pytest

from keyguard import KeyStore, MemoryStore
from keyguard.errors import InvalidRequest
from keyguard.models import KeyKind, KeyRecord, utcnow
from keyguard.stores._paging import MAX_PAGE_SIZE, KeyPage, decode_cursor, encode_cursor
from tests.helpers import expose, record

pytestmark = pytest.mark.anyio

INTERNAL = KeyKind.INTERNAL
EXTERNAL = KeyKind.EXTERNAL


async def every_page(
    store: KeyStore, api: str = "orders", *, limit: int, name: str | None = None
) -> list[KeyPage]:
    """Every page of a listing, following ``next`` until it is ``None``."""
    pages: list[KeyPage] = []
    after = None
    for _ in range(10_000):
        page = await store.page_keys(api, limit=limit, after=after, name=name)
        pages.append(page)
        if page.next is None:
            return pages
        after = page.next
    raise AssertionError("the listing never ended")


def keys_of(pages: list[KeyPage]) -> list[KeyRecord]:
    return [key for page in pages for key in page.keys]


_LAST_CREATED = [utcnow()]


async def add(store: KeyStore, names: list[str], kind: KeyKind = EXTERNAL) -> list[KeyRecord]:
    """Insert one key per name, each created after every key ``add`` made before (as keys
    made one after another are), and return them."""
    added = []
    for name in names:
        moment = max(utcnow(), _LAST_CREATED[0] + timedelta(microseconds=1))
        _LAST_CREATED[0] = moment
        rec = dataclasses.replace(record(name=name, kind=kind), created_at=moment)
        await store.insert_key(rec)
        added.append(rec)
    return added


async def test_unknown_or_empty_api_has_one_empty_page(store: KeyStore) -> None:
    """An API never created, or one without keys, lists as one empty page with no next."""
    assert await store.page_keys("nobody") == KeyPage([], None)
    await expose(store)
    assert await store.page_keys("orders", limit=5) == KeyPage([], None)
    assert await store.page_keys("orders", name="acme") == KeyPage([], None)


async def test_pages_follow_list_order(store: KeyStore) -> None:
    """Pages of 3 list exactly ``list_keys`` in order (3, 3, 1), the last with no next."""
    await expose(store, limit=10)
    await add(store, [f"key {i}" for i in range(7)])
    pages = await every_page(store, limit=3)
    assert [len(page.keys) for page in pages] == [3, 3, 1]
    assert keys_of(pages) == await store.list_keys("orders")
    assert [key.name for key in keys_of(pages)] == [f"key {i}" for i in range(7)]


async def test_a_full_last_page_has_no_next(store: KeyStore) -> None:
    """When the keys fill the last page exactly, it says so: no next cursor, no empty page."""
    await expose(store, limit=10)
    await add(store, [f"key {i}" for i in range(6)])
    pages = await every_page(store, limit=3)
    assert [len(page.keys) for page in pages] == [3, 3]
    assert pages[0].next is not None
    one = await store.page_keys("orders", limit=6)
    assert (len(one.keys), one.next) == (6, None)


async def test_pages_mix_both_kinds_oldest_first(store: KeyStore) -> None:
    """Both kinds share one listing, oldest first, whatever their ids or names sort as."""
    await expose(store)
    recs = [
        record(name="zz", offset=0, client_id="f" * 32, kind=INTERNAL),
        record(name="aa", offset=5, client_id="0" * 32),
        record(name="mm", offset=10, client_id="8" * 32, kind=INTERNAL),
    ]
    for rec in recs:
        await store.insert_key(rec)
    assert keys_of(await every_page(store, limit=1)) == recs


async def test_same_timestamp_pages_keep_insertion_order(store: KeyStore) -> None:
    """Keys created in the same microsecond page in insertion order, none lost at the seams."""
    await expose(store, limit=10)
    moment = utcnow()
    recs = [
        dataclasses.replace(record(name=n, client_id=c * 32), created_at=moment)
        for n, c in (("b", "9"), ("a", "1"), ("c", "5"), ("d", "3"))
    ]
    for rec in recs:
        await store.insert_key(rec)
    for limit in (1, 2, 3):
        assert [k.name for k in keys_of(await every_page(store, limit=limit))] == [
            "b",
            "a",
            "c",
            "d",
        ]


async def test_changes_between_pages_never_repeat_or_skip(store: KeyStore) -> None:
    """Keys created and deleted between pages: each key that existed throughout is listed
    exactly once and in order, no key twice, and keys created meanwhile on a later page."""
    await expose(store, limit=100)
    recs = await add(store, [f"key {i:02}" for i in range(12)])
    first = await store.page_keys("orders", limit=4)
    assert first.next is not None
    listed = [key.client_id for key in first.keys]
    # Between pages: delete keys before and after the cursor, the very key it ended at
    # included, and create new ones (newer than every key listed).
    doomed = {recs[i].client_id for i in (1, 3, 6, 7, 11)}
    assert recs[3].client_id == listed[-1]
    for client_id in doomed:
        assert await store.delete_key("orders", client_id)
    created = await add(store, ["new 1", "new 2"])
    after: str | None = first.next
    while after is not None:
        page = await store.page_keys("orders", limit=4, after=after)
        listed += [key.client_id for key in page.keys]
        after = page.next
        if after is not None:
            created += await add(store, [f"newer {len(listed)}"])
    assert len(listed) == len(set(listed))
    throughout = [r.client_id for r in recs if r.client_id not in doomed]
    assert [c for c in listed if c in throughout] == throughout
    assert set(listed) == (
        set(throughout) | {r.client_id for r in created} | {k.client_id for k in first.keys}
    )


async def test_cursor_of_a_deleted_api_lists_nothing(store: KeyStore) -> None:
    """A cursor outliving its API (deleted, created again) lists the new API's keys after it."""
    await expose(store)
    await add(store, ["a", "b", "c"])
    first = await store.page_keys("orders", limit=1)
    assert first.next is not None
    assert await store.delete_api("orders", force=True)
    await expose(store)
    assert await store.page_keys("orders", limit=1, after=first.next) == KeyPage([], None)
    later = await add(store, ["d"])
    assert (await store.page_keys("orders", after=first.next)).keys == later


async def test_name_filters_by_casefolded_substring(store: KeyStore) -> None:
    """``name`` keeps keys whose name contains it, ignoring case (casefold: ß is ss)."""
    await expose(store, limit=10)
    recs = await add(store, ["Acme Corp", "acme labs", "Beta", "Straße 1", "ACMEish", "Gamma"])
    found = keys_of(await every_page(store, limit=10, name="ACME"))
    assert [key.name for key in found] == ["Acme Corp", "acme labs", "ACMEish"]
    assert keys_of(await every_page(store, limit=10, name="STRASSE")) == [recs[3]]
    assert keys_of(await every_page(store, limit=10, name="e 1")) == [recs[3]]
    assert keys_of(await every_page(store, limit=10, name="nothing")) == []
    # Blank means no filter.
    assert keys_of(await every_page(store, limit=10, name="  ")) == recs


async def test_name_filter_treats_wildcards_as_text(store: KeyStore) -> None:
    """``%``, ``_`` and the escape characters in ``name`` match only themselves."""
    await expose(store, limit=10)
    recs = await add(store, ["100% sure", "1000 sure", "a_b", "axb", "c/d", "c\\d", "cd"])
    names = {
        "%": ["100% sure"],
        "0% ": ["100% sure"],
        "_": ["a_b"],
        "a_b": ["a_b"],
        "/": ["c/d"],
        "\\": ["c\\d"],
    }
    for needle, expected in names.items():
        found = keys_of(await every_page(store, limit=10, name=needle))
        assert [key.name for key in found] == expected, needle
    assert len(recs) == 7


async def test_filtered_pages_follow_the_order(store: KeyStore) -> None:
    """A filter over many keys pages like the listing: matches in order, each once."""
    await expose(store, limit=40)
    recs = await add(store, [f"{'even' if i % 2 == 0 else 'odd'} {i}" for i in range(30)])
    pages = await every_page(store, limit=4, name="EVEN")
    assert keys_of(pages) == [rec for rec in recs if rec.name.startswith("even")]
    assert all(len(page.keys) <= 4 for page in pages)


def small_scan_budget(store: KeyStore, budget: int) -> None:
    """Make ``store`` (SQL or Redis) look at ``budget`` keys per filtered page call; skip
    the memory store, which keeps no such bound (every key is at hand)."""
    if isinstance(store, MemoryStore):
        pytest.skip("the memory store walks a filtered listing in one call")
    store.scan_budget = budget  # type: ignore[attr-defined]


async def test_filtered_pages_stop_after_the_scan_budget(store: KeyStore) -> None:
    """With a name filter one call looks at ``scan_budget`` keys at most: a rare match
    comes after short (empty) pages with a cursor, never in one call walking every key."""
    small_scan_budget(store, 3)
    await expose(store, limit=20)
    recs = await add(store, [*(f"plain {i}" for i in range(10)), "Needle"])
    first = await store.page_keys("orders", limit=10, name="needle")
    assert first.keys == []
    assert first.next is not None
    pages = await every_page(store, limit=10, name="needle")
    assert keys_of(pages) == [recs[-1]]
    assert len(pages) >= 4  # 11 keys, 3 a call
    # Without a filter the budget does not apply: a page is as long as asked.
    assert len((await store.page_keys("orders", limit=10)).keys) == 10


async def test_filtered_short_pages_never_repeat_or_skip(store: KeyStore) -> None:
    """Filtered pages cut short by the scan budget, with keys deleted and created between
    calls: every matching key that existed throughout is listed once, in order."""
    small_scan_budget(store, 4)
    await expose(store, limit=100)
    recs = await add(store, [f"{'even' if i % 2 == 0 else 'odd'} {i:02}" for i in range(24)])
    doomed = {recs[i].client_id for i in (1, 4, 5, 9, 12, 13, 20)}
    listed: list[str] = []
    after: str | None = None
    for call in range(100):
        page = await store.page_keys("orders", limit=2, after=after, name="EVEN")
        listed += [key.client_id for key in page.keys]
        after = page.next
        if after is None:
            break
        if call == 1:
            for client_id in doomed:
                await store.delete_key("orders", client_id)
            await add(store, ["even new", "odd new"])
    assert after is None
    assert len(listed) == len(set(listed))
    throughout = [
        r.client_id for r in recs if r.client_id not in doomed and r.name.startswith("even")
    ]
    assert [c for c in listed if c in throughout] == throughout


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "nope",
        "x" * 65,
        "not a cursor!",
        "MTox",  # "1:1" (no number)
        base64.urlsafe_b64encode(b"2:1:1").decode().rstrip("="),
        base64.urlsafe_b64encode(b"1:-1:1").decode().rstrip("="),
        base64.urlsafe_b64encode(b"1:01:1").decode().rstrip("="),
        base64.urlsafe_b64encode(b"1:1:1:1").decode().rstrip("="),
        base64.urlsafe_b64encode(b"1:99999999999999999:1").decode().rstrip("="),
        base64.urlsafe_b64encode(b"1:1:99999999999999999999").decode().rstrip("="),
        base64.urlsafe_b64encode("1:\uff11:1".encode()).decode().rstrip("="),  # a wide digit
        base64.urlsafe_b64encode(b"\xff\xfe\x00\x01").decode().rstrip("="),
    ],
)
async def test_malformed_cursor_is_invalid_request(store: KeyStore, cursor: str) -> None:
    """A cursor the listing did not make (garbage, tampered, out of range) is
    ``InvalidRequest``, never a driver error."""
    await expose(store)
    with pytest.raises(InvalidRequest):
        await store.page_keys("orders", after=cursor)


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_SIZE + 1, True, 2.5, "10"])
async def test_bad_limit_is_invalid_request(store: KeyStore, limit: object) -> None:
    """A limit outside 1..1000, or not a whole number, is ``InvalidRequest``."""
    with pytest.raises(InvalidRequest):
        await store.page_keys("orders", limit=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a\x00b", "\ud800", "x" * 101, "\u202e", 5])
async def test_bad_name_filter_is_invalid_request(store: KeyStore, name: object) -> None:
    """A name filter no key name could contain (control or format characters, a lone
    surrogate, over 100 characters) or not text is ``InvalidRequest``, never a driver error."""
    await expose(store)
    with pytest.raises(InvalidRequest):
        await store.page_keys("orders", name=name)  # type: ignore[arg-type]


async def test_odd_api_names_list_nothing(store: KeyStore) -> None:
    """An API name no store could hold pages as empty, never as a driver error."""
    for api in ("x" * 300, "a\x00b"):
        assert await store.page_keys(api) == KeyPage([], None)


def test_cursor_round_trip() -> None:
    """A cursor decodes to the position it was made from, and is URL-safe text."""
    for micros, number in ((0, 0), (1_764_748_800_123_456, 42), (10**16 - 1, 2**63 - 1)):
        cursor = encode_cursor(micros, number)
        assert cursor.replace("-", "").replace("_", "").isalnum()
        assert decode_cursor(cursor) == (micros, number)
