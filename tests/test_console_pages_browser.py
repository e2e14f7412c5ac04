"""The console's pages of keys and search by name (issue 17), end to end in Chromium.

An API holds more keys than one page of the console (100): the sections show
the first page, "Show more keys" the next, each key once; the search box asks
the server for keys by part of their name (``?name=``), in any case; clearing
it shows every key again. The counts "n of N" stay the API's, whatever is shown.
Same set-up as ``tests/test_console_browser.py`` (real app, real SQLite, the
machine's Chromium).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from keyguard import open_store
from keyguard.models import KeyKind, KeyRecord, utcnow
from tests.browser import CHROMIUM_ARGS, PROTECTED_API, TOKEN, ConsoleServer, chromium_path

pytestmark = pytest.mark.slow

WAIT_MS = 20_000  # generous: the machine is shared and noisy
EXTERNAL_KEYS = 130  # more than one page of the console (100)
INTERNAL_KEYS = 3
INTERNAL = "Sharing within your organization"
EXTERNAL = "Sharing outside your organization"

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """The machine's Chromium, headless, for every test of this module."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def fill(url: str) -> list[KeyRecord]:
    """Expose the API with room for 130 keys a kind, and add 130 external keys ("Customer
    000" …) and 3 internal ones ("Team 0" …) straight into the store, oldest first."""

    async def go() -> list[KeyRecord]:
        store = open_store(url, cache_ttl=0)
        try:
            await store.upsert_api(
                PROTECTED_API,
                exposed=True,
                max_keys_per_kind=EXTERNAL_KEYS,
                default_max_keys_per_kind=5,
            )
            start = utcnow() - timedelta(hours=1)
            names = [(f"Customer {n:03}", KeyKind.EXTERNAL) for n in range(EXTERNAL_KEYS)]
            names[7:7] = [(f"Team {n}", KeyKind.INTERNAL) for n in range(INTERNAL_KEYS)]
            placeholder = "$pbkdf2-sha256$1$placeholder"  # internal keys always have a hash
            records = []
            for n, (name, kind) in enumerate(names):
                record = KeyRecord(
                    api=PROTECTED_API,
                    client_id=f"{n:032x}",
                    name=name,
                    kind=kind,
                    secret_hash=placeholder if kind is KeyKind.INTERNAL else None,
                    created_at=start + timedelta(milliseconds=n),
                )
                await store.insert_key(record)
                records.append(record)
            return records
        finally:
            await store.aclose()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, go()).result(timeout=120)


@pytest.fixture
def page(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    """The console signed in on an API of 133 keys, failing the test on any script error."""
    with ConsoleServer(tmp_path / "keys.db") as server:
        fill(server.url)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        tab.set_default_timeout(WAIT_MS)
        problems: list[str] = []
        tab.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        tab.goto(server.console + f"#api={PROTECTED_API}")
        tab.get_by_label("Management token").fill(TOKEN)
        tab.get_by_role("button", name="Sign in").click()
        expect(tab.get_by_role("heading", level=1, name=PROTECTED_API)).to_be_visible()
        yield tab
        context.close()
        assert problems == []


def shown_names(tab: Page, title: str) -> list[str]:
    """The key names in the section ``title``, top to bottom."""
    section = tab.get_by_role("region", name=title)
    return [name.strip() for name in section.locator("td.name").all_inner_texts()]


def count(tab: Page, kind: str) -> str:
    return tab.locator(f"#{kind}-count").inner_text().split("\n")[0].strip()


def test_show_more_pages_through_every_key_once(page: Page) -> None:
    """The first page shows 100 keys, oldest first; "Show more keys" adds the rest, each
    once, and then goes away; the counts are the API's throughout."""
    more = page.get_by_role("button", name="Show more keys")
    expect(more).to_be_visible()
    # 100 keys: the 3 internal ones (7th to 9th oldest) and 97 external ones.
    expect(page.locator("tr[data-client-id]")).to_have_count(100)
    assert shown_names(page, INTERNAL) == ["Team 0", "Team 1", "Team 2"]
    assert shown_names(page, EXTERNAL) == [f"Customer {n:03}" for n in range(97)]
    assert count(page, "external").startswith(f"{EXTERNAL_KEYS} of {EXTERNAL_KEYS}")
    expect(page.get_by_text("Showing 100 of 133 keys")).to_be_visible()
    more.click()
    expect(page.locator("tr[data-client-id]")).to_have_count(EXTERNAL_KEYS + INTERNAL_KEYS)
    names = shown_names(page, EXTERNAL)
    assert names == [f"Customer {n:03}" for n in range(EXTERNAL_KEYS)]
    assert len(set(names)) == len(names)
    expect(more).to_be_hidden()
    assert count(page, "external").startswith(f"{EXTERNAL_KEYS} of {EXTERNAL_KEYS}")
    assert count(page, "internal").startswith(f"{INTERNAL_KEYS} of {EXTERNAL_KEYS}")


def test_show_more_that_cannot_reach_the_server_says_so_in_words(page: Page) -> None:
    """A next page that fails is explained as every other failure is ("Could not reach the
    keyguard server…"), not as the error object's own text; the keys shown stay, and the
    button still offers the rest."""
    more = page.get_by_role("button", name="Show more keys")
    expect(page.locator("tr[data-client-id]")).to_have_count(100)
    page.route(re.compile(r"/keys\?.*after="), lambda route: route.abort())
    more.click()
    banner = page.locator("#page-error-text")
    expect(banner).to_have_text(re.compile("^Could not reach the keyguard server"))
    expect(page.locator("tr[data-client-id]")).to_have_count(100)
    expect(more).to_be_visible()


def test_search_finds_keys_by_part_of_the_name(page: Page) -> None:
    """Typing part of a name in any case shows only the matching keys (asked of the server,
    so keys beyond the first page are found too); clearing the search shows all again."""
    search = page.get_by_role("searchbox", name="Search keys by name")
    search.fill("cUsToMeR 12")  # Customer 120 … 129: all beyond the first page
    expect(page.locator("tr[data-client-id]")).to_have_count(10)
    assert shown_names(page, EXTERNAL) == [f"Customer {n}" for n in range(120, 130)]
    expect(page.get_by_role("region", name=INTERNAL)).to_contain_text(
        "No internal keys whose name contains “cUsToMeR 12”."
    )
    expect(page.get_by_role("button", name="Show more keys")).to_be_hidden()
    # The counts stay the API's, not the matches'.
    assert count(page, "external").startswith(f"{EXTERNAL_KEYS} of {EXTERNAL_KEYS}")
    search.fill("team")
    expect(page.locator("tr[data-client-id]")).to_have_count(INTERNAL_KEYS)
    assert shown_names(page, INTERNAL) == ["Team 0", "Team 1", "Team 2"]
    search.fill("")
    expect(page.locator("tr[data-client-id]")).to_have_count(100)
    expect(page.get_by_role("button", name="Show more keys")).to_be_visible()
    assert shown_names(page, EXTERNAL)[:3] == ["Customer 000", "Customer 001", "Customer 002"]


def test_signing_out_forgets_the_search_and_what_was_typed(page: Page) -> None:
    """Nothing of a session stays in the page: after signing out, the search box and the
    Add an API field are empty, their errors gone, and the next session, on the same API,
    lists every key rather than the last matches and shows the stored key limit rather than
    the number typed and never saved."""
    page.get_by_label("Add an API").fill("not a name!")
    page.get_by_role("button", name="Add API").click()
    expect(page.locator("#add-api-error")).to_be_visible()
    page.get_by_label("Keys allowed of each kind").fill("9")  # typed, never saved
    search = page.get_by_role("searchbox", name="Search keys by name")
    search.fill("team")
    expect(page.locator("tr[data-client-id]")).to_have_count(INTERNAL_KEYS)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Management token")).to_be_visible()
    assert page.locator("#key-search").input_value() == ""
    assert page.locator("#new-api").input_value() == ""
    assert page.locator("#add-api-error").text_content() == ""
    page.get_by_label("Management token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1, name=PROTECTED_API)).to_be_visible()
    expect(search).to_have_value("")
    expect(page.locator("#add-api-error")).to_be_hidden()
    expect(page.get_by_label("Keys allowed of each kind")).to_have_value(str(EXTERNAL_KEYS))
    expect(page.locator("tr[data-client-id]")).to_have_count(100)
    expect(page.get_by_role("button", name="Show more keys")).to_be_visible()
