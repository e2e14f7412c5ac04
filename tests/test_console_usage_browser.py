"""The console's usage chart (SPEC §5a, §10) in headless Chromium, over real traffic.

Same set-up as ``test_console_audit_browser.py``: a real management app on a
real socket over SQLite, with an admin token and a read-only one. The traffic
is real too: requests sent through a ``KeyGuard`` of the test's own over the
same SQLite file (one key rate-limited to 2 a minute, so that some are 429s),
then flushed; only the traffic of past days, which no request can make now,
is written with ``record_usage``. The page must show exactly those counts.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
from playwright.sync_api import Request as BrowserRequest
from playwright.sync_api import Route as BrowserRoute
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keyguard import KeyGuard, ReadOnly, management_app, open_store
from keyguard.models import KeyKind, KeyRecord, utcnow
from keyguard.usage import UsageCount, hour_start
from tests.browser import CHROMIUM_ARGS, PROTECTED_API, TOKEN, ConsoleServer, chromium_path

pytestmark = pytest.mark.slow

VIEWER = "console-viewer-token-0123456789-ab"
WAIT_MS = 20_000
ID = "X-IBM-Client-Id"
SECRET = "X-IBM-Client-Secret"
PHONE = {"width": 320, "height": 640}

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """The machine's Chromium, headless."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ConsoleServer]:
    """The management app with tokens ``admin`` (TOKEN) and read-only ``viewer``."""
    with ConsoleServer(tmp_path / "keys.db") as running:
        running._admin = management_app(
            running.store, tokens={"admin": TOKEN, "viewer": ReadOnly(VIEWER)}
        )
        yield running


@dataclass
class Watched:
    """A tab, and what it did that a test must fail on."""

    page: Page
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def open_tab(browser: Browser, server: ConsoleServer, width: int, height: int) -> Watched:
    context = browser.new_context(viewport={"width": width, "height": height})
    tab = Watched(context.new_page())
    tab.page.set_default_timeout(WAIT_MS)
    tab.page.on("pageerror", lambda error: tab.problems.append(f"script error: {error}"))

    def requested(request: BrowserRequest) -> None:
        tab.requests.append(request.url)
        if not request.url.startswith(server.base + "/"):
            tab.problems.append(f"request to another origin: {request.url}")

    tab.page.on("request", requested)
    return tab


@pytest.fixture
def tab(browser: Browser, server: ConsoleServer) -> Iterator[Watched]:
    """A desktop tab, failing its test on a script error or a request to another origin."""
    watched = open_tab(browser, server, 1280, 900)
    yield watched
    watched.page.context.close()
    assert watched.problems == []


def sign_in(page: Page, server: ConsoleServer, token: str) -> None:
    page.goto(server.console)
    page.get_by_label("Management token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="APIs")).to_be_visible()


# -- the data ------------------------------------------------------------------------------


def admin(server: ConsoleServer) -> httpx.Client:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.Client(base_url=server.base + "/keyguard", headers=headers)


def make_keys(server: ConsoleServer) -> dict[str, dict[str, Any]]:
    """An exposed API with three keys: Acme, Tiny (2 requests a minute) and Idle."""
    with admin(server) as client:
        assert client.put(f"/apis/{PROTECTED_API}", json={"exposed": True}).status_code == 200
        keys: dict[str, dict[str, Any]] = {}
        bodies: list[dict[str, Any]] = [
            {"name": "Acme", "kind": "internal"},
            {"name": "Tiny", "kind": "internal", "rate_limits": [{"limit": 2, "per": "minute"}]},
            {"name": "Idle", "kind": "external"},
        ]
        for body in bodies:
            created = client.post(f"/apis/{PROTECTED_API}/keys", json=body)
            assert created.status_code == 201
            keys[body["name"]] = created.json()
        return keys


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def send_traffic(
    server: ConsoleServer, plan: list[tuple[dict[str, Any], int]], past: list[UsageCount]
) -> list[int]:
    """Send ``plan``'s requests (key, how many) through a KeyGuard over the server's SQLite
    file, flush its counts, write ``past`` with ``record_usage``; the statuses answered."""

    async def run() -> list[int]:
        store = open_store(server.url, cache_ttl=0)
        guard = KeyGuard(Starlette(routes=[Route("/", _hello)]), store=store, api=PROTECTED_API)
        statuses = []
        try:
            transport = httpx.ASGITransport(app=guard)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                for key, times in plan:
                    headers = {ID: key["client_id"], SECRET: key["secret"]}
                    for _ in range(times):
                        statuses.append((await http.get("/", headers=headers)).status_code)
            assert guard.usage is not None
            await guard.usage.flush()
            if past:
                await store.record_usage(past)
        finally:
            await guard.aclose()
            await store.aclose()
        return statuses

    # Playwright's sync API keeps an event loop running in this thread.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=60)


def traffic(server: ConsoleServer) -> dict[str, dict[str, Any]]:
    """The keys, after this traffic: now, Acme 5 admitted, Tiny 2 admitted and 3 rate
    limited; 3 days ago Acme 4 and Tiny 1 rate limited; 32 days ago (outside both ranges)
    Acme 50."""
    keys = make_keys(server)
    now = hour_start(utcnow())
    past = [
        UsageCount(PROTECTED_API, keys["Acme"]["client_id"], now - timedelta(days=3), requests=4),
        UsageCount(
            PROTECTED_API, keys["Tiny"]["client_id"], now - timedelta(days=3), rate_limited=1
        ),
        UsageCount(PROTECTED_API, keys["Acme"]["client_id"], now - timedelta(days=32), requests=50),
    ]
    statuses = send_traffic(server, [(keys["Acme"], 5), (keys["Tiny"], 5)], past)
    assert statuses == [200] * 5 + [200, 200, 429, 429, 429]
    return keys


# -- reading the page ----------------------------------------------------------------------


def usage(page: Page) -> Locator:
    return page.get_by_role("region", name="Usage")


def numbers(page: Page) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The chart's table as a screen reader reads it: (admitted, rate limited) per bar, and
    the totals; opened first if it is closed. Checked against the drawn bars."""
    region = usage(page)
    table = region.get_by_role("table", name=re.compile("^Requests per"))
    if not table.is_visible():
        region.get_by_text(re.compile("^The numbers")).click()
    expect(table).to_be_visible()
    cells: list[list[str]] = table.evaluate(
        "(table) => Array.from(table.querySelectorAll('tbody tr, tfoot tr'))"
        ".map((row) => Array.from(row.cells).map((cell) => cell.textContent))"
    )
    values = [(int(row[1].replace(",", "")), int(row[2].replace(",", ""))) for row in cells]
    rows, total = values[:-1], values[-1]
    assert total == (sum(row[0] for row in rows), sum(row[1] for row in rows))
    drawn = region.locator("svg g.bar").evaluate_all(
        "(bars) => bars.map((bar) => [Number(bar.dataset.requests),"
        " Number(bar.dataset.rateLimited)])"
    )
    assert [tuple(bar) for bar in drawn] == rows
    return rows, total


def chart_image(page: Page, admitted: int, limited: int) -> Locator:
    """The chart's SVG, found by the summary in its accessible name."""
    plural = "request" if admitted == 1 else "requests"
    name = f"{admitted} {plural} admitted and {limited} rate limited"
    return usage(page).get_by_role("img", name=re.compile(re.escape(name)))


def show_range(page: Page, label: str) -> None:
    button = usage(page).get_by_role("button", name=label)
    button.click()
    expect(button).to_have_attribute("aria-pressed", "true")


def key_row(page: Page, name: str) -> Locator:
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name=name, exact=True))


# -- the tests -----------------------------------------------------------------------------


def test_the_chart_shows_the_real_counts_of_the_api_and_of_a_key(
    tab: Watched, server: ConsoleServer
) -> None:
    """The API's chart and a key's show, in their bars, their accessible name and their
    table, exactly the traffic sent: 24 hourly bars, then 30 daily ones that add the
    traffic of 3 days ago but not of 32 days ago; admitted and 429s apart."""
    traffic(server)
    page = tab.page
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    region = usage(page)
    expect(region.get_by_text("Every key of “orders”", exact=True)).to_be_visible()
    expect(chart_image(page, 7, 3)).to_be_visible()
    rows, total = numbers(page)
    assert len(rows) == 24
    assert total == (7, 3)
    assert rows[:-2] == [(0, 0)] * 22  # the traffic is in the current hour (or the last)

    show_range(page, "Last 30 days")
    expect(chart_image(page, 11, 4)).to_be_visible()
    rows, total = numbers(page)
    assert len(rows) == 30
    assert total == (11, 4)
    assert rows[-4] == (4, 1)  # three days ago: its own daily bar
    assert sum(admitted for admitted, _ in rows[:-4]) == 0  # 32 days ago is not shown

    page.get_by_role("button", name="View usage of key Tiny").click()
    expect(region.get_by_text("The key “Tiny”", exact=True)).to_be_visible()
    expect(page.get_by_role("heading", name="Usage")).to_be_focused()
    expect(chart_image(page, 2, 4)).to_be_visible()
    assert numbers(page)[1] == (2, 4)
    show_range(page, "Last 24 hours")
    expect(chart_image(page, 2, 3)).to_be_visible()
    rows, total = numbers(page)
    assert (len(rows), total) == (24, (2, 3))

    page.get_by_role("button", name="View usage of key Acme").click()
    expect(chart_image(page, 5, 0)).to_be_visible()
    page.get_by_role("button", name="Show every key").click()
    expect(region.get_by_text("Every key of “orders”", exact=True)).to_be_visible()
    expect(chart_image(page, 7, 3)).to_be_visible()


def test_a_key_deleted_elsewhere_brings_back_the_apis_chart(
    tab: Watched, server: ConsoleServer
) -> None:
    """A key whose chart is shown, deleted by someone else: the next read shows the API's
    chart again (which still counts that key's traffic), with no error."""
    keys = traffic(server)
    page = tab.page
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    page.get_by_role("button", name="View usage of key Tiny").click()
    expect(chart_image(page, 2, 3)).to_be_visible()
    with admin(server) as client:
        deleted = client.delete(f"/apis/{PROTECTED_API}/keys/{keys['Tiny']['client_id']}")
        assert deleted.status_code == 204
    show_range(page, "Last 30 days")
    expect(usage(page).get_by_text("Every key of “orders”", exact=True)).to_be_visible()
    expect(chart_image(page, 11, 4)).to_be_visible()
    expect(usage(page).get_by_role("alert")).to_be_hidden()


def test_each_key_row_shows_its_counts_and_when_it_was_last_used(
    tab: Watched, server: ConsoleServer
) -> None:
    """A key with traffic shows its requests and rate-limited count over the chart's range
    and "Last used … ago" (the exact time on hover); a key without shows neither count and
    says "Never used"."""
    traffic(server)
    page = tab.page
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(key_row(page, "Acme")).to_contain_text("Last 24 hours: 5 requests, 0 rate limited")
    expect(key_row(page, "Tiny")).to_contain_text("Last 24 hours: 2 requests, 3 rate limited")
    expect(key_row(page, "Idle")).to_contain_text("Never used")
    expect(key_row(page, "Idle")).not_to_contain_text("rate limited")
    last_used = key_row(page, "Acme").locator("time").filter(has_text=re.compile("ago|now"))
    expect(key_row(page, "Acme")).to_contain_text(
        re.compile(r"Last used (just now|\d+ minutes? ago)")
    )
    assert (last_used.get_attribute("datetime") or "").endswith("Z")
    # The hover text is the exact local time, with its year.
    assert str(utcnow().year) in (last_used.get_attribute("title") or "")
    show_range(page, "Last 30 days")
    expect(key_row(page, "Acme")).to_contain_text("Last 30 days: 9 requests, 0 rate limited")
    expect(key_row(page, "Tiny")).to_contain_text("Last 30 days: 2 requests, 4 rate limited")


def test_a_chart_without_traffic_says_so(tab: Watched, server: ConsoleServer) -> None:
    """An API whose keys sent nothing shows a chart of zeros, 24 bars, no count in any row."""
    make_keys(server)
    page = tab.page
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(chart_image(page, 0, 0)).to_be_visible()
    rows, _ = numbers(page)
    assert rows == [(0, 0)] * 24
    expect(page.get_by_text(re.compile("^Last 24 hours:"))).to_have_count(0)


def test_hours_after_the_browsers_today_count_in_the_last_day_not_the_first(
    browser: Browser, server: ConsoleServer
) -> None:
    """A browser whose clock is behind the server's (here by a day, so that the server's
    current hour falls after the browser's today) shows the latest traffic in the last daily
    bar, where it belongs, not in the oldest one, 30 days back."""
    traffic(server)
    tab = open_tab(browser, server, 1280, 900)
    page = tab.page
    try:
        page.clock.set_fixed_time(utcnow() - timedelta(days=1))
        sign_in(page, server, TOKEN)
        page.get_by_role("link", name=PROTECTED_API).click()
        expect(chart_image(page, 7, 3)).to_be_visible()
        show_range(page, "Last 30 days")
        expect(chart_image(page, 11, 4)).to_be_visible()
        rows, total = numbers(page)
        assert (len(rows), total) == (30, (11, 4))
        assert rows[-1] == (7, 3)  # the server's current hour: the latest bar
        assert rows[0] == (0, 0)
        assert tab.problems == []
    finally:
        page.context.close()


def test_a_read_only_session_can_open_charts_and_switch_ranges(
    tab: Watched, server: ConsoleServer
) -> None:
    """Reading usage changes nothing: with a read-only token, View usage and the range
    buttons work, while every control that changes something stays disabled."""
    traffic(server)
    page = tab.page
    sign_in(page, server, VIEWER)
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(page.get_by_role("note")).to_contain_text("read-only token viewer")
    expect(chart_image(page, 7, 3)).to_be_visible()
    view = page.get_by_role("button", name="View usage of key Tiny")
    expect(view).to_be_enabled()
    view.click()
    expect(chart_image(page, 2, 3)).to_be_visible()
    show_range(page, "Last 30 days")
    expect(chart_image(page, 2, 4)).to_be_visible()
    expect(page.get_by_role("button", name="Actions for key Tiny")).to_be_disabled()
    enabled = page.locator("#console button:not([disabled]):not(#retry)")
    labels = enabled.evaluate_all("(all) => all.map((b) => b.dataset.read || b.textContent)")
    assert labels
    assert set(labels) == {"true"}


def test_the_chart_fits_a_phone_width(browser: Browser, server: ConsoleServer) -> None:
    """At 320 px the chart, its switch and its table fit without sideways scrolling, and
    the chart is drawn at the width it has (its text is not shrunk)."""
    traffic(server)
    watched = open_tab(browser, server, PHONE["width"], PHONE["height"])
    page = watched.page
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    for label, admitted, limited in (("Last 24 hours", 7, 3), ("Last 30 days", 11, 4)):
        show_range(page, label)
        image = chart_image(page, admitted, limited)
        expect(image).to_be_visible()
        numbers(page)
        page.get_by_role("button", name=label).scroll_into_view_if_needed()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        box = image.bounding_box()
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= PHONE["width"]
        view_box = (image.get_attribute("viewBox") or "").split()
        assert abs(float(view_box[2]) - box["width"]) <= 1
        for name in ("Last 24 hours", "Last 30 days"):
            button = usage(page).get_by_role("button", name=name).bounding_box()
            assert button is not None
            assert button["x"] + button["width"] <= PHONE["width"]
    page.context.close()
    assert watched.problems == []


def test_the_page_asks_only_its_own_origin_for_usage(tab: Watched, server: ConsoleServer) -> None:
    """The chart's data comes from the management API's usage routes on the page's own
    origin (24 hours, then about 720 for 30 days), and nothing else is fetched."""
    keys = traffic(server)
    page = tab.page
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(chart_image(page, 7, 3)).to_be_visible()
    show_range(page, "Last 30 days")
    page.get_by_role("button", name="View usage of key Acme").click()
    expect(chart_image(page, 9, 0)).to_be_visible()
    base = f"{server.base}/keyguard/apis/{PROTECTED_API}"
    # The API's usage for the page of keys listed (?limit=100): a huge API is never read
    # whole.
    assert f"{base}/keys?limit=100" in tab.requests
    assert f"{base}/usage?hours=24&limit=100" in tab.requests
    month = [url for url in tab.requests if url.startswith(f"{base}/usage?hours=")]
    assert all(url.endswith("&limit=100") for url in month)
    hours = {int(url.split("hours=", 1)[1].split("&", 1)[0]) for url in month} - {24}
    assert hours
    assert all(697 <= value <= 721 for value in hours)
    key_base = f"{base}/keys/{keys['Acme']['client_id']}/usage?hours="
    assert any(url.startswith(key_base) for url in tab.requests)
    assert all(url.startswith(server.base + "/") for url in tab.requests)


# -- the usage lines of a large API, page after page ---------------------------------------

LARGE_KEYS = 1100  # more than the 1,000 keys of one page of the usage route
BUSY = 1050  # a key listed only after ten "Show more keys" (or found by the search)
NEARBY = 150  # a key of the console's second page


def large_name(n: int) -> str:
    return f"Customer {n:04}"


def fill_large(url: str) -> None:
    """1,100 external keys ("Customer 0000" …, oldest first) straight into the store, and
    traffic for two of them: Customer 1050 sent 7 requests and 3 rate limited this hour and
    5 three days ago; Customer 0150 sent 2 this hour, and 4 and 1 rate limited 3 days ago."""

    async def go() -> None:
        store = open_store(url, cache_ttl=0)
        try:
            await store.upsert_api(
                PROTECTED_API,
                exposed=True,
                max_keys_per_kind=LARGE_KEYS,
                default_max_keys_per_kind=5,
            )
            start = utcnow() - timedelta(hours=1)
            for n in range(LARGE_KEYS):
                record = KeyRecord(
                    api=PROTECTED_API,
                    client_id=f"{n:032x}",
                    name=large_name(n),
                    kind=KeyKind.EXTERNAL,
                    secret_hash=None,
                    created_at=start + timedelta(milliseconds=n),
                )
                await store.insert_key(record)
            now = hour_start(utcnow())
            days_ago = now - timedelta(days=3)
            busy, nearby = f"{BUSY:032x}", f"{NEARBY:032x}"
            await store.record_usage(
                [
                    UsageCount(PROTECTED_API, busy, now, requests=7, rate_limited=3),
                    UsageCount(PROTECTED_API, busy, days_ago, requests=5),
                    UsageCount(PROTECTED_API, nearby, now, requests=2),
                    UsageCount(PROTECTED_API, nearby, days_ago, requests=4, rate_limited=1),
                ]
            )
        finally:
            await store.aclose()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, go()).result(timeout=120)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleServer]:
    """A management app (tokens ``admin`` and read-only ``viewer``) over an API of 1,100
    keys, two with traffic; its tests only read, so they share it."""
    with ConsoleServer(tmp_path_factory.mktemp("large") / "keys.db") as running:
        running._admin = management_app(
            running.store, tokens={"admin": TOKEN, "viewer": ReadOnly(VIEWER)}
        )
        fill_large(running.url)
        yield running


@pytest.fixture
def large_tab(browser: Browser, large: ConsoleServer) -> Iterator[Watched]:
    """A desktop tab on the large API's server, failing its test on a script error."""
    watched = open_tab(browser, large, 1280, 900)
    yield watched
    watched.page.context.close()
    assert watched.problems == []


def large_row(page: Page, n: int) -> Locator:
    """The row of the large API's key ``n``, found by its client id: a search by role
    through 1,100 rows is too slow to poll."""
    return page.locator(f'tr[data-client-id="{n:032x}"]')


def open_large(tab: Watched, server: ConsoleServer, token: str = TOKEN) -> Page:
    """Signed in with ``token``, the large API's first page of keys shown."""
    page = tab.page
    sign_in(page, server, token)
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(page.locator("tr[data-client-id]")).to_have_count(100)
    return page


def show_every_page(page: Page) -> None:
    """ "Show more keys" until every key is listed, checking each page arrived."""
    more = page.get_by_role("button", name="Show more keys")
    for shown in range(200, LARGE_KEYS + 1, 100):
        more.click()
        expect(page.locator("tr[data-client-id]")).to_have_count(shown)


def queries(requests: list[str], server: ConsoleServer, route: str) -> list[str]:
    """The query strings of the requests to the large API's ``route`` (``keys`` or
    ``usage``), without ``hours=``, in the order they were sent."""
    prefix = f"{server.base}/keyguard/apis/{PROTECTED_API}/{route}?"
    found = []
    for url in requests:
        if url.startswith(prefix):
            parts = url[len(prefix) :].split("&")
            found.append("&".join(part for part in parts if not part.startswith("hours=")))
    return found


def test_a_key_beyond_the_first_thousand_shows_its_usage_line(
    large_tab: Watched, large: ConsoleServer
) -> None:
    """A key listed only after ten "Show more keys" (the 1,051st of 1,100) shows its totals
    like a key of the first page; the usage is read for exactly the pages listed, one
    request each, with the same ?limit=&after= (never the whole API)."""
    page = open_large(large_tab, large)
    expect(large_row(page, NEARBY)).to_have_count(0)
    show_every_page(page)
    expect(large_row(page, BUSY)).to_contain_text("Last 24 hours: 7 requests, 3 rate limited")
    expect(large_row(page, NEARBY)).to_contain_text("Last 24 hours: 2 requests, 0 rate limited")
    expect(page.locator(".usage-line:not([hidden])")).to_have_count(2)
    listed = queries(large_tab.requests, large, "keys")
    assert len(listed) == 11
    assert all(query.startswith("limit=100") for query in listed)
    assert sorted(queries(large_tab.requests, large, "usage")) == sorted(listed)


def test_a_key_found_by_the_search_shows_its_usage_line(
    large_tab: Watched, large: ConsoleServer
) -> None:
    """The search finds a key beyond the first 1,000, and its row shows its totals over
    either range, read with the search's ?name= (read-only: reading changes nothing)."""
    page = open_large(large_tab, large, VIEWER)
    expect(page.get_by_role("note")).to_contain_text("read-only token viewer")
    page.get_by_role("searchbox", name="Search keys by name").fill("tomer 1050")
    expect(page.locator("tr[data-client-id]")).to_have_count(1)
    row = large_row(page, BUSY)
    expect(row).to_contain_text("Last 24 hours: 7 requests, 3 rate limited")
    show_range(page, "Last 30 days")
    expect(row).to_contain_text("Last 30 days: 12 requests, 3 rate limited")
    assert "limit=100&name=tomer+1050" in queries(large_tab.requests, large, "usage")
    # Cleared: the first page again, whose keys sent nothing over the range; the next one
    # (read-only too) brings a key with its line.
    page.get_by_role("searchbox", name="Search keys by name").fill("")
    expect(page.locator("tr[data-client-id]")).to_have_count(100)
    expect(page.locator(".usage-line:not([hidden])")).to_have_count(0)
    page.get_by_role("button", name="Show more keys").click()
    expect(page.locator("tr[data-client-id]")).to_have_count(200)
    expect(large_row(page, NEARBY)).to_contain_text("Last 30 days: 6 requests, 1 rate limited")


def test_switching_the_range_updates_the_lines_of_later_pages(
    large_tab: Watched, large: ConsoleServer
) -> None:
    """Pages listed after a switch to 30 days get that range's totals, and each range
    button then reads the totals of every page listed again: the keys of the second and of
    the eleventh page show the counts of the range chosen."""
    page = open_large(large_tab, large)
    show_range(page, "Last 30 days")
    show_every_page(page)
    busy, nearby = large_row(page, BUSY), large_row(page, NEARBY)
    expect(busy).to_contain_text("Last 30 days: 12 requests, 3 rate limited")
    expect(nearby).to_contain_text("Last 30 days: 6 requests, 1 rate limited")
    show_range(page, "Last 24 hours")
    expect(busy).to_contain_text("Last 24 hours: 7 requests, 3 rate limited")
    expect(nearby).to_contain_text("Last 24 hours: 2 requests, 0 rate limited")
    show_range(page, "Last 30 days")
    expect(busy).to_contain_text("Last 30 days: 12 requests, 3 rate limited")
    expect(nearby).to_contain_text("Last 30 days: 6 requests, 1 rate limited")
    expect(page.locator(".usage-line:not([hidden])")).to_have_count(2)


class Held:
    """The usage requests of a tab matching ``pattern``, held back until released."""

    def __init__(self, page: Page, pattern: str) -> None:
        self.page = page
        self.pattern = re.compile(pattern)
        self.routes: list[BrowserRoute] = []

        def hold(route: BrowserRoute) -> None:
            self.routes.append(route)

        page.route(self.pattern, hold)

    def wait(self, count: int = 1) -> None:
        """Until ``count`` requests are held (the page's clock, not an assertion on it)."""
        for _ in range(400):
            if len(self.routes) >= count:
                return
            self.page.wait_for_timeout(50)
        raise AssertionError(f"{count} request(s) to {self.pattern.pattern} never came")

    def release(self) -> None:
        """Let the held requests through, then new ones too; returns once their answers
        arrived and the page had a moment to take them in."""
        for route in self.routes:

            def answered(done: BrowserRequest, request: BrowserRequest = route.request) -> bool:
                return done == request

            with self.page.expect_event("requestfinished", answered):
                route.continue_()
        self.page.unroute(self.pattern)
        self.page.wait_for_timeout(300)


def test_a_page_shown_while_the_totals_are_on_their_way_keeps_its_line(
    large_tab: Watched, large: ConsoleServer
) -> None:
    """ "Show more keys" while the first read of the totals is still on its way: the new
    page's totals, answered first, are not dropped when that read lands."""
    first = Held(large_tab.page, r"/usage\?hours=24&limit=100$")
    page = open_large(large_tab, large)
    first.wait()
    with page.expect_event("requestfinished", lambda r: "/usage?" in r.url and "after=" in r.url):
        page.get_by_role("button", name="Show more keys").click()
    expect(page.locator("tr[data-client-id]")).to_have_count(200)
    first.release()
    expect(large_row(page, NEARBY)).to_contain_text("Last 24 hours: 2 requests, 0 rate limited")
    expect(chart_image(page, 9, 3)).to_be_visible()


def test_a_page_read_in_the_old_range_and_answered_late_is_dropped(
    large_tab: Watched, large: ConsoleServer
) -> None:
    """The totals of a page added by "Show more keys" over 24 hours, answered only after a
    switch to 30 days, do not overwrite that range's counts."""
    page = open_large(large_tab, large)
    expect(chart_image(page, 9, 3)).to_be_visible()
    late = Held(page, r"/usage\?hours=24&limit=100&after=")
    page.get_by_role("button", name="Show more keys").click()
    expect(page.locator("tr[data-client-id]")).to_have_count(200)
    late.wait()
    show_range(page, "Last 30 days")
    row = large_row(page, NEARBY)
    expect(row).to_contain_text("Last 30 days: 6 requests, 1 rate limited")
    late.release()
    expect(row).to_contain_text("Last 30 days: 6 requests, 1 rate limited")
    expect(usage(page).get_by_role("alert")).to_be_hidden()
