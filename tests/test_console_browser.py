"""The web console end to end: headless Chromium driving the real page against a real app.

Each test starts a real management app (uvicorn, on a free port, the console
mounted at ``/keyguard/``) over an embedded SQLite store, next to an app
protected by ``KeyGuard``; Playwright drives the machine's Chromium through
the page as an operator would, by roles and labels. Secrets the page shows
are tried against the protected app, so "shown once" also means "works".
Every page also fails its test on a script error, a Content-Security-Policy
violation or a request to anywhere but the app itself.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    ViewportSize,
    expect,
    sync_playwright,
)

from keyguard import KeyInfo, KeyManager, open_store
from keyguard.models import thaw
from tests.browser import CHROMIUM_ARGS, PROTECTED_API, TOKEN, ConsoleServer, chromium_path

pytestmark = pytest.mark.slow

DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 320, "height": 640}  # WCAG's reflow width
WAIT_MS = 20_000  # generous: the machine is shared and noisy
SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")
CLIENT_ID = re.compile(r"^[0-9a-f]{42}$")
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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ConsoleServer]:
    """A fresh management app and protected app over a new SQLite file."""
    with ConsoleServer(tmp_path / "keys.db") as running:
        yield running


class Console:
    """The page, driven the way an operator uses it: by visible labels and roles."""

    def __init__(self, page: Page, server: ConsoleServer) -> None:
        self.page = page
        self.server = server
        self.problems: list[str] = []
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        page.on("console", self._console)
        page.on("request", self._request)

    def _console(self, message: ConsoleMessage) -> None:
        # A refused fetch is logged by Chromium itself; the tests provoke those on purpose.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.problems.append(f"console error: {message.text}")

    def _request(self, request: Request) -> None:
        if not request.url.startswith(self.server.base + "/"):
            self.problems.append(f"request to elsewhere: {request.url}")

    # -- navigation

    def open(self) -> None:
        self.page.goto(self.server.console)

    def sign_in(self, token: str = TOKEN) -> None:
        self.open()
        self.sign_in_here(token)

    def sign_in_here(self, token: str = TOKEN) -> None:
        self.page.get_by_label("Management token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("heading", name="APIs")).to_be_visible()

    def add_api(self, name: str) -> None:
        self.page.get_by_label("Add an API").fill(name)
        self.page.get_by_role("button", name="Add API").click()
        expect(self.page.get_by_role("heading", level=1, name=name)).to_be_visible()

    def open_exposed_api(self, name: str = PROTECTED_API) -> None:
        """Sign in, add the API ``name`` and expose it: where most stories start."""
        self.sign_in()
        self.add_api(name)
        self.expose()

    @property
    def switch(self) -> Locator:
        return self.page.get_by_role("switch", name="Expose Managed API")

    def expose(self) -> None:
        self.switch.click()
        expect(self.switch).to_have_attribute("aria-checked", "true")

    def section(self, title: str) -> Locator:
        return self.page.get_by_role("region", name=title)

    def row(self, name: str) -> Locator:
        return self.page.get_by_role("row").filter(
            has=self.page.get_by_role("cell", name=name, exact=True)
        )

    @property
    def dialog(self) -> Locator:
        return self.page.get_by_role("dialog")

    def start_create(self, title: str, name: str) -> None:
        self.section(title).get_by_role("button", name="Create API Key +").click()
        self.dialog.get_by_label("Key name").fill(name)
        self.dialog.get_by_role("button", name="Save", exact=True).click()

    def choose(self, key_name: str, action: str) -> None:
        """Open the ⋮ menu of the key ``key_name`` and choose ``action`` in it."""
        self.page.get_by_role("button", name=f"Actions for key {key_name}", exact=True).click()
        self.page.get_by_role("menuitem", name=action, exact=True).click()

    def status(self, key_name: str) -> Locator:
        """The Status cell of a key's row."""
        return self.row(key_name).get_by_role("cell").nth(3)

    def read_secret(self) -> tuple[str, str]:
        """The client id and secret in the open "copy it now" dialog."""
        dialog = self.page.get_by_role("dialog", name="Copy the API secret now")
        expect(dialog).to_be_visible()
        client_id = dialog.get_by_role("textbox", name="Client ID").input_value()
        secret = dialog.get_by_role("textbox", name="API secret").input_value()
        return client_id, secret

    def close_secret(self) -> None:
        self.page.get_by_role("button", name="I have copied it, close").click()
        expect(self.dialog).to_have_count(0)
        expect(self.page.locator("#secret-value")).to_have_value("")

    def create_internal(self, name: str) -> tuple[str, str]:
        self.start_create(INTERNAL, name)
        client_id, secret = self.read_secret()
        self.close_secret()
        return client_id, secret

    def create_external(self, name: str) -> str:
        self.start_create(EXTERNAL, name)
        expect(self.dialog).to_have_count(0)
        expect(self.row(name)).to_be_visible()
        return self.row(name).locator("code").inner_text()

    def everything_shown(self) -> str:
        """The page's markup, all its text and every field's current value, as one string."""
        return self.page.content() + str(
            self.page.evaluate(
                "document.body.textContent + [...document.querySelectorAll('input')]"
                ".map((field) => field.value).join(' ')"
            )
        )

    def storage(self) -> str:
        """Everything the page keeps in the browser's storage, as one string."""
        return str(
            self.page.evaluate(
                "JSON.stringify([Object.entries(sessionStorage), Object.entries(localStorage),"
                " document.cookie])"
            )
        )


@pytest.fixture
def console(browser: Browser, server: ConsoleServer) -> Iterator[Console]:
    """A new browser tab (fresh session storage) on the console, checked for problems after."""
    context = browser.new_context(viewport=DESKTOP)
    driven = Console(context.new_page(), server)
    yield driven
    context.close()
    assert driven.problems == []


def call_protected(server: ConsoleServer, client_id: str, secret: str | None = None) -> int:
    """The status the KeyGuard-protected app answers these credentials with."""
    headers = {"X-IBM-Client-Id": client_id}
    if secret is not None:
        headers["X-IBM-Client-Secret"] = secret
    return httpx.get(f"{server.base}/{PROTECTED_API}/hello", headers=headers).status_code


def admin(
    server: ConsoleServer, method: str, path: str, token: str = TOKEN, **kwargs: Any
) -> httpx.Response:
    """A call to the management API, as automation beside the console would make it."""
    response = httpx.request(
        method,
        f"{server.base}/keyguard{path}",
        headers={"Authorization": f"Bearer {token}"},
        **kwargs,
    )
    response.raise_for_status()
    return response


def stored(server: ConsoleServer, client_id: str) -> KeyInfo:
    """The key as the store now holds it, read by a KeyManager over a store of its own (in a
    thread of its own too: Playwright's sync API keeps an event loop running in this one)."""

    async def read() -> KeyInfo:
        store = open_store(server.url, cache_ttl=0)
        try:
            return await KeyManager(store).get_key(PROTECTED_API, client_id)
        finally:
            await store.aclose()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, read()).result(timeout=30)


def exposed(url: str) -> None:
    """The store at ``url`` made (its tables) with the API ``orders`` exposed, by a store of
    its own under the default timeout (in a thread of its own, as in stored())."""

    async def make() -> None:
        store = open_store(url, cache_ttl=0)
        try:
            await KeyManager(store).expose(PROTECTED_API)
        finally:
            await store.aclose()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, make()).result(timeout=60)


def api_limits(server: ConsoleServer) -> list[str]:
    """The API's rate limits as the store now holds them ("100/minute"), read like stored()."""

    async def read() -> list[str]:
        store = open_store(server.url, cache_ttl=0)
        try:
            api = await KeyManager(store).get_api(PROTECTED_API)
            return [str(limit) for limit in api.rate_limits]
        finally:
            await store.aclose()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, read()).result(timeout=30)


def key_limits(server: ConsoleServer, client_id: str) -> list[str] | None:
    """A key's own rate limits as the store holds them (None: it inherits the API's)."""
    limits = stored(server, client_id).rate_limits
    return None if limits is None else [str(limit) for limit in limits]


def limit_header(server: ConsoleServer, client_id: str) -> str | None:
    """The ``X-RateLimit-Limit`` the protected app answers this key with (None: no limit)."""
    response = httpx.get(
        f"{server.base}/{PROTECTED_API}/hello", headers={"X-IBM-Client-Id": client_id}
    )
    assert response.status_code == 200
    limit: str | None = response.headers.get("x-ratelimit-limit")
    return limit


def limit_header_becomes(server: ConsoleServer, client_id: str, expected: str | None) -> None:
    """The protected app comes to answer this key with ``expected`` as its limit header: an
    API's limits are remembered by the request path for a second (SPEC §9), so a change to
    them reaches it within that (waited for here, up to a generous bound, not timed)."""
    seen: list[str | None] = []
    for _ in range(50):
        seen.append(limit_header(server, client_id))
        if seen[-1] == expected:
            return
        time.sleep(0.2)
    raise AssertionError(f"X-RateLimit-Limit never became {expected!r}: {seen[-3:]}")


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- signing in -------------------------------------------------------------------------------


def test_token_is_asked_once_and_kept_for_the_tab_only(console: Console) -> None:
    """A wrong token is refused in words; the right one opens the console, survives a reload
    in the same tab (sessionStorage, nowhere else) and is forgotten on sign-out."""
    page = console.page
    console.open()
    token_field = page.get_by_label("Management token")
    expect(token_field).to_be_focused()
    token_field.fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text(
        "That token was not accepted. Check it and try again."
    )
    expect(page.get_by_role("heading", name="APIs")).to_be_hidden()

    token_field.fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="APIs")).to_be_visible()
    assert page.evaluate("Object.values(sessionStorage)") == [TOKEN]
    assert page.evaluate("localStorage.length") == 0

    page.reload()
    expect(page.get_by_role("heading", name="APIs")).to_be_visible()
    expect(page.get_by_label("Management token")).to_be_hidden()

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Management token")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    expect(page.get_by_label("Management token")).to_be_visible()


def test_a_token_revoked_meanwhile_sends_the_operator_back_to_sign_in(
    console: Console,
) -> None:
    """If the stored token stops working, the next call says so and asks for it again."""
    console.sign_in()
    console.page.evaluate("sessionStorage.setItem(sessionStorage.key(0), 'revoked-token')")
    console.page.reload()
    expect(console.page.get_by_role("alert")).to_have_text(
        "Your token is no longer accepted. Sign in again."
    )
    expect(console.page.get_by_label("Management token")).to_be_visible()


def test_an_app_without_a_token_opens_straight_away(browser: Browser, tmp_path: Path) -> None:
    """Under ``allow_no_auth`` (something in front authenticates) the page asks for no token."""
    with ConsoleServer(tmp_path / "open.db", token=None) as server:
        context = browser.new_context(viewport=DESKTOP)
        console = Console(context.new_page(), server)
        console.open()
        expect(console.page.get_by_role("heading", name="APIs")).to_be_visible()
        expect(console.page.get_by_label("Management token")).to_be_hidden()
        expect(console.page.get_by_role("button", name="Sign out")).to_be_hidden()
        console.add_api("open-api")
        context.close()
    assert console.problems == []


# -- the Sharing & keys flow --------------------------------------------------------------------


def test_expose_then_create_one_key_of_each_kind(console: Console) -> None:
    """The gateway's flow: add an API, see keys refused until it is exposed, expose it, create
    an internal key (its secret shown once and working) and an external key (no secret)."""
    page, server = console.page, console.server
    console.sign_in()
    expect(page.get_by_text("No APIs yet.")).to_be_visible()
    console.add_api(PROTECTED_API)
    expect(console.switch).to_have_attribute("aria-checked", "false")
    expect(page.get_by_text("This API is not exposed")).to_be_visible()

    console.start_create(INTERNAL, "Too early")
    expect(console.dialog.get_by_role("alert")).to_have_text(
        "“orders” is not exposed, so no key can be created. Turn on “Expose Managed API” first."
    )
    console.dialog.get_by_role("button", name="Cancel").click()
    expect(console.dialog).to_have_count(0)

    console.expose()
    expect(page.get_by_text("This API is not exposed")).to_be_hidden()
    expect(page.get_by_role("link", name=re.compile(r"^orders\s*Exposed$"))).to_be_visible()

    console.start_create(INTERNAL, "  Acme Corp  ")
    dialog = page.get_by_role("dialog", name="Copy the API secret now")
    expect(dialog).to_contain_text("This secret will not be shown again.")
    client_id, secret = console.read_secret()
    assert CLIENT_ID.match(client_id)
    assert SECRET.match(secret)
    assert call_protected(server, client_id, secret) == 200
    assert call_protected(server, client_id, secret[::-1]) == 401
    for _ in range(3):  # Escape must not throw away a secret not yet copied, however often
        page.keyboard.press("Escape")
        page.wait_for_timeout(100)
        expect(dialog).to_be_visible()
    expect(dialog.get_by_role("textbox", name="API secret")).to_have_value(secret)
    console.close_secret()
    assert secret not in console.everything_shown()

    internal = console.section(INTERNAL)
    expect(internal.get_by_text("1 of 5")).to_be_visible()
    row = console.row("Acme Corp")  # stored trimmed
    expect(row.get_by_role("cell").nth(1)).to_contain_text(client_id)
    expect(row.get_by_role("cell").nth(2)).to_have_text("Yes")
    expect(row.locator("time")).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT"))

    external_id = console.create_external("Globex")
    assert CLIENT_ID.match(external_id)
    expect(console.section(EXTERNAL).get_by_text("1 of 5")).to_be_visible()
    expect(console.row("Globex").get_by_role("cell").nth(2)).to_contain_text("No")
    assert call_protected(server, external_id) == 200

    page.reload()
    expect(console.row("Acme Corp")).to_be_visible()
    expect(console.row("Globex")).to_be_visible()
    assert secret not in console.everything_shown()
    assert secret not in console.storage()


def test_set_api_secret_shows_a_working_secret_once_and_can_replace_it(
    console: Console,
) -> None:
    """ "Set API Secret" on an external key shows its new secret once; setting it again asks
    first, then the old secret stops working and the new one works."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Initech")

    console.row("Initech").get_by_role("button", name="Set API Secret for Initech").click()
    shown_id, first = console.read_secret()
    assert shown_id == client_id
    assert call_protected(server, client_id, first) == 200
    assert call_protected(server, client_id) == 401
    console.close_secret()
    expect(console.row("Initech").get_by_role("cell").nth(2)).to_contain_text("Yes")

    console.row("Initech").get_by_role("button", name="Set API Secret for Initech").click()
    confirm = page.get_by_role("dialog", name="Replace the secret of “Initech”?")
    expect(confirm).to_contain_text("the current one stops working at once")
    confirm.get_by_role("button", name="Replace secret").click()
    _, second = console.read_secret()
    console.close_secret()
    assert second != first
    assert call_protected(server, client_id, first) == 401
    assert call_protected(server, client_id, second) == 200
    assert first not in console.everything_shown()
    assert second not in console.everything_shown()


def test_internal_keys_offer_no_secret_to_set(console: Console) -> None:
    """Internal keys are immutable (R4): their rows have no "Set API Secret"."""
    console.open_exposed_api()
    console.create_internal("Staff")
    row = console.row("Staff")
    expect(row.get_by_role("cell").nth(2)).to_have_text("Yes")
    expect(row.get_by_role("button", name=re.compile("Set API Secret"))).to_have_count(0)


def test_delete_asks_naming_the_key_and_cancel_keeps_it(console: Console) -> None:
    """The ⋮ menu's "Delete key" asks for confirmation naming the key; Cancel changes nothing,
    confirming deletes it and its very next request is refused."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Umbrella")
    console.create_external("Keeper")

    menu_button = page.get_by_role("button", name="Actions for key Umbrella")
    menu_button.click()
    page.get_by_role("menuitem", name="Delete key").click()
    confirm = page.get_by_role("dialog", name="Delete key “Umbrella”?")
    expect(confirm).to_contain_text(client_id)
    expect(confirm).to_contain_text("This cannot be undone.")
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    expect(console.row("Umbrella")).to_be_visible()
    assert call_protected(server, client_id) == 200

    menu_button.click()
    page.get_by_role("menuitem", name="Delete key").click()
    confirm.get_by_role("button", name="Delete key").click()
    expect(console.row("Umbrella")).to_have_count(0)
    expect(console.row("Keeper")).to_be_visible()
    expect(console.section(EXTERNAL).get_by_text("1 of 5")).to_be_visible()
    assert call_protected(server, client_id) == 401


def test_delete_api_asks_naming_the_api_and_its_key_count(console: Console) -> None:
    """ "Delete API" asks naming the API and how many keys go with it; Cancel keeps it,
    confirming deletes the API and its keys, whose next request is then refused."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Doomed")
    console.create_external("Doomed too")
    page.get_by_role("button", name="Delete API").click()
    confirm = page.get_by_role("dialog", name=f"Delete the API “{PROTECTED_API}” and its 2 keys?")
    expect(confirm).to_contain_text("(0 internal, 2 external)")
    expect(confirm).to_contain_text("This cannot be undone.")
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    assert call_protected(server, client_id) == 200

    page.get_by_role("button", name="Delete API").click()
    confirm.get_by_role("button", name="Delete API").click()
    expect(confirm).to_be_hidden()
    expect(page.get_by_role("heading", level=1, name=PROTECTED_API)).to_have_count(0)
    expect(page.get_by_role("link", name=re.compile(f"^{PROTECTED_API}"))).to_have_count(0)
    assert admin(server, "GET", "/apis").json() == {"apis": []}
    assert call_protected(server, client_id) == 404
    assert console.problems == []


# -- a key's lifecycle (SPEC §8) -------------------------------------------------------------


def test_a_key_can_be_disabled_and_enabled_from_its_menu(console: Console) -> None:
    """ "Disable key" asks first, then the key admits nothing and says "Disabled", yet is kept;
    "Enable key" makes it work again at once. The store holds each state."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Acme")
    expect(console.status("Acme")).to_contain_text("Enabled")
    expect(console.status("Acme")).to_contain_text("No expiry")

    console.choose("Acme", "Disable key")
    confirm = page.get_by_role("dialog", name="Disable key “Acme”?")
    expect(confirm).to_contain_text("until you enable it again")
    confirm.get_by_role("button", name="Cancel").click()
    assert stored(server, client_id).enabled is True
    console.choose("Acme", "Disable key")
    confirm.get_by_role("button", name="Disable key").click()
    expect(confirm).to_be_hidden()
    expect(console.status("Acme")).to_contain_text("Disabled")
    expect(page.get_by_role("button", name="Actions for key Acme")).to_be_focused()
    assert stored(server, client_id).enabled is False
    assert call_protected(server, client_id) == 401

    console.choose("Acme", "Enable key")
    expect(console.status("Acme")).to_contain_text("Enabled")
    expect(page.get_by_role("button", name="Actions for key Acme")).to_be_focused()
    assert stored(server, client_id).enabled is True
    assert call_protected(server, client_id) == 200


def test_a_key_can_be_renamed_and_a_duplicate_name_is_explained(console: Console) -> None:
    """ "Rename…" offers the current name; a name another key has (in any case) is refused in
    the dialog, naming it, and changes nothing; a new name is stored and shown, and the focus
    returns to the renamed key's menu."""
    page, server = console.page, console.server
    console.open_exposed_api()
    console.create_external("Acme")
    client_id = console.create_external("Globex")

    console.choose("Globex", "Rename…")
    dialog = page.get_by_role("dialog", name="Rename key “Globex”")
    field = dialog.get_by_label("New name")
    expect(field).to_be_focused()
    expect(field).to_have_value("Globex")
    field.fill("  ")
    dialog.get_by_role("button", name="Rename").click()
    expect(dialog.get_by_role("alert")).to_have_text("Enter a name for the key.")
    field.fill("ACME")
    field.press("Enter")
    expect(dialog.get_by_role("alert")).to_have_text(
        "A key named “ACME” already exists in this API (names are compared ignoring case). "
        "Choose another name."
    )
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_be_focused()
    assert stored(server, client_id).name == "Globex"

    field.fill(" Globex Corp ")
    dialog.get_by_role("button", name="Rename").click()
    expect(dialog).to_be_hidden()
    expect(console.row("Globex Corp")).to_be_visible()
    expect(console.row("Globex")).to_have_count(0)
    expect(page.get_by_role("button", name="Actions for key Globex Corp")).to_be_focused()
    assert stored(server, client_id).name == "Globex Corp"  # stored trimmed
    assert call_protected(server, client_id) == 200  # same client id, still working

    console.choose("Globex Corp", "Rename…")
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)
    expect(page.get_by_role("button", name="Actions for key Globex Corp")).to_be_focused()


def test_an_expiry_can_be_set_in_local_time_and_cleared(
    browser: Browser, server: ConsoleServer
) -> None:
    """ "Set or clear expiry…" turns the local time typed (here Paris, UTC+2 in May) into UTC,
    shows "Expires in …", offers "In 30 days" and "Never" (which clears it), and a time in the
    past expires the key at once; the store holds each value."""
    context = browser.new_context(viewport=DESKTOP, timezone_id="Europe/Paris")
    console = Console(context.new_page(), server)
    page = console.page
    console.open_exposed_api()
    client_id = console.create_external("Temp")

    console.choose("Temp", "Set or clear expiry…")
    dialog = page.get_by_role("dialog", name="Expiry of key “Temp”")
    expect(dialog).to_contain_text("It never expires.")
    field = dialog.get_by_label("Expires at (your local time)")
    expect(field).to_be_focused()
    expect(field).to_have_value("")
    field.fill("2031-05-06T07:08")
    dialog.get_by_role("button", name="Save expiry").click()
    expect(dialog).to_be_hidden()
    assert stored(server, client_id).expires_at == datetime(2031, 5, 6, 5, 8, tzinfo=timezone.utc)
    expect(console.status("Temp")).to_contain_text("Expires on ")
    assert call_protected(server, client_id) == 200

    console.choose("Temp", "Set or clear expiry…")
    expect(field).to_have_value("2031-05-06T07:08")
    dialog.get_by_role("button", name="Never").click()
    expect(field).to_have_value("")
    dialog.get_by_role("button", name="Save expiry").click()
    expect(dialog).to_be_hidden()
    expect(console.status("Temp")).to_contain_text("No expiry")
    assert stored(server, client_id).expires_at is None

    before = now()
    console.choose("Temp", "Set or clear expiry…")
    dialog.get_by_role("button", name="In 30 days").click()
    dialog.get_by_role("button", name="Save expiry").click()
    expect(dialog).to_be_hidden()
    after = now()
    expires = stored(server, client_id).expires_at
    assert expires is not None
    # The field holds minutes: up to a minute earlier than "now + 30 days".
    assert before + timedelta(days=30, minutes=-1) <= expires <= after + timedelta(days=30)
    expect(console.status("Temp")).to_contain_text("Expires in 30 days")

    console.choose("Temp", "Set or clear expiry…")
    field.fill("2020-01-01T00:00")
    dialog.get_by_role("button", name="Save expiry").click()
    expect(dialog).to_be_hidden()
    expect(console.status("Temp")).to_contain_text("Expired")
    assert stored(server, client_id).expires_at == datetime(2019, 12, 31, 23, tzinfo=timezone.utc)
    assert call_protected(server, client_id) == 401
    context.close()
    assert console.problems == []


def test_metadata_is_edited_as_json_with_errors_shown_in_the_dialog(console: Console) -> None:
    """ "Edit metadata…" takes a JSON object: text that is not JSON, or JSON that is not an
    object, is refused by the page; one too large is refused by the server; both say so in
    the dialog and change nothing. A valid object is stored whole and shown compactly."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Meta")

    console.choose("Meta", "Edit metadata…")
    dialog = page.get_by_role("dialog", name="Metadata of key “Meta”")
    area = dialog.get_by_label("Metadata (JSON)")
    expect(area).to_be_focused()
    expect(area).to_have_value("{}")
    save = dialog.get_by_role("button", name="Save metadata")
    area.fill('{"plan": gold}')
    save.click()
    expect(dialog.get_by_role("alert")).to_contain_text("That is not valid JSON: ")
    expect(area).to_have_attribute("aria-invalid", "true")
    area.fill("[1, 2]")
    save.click()
    expect(dialog.get_by_role("alert")).to_have_text(
        'The metadata must be a JSON object, in braces, such as {"plan": "gold"}.'
    )
    area.fill('{"blob": "' + "x" * 5000 + '"}')
    save.click()
    expect(dialog.get_by_role("alert")).to_contain_text("That was not accepted: ")
    expect(dialog.get_by_role("alert")).to_contain_text("4096")
    expect(area).to_have_attribute("aria-invalid", "true")
    assert dict(stored(server, client_id).meta) == {}

    area.fill('{"plan": "gold", "seats": 5, "owner": {"team": "ops"}}')
    save.click()
    expect(dialog).to_be_hidden()
    expect(console.status("Meta")).to_contain_text('plan: gold, seats: 5, owner: {"team":"ops"}')
    assert thaw(stored(server, client_id).meta) == {
        "plan": "gold",
        "seats": 5,
        "owner": {"team": "ops"},
    }
    console.choose("Meta", "Edit metadata…")
    expect(area).to_have_value(re.compile(r'^\{\n  "plan": "gold",'))  # shown to edit, indented
    area.fill("")
    save.click()  # empty means {}
    expect(dialog).to_be_hidden()
    expect(console.status("Meta")).not_to_contain_text("plan")
    assert dict(stored(server, client_id).meta) == {}


def test_set_api_secret_with_a_grace_period_keeps_the_previous_one_working(
    console: Console,
) -> None:
    """Replacing an external key's secret with a grace period keeps the previous secret
    working until the time the secret dialog and the key's row show; replacing it again with
    none drops every older secret at once."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Roll")
    console.row("Roll").get_by_role("button", name="Set API Secret for Roll").click()
    _, first = console.read_secret()
    console.close_secret()

    before = now()
    console.choose("Roll", "Set API Secret…")
    confirm = page.get_by_role("dialog", name="Replace the secret of “Roll”?")
    grace = confirm.get_by_label("Keep the current secret working for")
    expect(grace).to_have_value("0")
    expect(confirm).to_contain_text("the current one stops working at once")
    grace.select_option(label="7 days")
    expect(confirm).to_contain_text("the current one keeps working for 7 days")
    confirm.get_by_role("button", name="Replace secret").click()
    secret_dialog = page.get_by_role("dialog", name="Copy the API secret now")
    expect(secret_dialog).to_contain_text("Previous secret valid until ")
    _, second = console.read_secret()
    console.close_secret()
    after = now()
    assert second != first
    assert call_protected(server, client_id, first) == 200
    assert call_protected(server, client_id, second) == 200
    until = stored(server, client_id).previous_secret_expires_at
    assert until is not None
    assert before + timedelta(days=7, seconds=-1) <= until <= after + timedelta(days=7, seconds=1)
    expect(console.status("Roll")).to_contain_text("Previous secret valid until ")

    console.row("Roll").get_by_role("button", name="Set API Secret for Roll").click()
    confirm.get_by_role("button", name="Replace secret").click()  # grace: none, the default
    expect(secret_dialog).not_to_contain_text("Previous secret")
    _, third = console.read_secret()
    console.close_secret()
    assert call_protected(server, client_id, first) == 401
    assert call_protected(server, client_id, second) == 401
    assert call_protected(server, client_id, third) == 200
    assert stored(server, client_id).previous_secret_expires_at is None
    expect(console.status("Roll")).not_to_contain_text("Previous secret")


def test_replace_key_creates_a_new_internal_key_and_expires_the_old_one(
    console: Console,
) -> None:
    """ "Replace key…" on an internal key creates, in one confirmation, a new internal key
    (named "<old> (new)" unless changed, with the old one's meta and rate limits) whose
    secret is shown once, and sets the old key to expire after the grace chosen (7 days by
    default): both work
    meanwhile. A clashing name is refused and creates nothing; no grace expires it at once."""
    page, server = console.page, console.server
    admin(server, "PUT", f"/apis/{PROTECTED_API}", json={"exposed": True})
    old = admin(
        server,
        "POST",
        f"/apis/{PROTECTED_API}/keys",
        json={
            "name": "Staff",
            "kind": "internal",
            "meta": {"team": "ops"},
            "rate_limits": [{"limit": 1000, "per": "minute"}],
        },
    ).json()
    console.sign_in()
    page.get_by_role("link", name=re.compile("^orders")).click()

    before = now()
    console.choose("Staff", "Replace key…")
    confirm = page.get_by_role("dialog", name="Replace key “Staff”?")
    name = confirm.get_by_label("Name of the new key")
    expect(name).to_be_focused()
    expect(name).to_have_value("Staff (new)")
    expect(confirm.get_by_label("The old key keeps working for")).to_have_value(str(7 * 86400))
    confirm.get_by_role("button", name="Replace key").click()
    secret_dialog = page.get_by_role("dialog", name="Copy the API secret now")
    expect(secret_dialog).to_contain_text("The internal key “Staff (new)” of the API “orders”")
    expect(secret_dialog).to_contain_text("The old key “Staff” keeps working until ")
    new_id, new_secret = console.read_secret()
    console.close_secret()
    after = now()
    expect(page.get_by_role("button", name="Actions for key Staff (new)")).to_be_focused()
    assert new_id != old["client_id"]
    assert call_protected(server, new_id, new_secret) == 200
    assert call_protected(server, old["client_id"], old["secret"]) == 200  # in its grace
    new = stored(server, new_id)
    assert new.rate_limits == stored(server, old["client_id"]).rate_limits
    assert new.rate_limits is not None
    assert (new.name, new.kind.value, thaw(new.meta)) == (
        "Staff (new)",
        "internal",
        {"team": "ops"},
    )
    expires = stored(server, old["client_id"]).expires_at
    assert expires is not None
    assert before + timedelta(days=7, seconds=-1) <= expires <= after + timedelta(days=7, seconds=1)
    expect(console.status("Staff")).to_contain_text("Expires in 7 days")
    expect(console.section(INTERNAL).get_by_text("2 of 5")).to_be_visible()

    console.choose("Staff", "Replace key…")
    name.fill("staff (NEW)")
    confirm.get_by_role("button", name="Replace key").click()
    expect(confirm.get_by_role("alert")).to_contain_text("A key named “staff (NEW)” already exists")
    expect(name).to_have_attribute("aria-invalid", "true")
    assert len(admin(server, "GET", f"/apis/{PROTECTED_API}/keys").json()["keys"]) == 2

    name.fill("Staff 3")
    confirm.get_by_label("The old key keeps working for").select_option(label="None: at once")
    confirm.get_by_role("button", name="Replace key").click()
    expect(secret_dialog).to_contain_text("The old key “Staff” has expired")
    third_id, third_secret = console.read_secret()
    console.close_secret()
    assert call_protected(server, third_id, third_secret) == 200
    assert call_protected(server, old["client_id"], old["secret"]) == 401
    expect(console.status("Staff")).to_contain_text("Expired")


def test_replace_key_still_shows_the_new_secret_when_the_old_key_keeps_no_expiry(
    console: Console,
) -> None:
    """If setting the old key's expiry fails after the new key was created (here the PATCH is
    answered 503 on its way), the new secret is still shown once, and the dialog and the
    section say the old key still works and how to expire it."""
    page, server = console.page, console.server
    console.open_exposed_api()
    old_id, old_secret = console.create_internal("Ops")
    page.route(
        re.compile(rf"/keys/{old_id}$"),
        lambda route: (
            route.fulfill(
                status=503,
                content_type="application/problem+json",
                body='{"code": "store_unavailable", "status": 503}',
            )
            if route.request.method == "PATCH"
            else route.continue_()
        ),
    )
    console.choose("Ops", "Replace key…")
    page.get_by_role("dialog").get_by_role("button", name="Replace key").click()
    secret_dialog = page.get_by_role("dialog", name="Copy the API secret now")
    expect(secret_dialog).to_contain_text("The old key “Ops” could not be given an expiry")
    new_id, new_secret = console.read_secret()
    console.close_secret()
    assert call_protected(server, new_id, new_secret) == 200
    assert call_protected(server, old_id, old_secret) == 200
    assert stored(server, old_id).expires_at is None
    expect(console.section(INTERNAL).get_by_role("alert")).to_contain_text("Set or clear expiry")
    expect(console.status("Ops")).to_contain_text("No expiry")


def test_internal_keys_offer_replace_and_external_keys_set_api_secret_in_the_menu(
    console: Console,
) -> None:
    """The ⋮ menu holds every action of the key's kind, Delete last: internal keys can be
    replaced, external ones get Set API Secret."""
    page = console.page
    console.open_exposed_api()
    console.create_internal("Inside")
    console.create_external("Outside")
    common = [
        "Disable key",
        "Rename…",
        "Set or clear expiry…",
        "Edit metadata…",
        "Edit rate limits…",
    ]
    for key, special in (("Inside", "Replace key…"), ("Outside", "Set API Secret…")):
        page.get_by_role("button", name=f"Actions for key {key}").click()
        menu = page.get_by_role("menu", name=f"Actions for key {key}")
        expect(menu.get_by_role("menuitem")).to_have_text([*common, special, "Delete key"])
        page.keyboard.press("Escape")


# -- rate limits (SPEC §9) -------------------------------------------------------------------


def test_the_apis_rate_limits_are_shown_by_the_switch_and_edited_in_a_dialog(
    console: Console,
) -> None:
    """ "Edit rate limits…" by the Expose switch edits the API's list in rows of a number and
    a unit: two limits are added and saved with Enter, shown as "Rate limits: 100/minute,
    5000/day", stored, and applied to the API's keys; removing both clears them ("No rate
    limits"). Escape closes the dialog and the focus returns to its button each time."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Counted")
    summary = page.locator("#api-limits")
    edit = page.get_by_role("button", name="Edit rate limits…")
    expect(summary).to_have_text("No rate limits")
    expect(edit).to_have_accessible_description(re.compile(r"^No rate limits Each key"))

    edit.click()
    dialog = page.get_by_role("dialog", name=f"Rate limits of “{PROTECTED_API}”")
    expect(dialog.get_by_text("No limits.")).to_be_visible()
    add = dialog.get_by_role("button", name="Add a limit")
    expect(add).to_be_focused()  # no row yet: the way to add one
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(edit).to_be_focused()

    edit.click()
    add.click()
    first = dialog.get_by_label("Limit 1: requests", exact=True)
    expect(first).to_be_focused()
    expect(first).to_have_accessible_description(re.compile("at least 1"))
    expect(dialog.get_by_label("Limit 1: requests per")).to_have_value("minute")
    first.fill("100")
    add.click()
    second = dialog.get_by_label("Limit 2: requests", exact=True)
    expect(second).to_be_focused()
    second.fill("5000")
    dialog.get_by_label("Limit 2: requests per").select_option("day")
    expect(dialog.get_by_text("No limits.")).to_be_hidden()
    second.press("Enter")
    expect(dialog).to_be_hidden()
    expect(summary).to_have_text("Rate limits: 100/minute, 5000/day")
    expect(edit).to_be_focused()
    assert api_limits(server) == ["100/minute", "5000/day"]
    assert admin(server, "GET", f"/apis/{PROTECTED_API}").json()["rate_limits"] == [
        {"limit": 100, "per": "minute"},
        {"limit": 5000, "per": "day"},
    ]
    limit_header_becomes(server, client_id, "100")  # the key inherits them
    expect(console.status("Counted")).to_contain_text("Limits: the API's")

    edit.click()
    expect(first).to_have_value("100")
    expect(second).to_have_value("5000")
    expect(dialog.get_by_label("Limit 2: requests per")).to_have_value("day")
    dialog.get_by_role("button", name="Remove limit 1").click()
    # The rows are renumbered; the focus goes to the row that took the removed one's place.
    expect(first).to_have_value("5000")
    expect(first).to_be_focused()
    expect(second).to_have_count(0)
    dialog.get_by_role("button", name="Remove limit 1").click()
    expect(add).to_be_focused()
    expect(dialog.get_by_text("No limits.")).to_be_visible()
    dialog.get_by_role("button", name="Save rate limits").click()
    expect(dialog).to_be_hidden()
    expect(summary).to_have_text("No rate limits")
    assert api_limits(server) == []
    limit_header_becomes(server, client_id, None)


def test_no_more_than_four_rate_limits_can_be_added(console: Console) -> None:
    """The editor holds at most four rows: "Add a limit" is disabled at four, and enabled
    again once one is removed."""
    page = console.page
    console.open_exposed_api()
    page.get_by_role("button", name="Edit rate limits…").click()
    dialog = page.get_by_role("dialog")
    add = dialog.get_by_role("button", name="Add a limit")
    for _ in range(4):
        add.click()
    expect(dialog.get_by_role("spinbutton")).to_have_count(4)
    expect(add).to_be_disabled()
    dialog.get_by_role("button", name="Remove limit 4").click()
    expect(add).to_be_enabled()
    # The last row gone, the focus goes to the one before it.
    expect(dialog.get_by_label("Limit 3: requests", exact=True)).to_be_focused()
    dialog.get_by_role("button", name="Cancel").click()


def test_a_keys_rate_limits_can_be_its_own_unlimited_or_the_apis(console: Console) -> None:
    """ "Edit rate limits…" in a key's menu chooses between the API's limits (null), none
    ([]) and its own list (the same rows, starting from the API's): each is stored, said in
    the key's status cell and applied by the protected app; the focus returns to the menu."""
    page, server = console.page, console.server
    admin(
        server,
        "PUT",
        f"/apis/{PROTECTED_API}",
        json={"exposed": True, "rate_limits": [{"limit": 100, "per": "minute"}]},
    )
    console.sign_in()
    page.get_by_role("link", name=re.compile("^orders")).click()
    expect(page.locator("#api-limits")).to_have_text("Rate limits: 100/minute")
    client_id = console.create_external("Acme")
    status = console.status("Acme")
    expect(status).to_contain_text("Limits: the API's")
    expect(status.get_by_text("Limits: the API's")).to_have_attribute(
        "title", "The API's: 100/minute"
    )
    menu = page.get_by_role("button", name="Actions for key Acme")

    console.choose("Acme", "Edit rate limits…")
    dialog = page.get_by_role("dialog", name="Rate limits of key “Acme”")
    expect(dialog).to_contain_text("It has the API's limits now.")
    inherit = dialog.get_by_label("The API's limits (now 100/minute)")
    expect(inherit).to_be_checked()
    expect(inherit).to_be_focused()
    expect(inherit).to_have_accessible_description(re.compile("replace the API's"))
    count = dialog.get_by_label("Limit 1: requests", exact=True)
    expect(count).to_be_hidden()  # the rows are for a list of its own only
    dialog.get_by_label("Its own limits").check()
    expect(count).to_have_value("100")  # starting from the API's
    count.fill("10")
    dialog.get_by_label("Limit 1: requests per").select_option("second")
    dialog.get_by_role("button", name="Save rate limits").click()
    expect(dialog).to_be_hidden()
    expect(status).to_contain_text("Limits: 10/second")
    expect(menu).to_be_focused()
    assert key_limits(server, client_id) == ["10/second"]
    assert limit_header(server, client_id) == "10"

    console.choose("Acme", "Edit rate limits…")
    expect(dialog).to_contain_text("It has its own limits now: 10/second.")
    expect(dialog.get_by_label("Its own limits")).to_be_checked()
    expect(count).to_have_value("10")
    dialog.get_by_label("Unlimited").check()
    expect(count).to_be_hidden()
    dialog.get_by_role("button", name="Save rate limits").click()
    expect(dialog).to_be_hidden()
    expect(status).to_contain_text("Unlimited")
    expect(status).not_to_contain_text("Limits:")
    assert key_limits(server, client_id) == []
    assert limit_header(server, client_id) is None  # whatever the API says

    console.choose("Acme", "Edit rate limits…")
    expect(dialog).to_contain_text("It is unlimited now.")
    inherit.check()
    inherit.press("Enter")  # Enter saves, from the choice too
    expect(dialog).to_be_hidden()
    expect(status).to_contain_text("Limits: the API's")
    expect(menu).to_be_focused()
    assert key_limits(server, client_id) is None
    assert limit_header(server, client_id) == "100"


def test_rate_limits_the_page_refuses_are_explained_in_the_dialog(console: Console) -> None:
    """An empty number, 0 or a fraction is refused by the page, which says which limit and
    why, marks the field invalid and puts the cursor there; a key's own list with no row is
    refused too. Nothing is stored."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Acme")
    page.get_by_role("button", name="Edit rate limits…").click()
    dialog = page.get_by_role("dialog", name=f"Rate limits of “{PROTECTED_API}”")
    add = dialog.get_by_role("button", name="Add a limit")
    add.click()
    dialog.get_by_label("Limit 1: requests", exact=True).fill("60")
    add.click()
    field = dialog.get_by_label("Limit 2: requests", exact=True)
    save = dialog.get_by_role("button", name="Save rate limits")
    save.click()
    alert = dialog.get_by_role("alert")
    expect(alert).to_have_text("Enter a number of requests for limit 2, such as 100.")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_be_focused()
    expect(dialog.get_by_label("Limit 1: requests", exact=True)).to_have_attribute(
        "aria-invalid", "false"
    )
    for bad in ("0", "2.5", "-3"):
        field.fill(bad)
        field.press("Enter")
        expect(alert).to_have_text(
            "The number of requests of limit 2 must be a whole number of at least 1, such as 100."
        )
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_be_focused()
    assert api_limits(server) == []
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()

    console.choose("Acme", "Edit rate limits…")
    key_dialog = page.get_by_role("dialog", name="Rate limits of key “Acme”")
    key_dialog.get_by_label("Its own limits").check()
    key_dialog.get_by_role("button", name="Remove limit 1").click()
    key_dialog.get_by_role("button", name="Save rate limits").click()
    expect(key_dialog.get_by_role("alert")).to_have_text("Add a limit, or choose Unlimited.")
    expect(key_dialog.get_by_role("button", name="Add a limit")).to_be_focused()
    assert key_limits(server, client_id) is None


def test_a_rate_limit_the_server_refuses_is_shown_in_the_dialog(console: Console) -> None:
    """A number past the server's range gets its 422 in the dialog, in words, with the
    offending field marked and focused, for the API's list and for a key's; nothing changes
    and the dialog stays open to correct it."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Acme")
    page.get_by_role("button", name="Edit rate limits…").click()
    dialog = page.get_by_role("dialog", name=f"Rate limits of “{PROTECTED_API}”")
    add = dialog.get_by_role("button", name="Add a limit")
    add.click()
    dialog.get_by_label("Limit 1: requests", exact=True).fill("100")
    add.click()
    huge = dialog.get_by_label("Limit 2: requests", exact=True)
    huge.fill("10000000000000")
    dialog.get_by_role("button", name="Save rate limits").click()
    alert = dialog.get_by_role("alert")
    expect(alert).to_contain_text("That was not accepted: rate_limits")
    expect(huge).to_have_attribute("aria-invalid", "true")
    expect(huge).to_be_focused()
    expect(dialog).to_be_visible()
    assert api_limits(server) == []
    huge.fill("1000")
    huge.press("Enter")
    expect(dialog).to_be_hidden()
    assert api_limits(server) == ["100/minute", "1000/minute"]

    console.choose("Acme", "Edit rate limits…")
    key_dialog = page.get_by_role("dialog", name="Rate limits of key “Acme”")
    key_dialog.get_by_label("Its own limits").check()
    own = key_dialog.get_by_label("Limit 1: requests", exact=True)
    own.fill("99999999999999")
    key_dialog.get_by_role("button", name="Save rate limits").click()
    expect(key_dialog.get_by_role("alert")).to_contain_text("That was not accepted: rate_limits")
    expect(own).to_have_attribute("aria-invalid", "true")
    expect(own).to_be_focused()
    assert key_limits(server, client_id) is None
    expect(console.status("Acme")).to_contain_text("Limits: the API's")


# -- errors, in words ---------------------------------------------------------------------------


def test_the_sixth_key_of_a_kind_is_refused_with_the_limit(console: Console) -> None:
    """With five internal keys, creating a sixth says the limit was reached and creates none."""
    page, server = console.page, console.server
    admin(server, "PUT", f"/apis/{PROTECTED_API}", json={"exposed": True})
    for number in range(1, 6):
        admin(
            server,
            "POST",
            f"/apis/{PROTECTED_API}/keys",
            json={"name": f"Team {number}", "kind": "internal"},
        )
    console.sign_in()
    page.get_by_role("link", name=re.compile("^orders")).click()
    internal = console.section(INTERNAL)
    expect(internal.get_by_text("5 of 5")).to_be_visible()

    console.start_create(INTERNAL, "Team 6")
    expect(console.dialog.get_by_role("alert")).to_have_text(
        "This API already has the most internal keys it allows (5). "
        "Delete one before creating another."
    )
    console.dialog.get_by_role("button", name="Cancel").click()
    expect(internal.get_by_role("row")).to_have_count(6)  # the header and five keys
    assert len(admin(server, "GET", f"/apis/{PROTECTED_API}/keys").json()["keys"]) == 5

    # The other kind has its own five.
    console.create_external("Partner")
    expect(console.section(EXTERNAL).get_by_text("1 of 5")).to_be_visible()


def test_a_duplicate_name_is_explained(console: Console) -> None:
    """A name already used in the API, in any case, is refused in words, naming it."""
    console.open_exposed_api()
    console.create_external("Acme")
    console.start_create(INTERNAL, "ACME")
    expect(console.dialog.get_by_role("alert")).to_have_text(
        "A key named “ACME” already exists in this API (names are compared ignoring case). "
        "Choose another name."
    )
    expect(console.dialog.get_by_label("Key name")).to_have_attribute("aria-invalid", "true")


def test_bad_input_is_refused_before_and_by_the_server(console: Console) -> None:
    """A bad API name or an empty key name is explained at once; a bad limit too."""
    page = console.page
    console.sign_in()
    page.get_by_label("Add an API").fill("no spaces")
    page.get_by_role("button", name="Add API").click()
    expect(page.get_by_role("alert")).to_contain_text("“no spaces” is not a valid API name")
    console.add_api(PROTECTED_API)
    console.expose()
    console.start_create(EXTERNAL, "   ")
    expect(console.dialog.get_by_role("alert")).to_have_text("Enter a name for the key.")
    console.dialog.get_by_label("Key name").fill("Bell\u0007")
    console.dialog.get_by_role("button", name="Save", exact=True).click()
    expect(console.dialog.get_by_role("alert")).to_contain_text("That was not accepted: name")


def test_key_names_are_shown_as_text_never_as_markup(console: Console) -> None:
    """A key named like HTML is displayed literally; nothing in it runs or renders."""
    page = console.page
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    console.open_exposed_api()
    console.create_external(hostile)
    expect(console.row(hostile)).to_be_visible()
    assert page.locator("img").count() == 0
    assert page.title() != "pwned"


def test_a_store_failure_while_creating_is_explained_and_can_be_retried(
    browser: Browser, tmp_path: Path
) -> None:
    """While another process holds SQLite's write lock, creating a key says the store is not
    answering and creates nothing; once the lock is gone the same Save works."""
    database = tmp_path / "locked.db"
    # The tables first, under the default timeout: making them can take longer than the
    # test's 0.5 s on a loaded machine (set-up, not what the test is about).
    exposed(f"sqlite:///{database}")
    with ConsoleServer(database, timeout=0.5) as server:
        context = browser.new_context(viewport=DESKTOP)
        console = Console(context.new_page(), server)
        console.sign_in()
        console.page.get_by_role("link", name=re.compile(f"^{PROTECTED_API}")).click()
        expect(console.page.get_by_role("heading", level=1, name=PROTECTED_API)).to_be_visible()

        locker = sqlite3.connect(database, timeout=10, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            console.start_create(EXTERNAL, "Stark")
            expect(console.dialog.get_by_role("alert")).to_have_text(
                "The key store is not answering right now, so nothing was changed. "
                "Try again in a moment."
            )
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        console.dialog.get_by_role("button", name="Save", exact=True).click()
        expect(console.dialog).to_have_count(0)
        expect(console.row("Stark")).to_be_visible()
        expect(console.section(EXTERNAL).get_by_text("1 of 5")).to_be_visible()
        context.close()
    assert console.problems == []


def test_a_store_down_when_the_page_loads_is_explained_with_a_retry(
    browser: Browser, tmp_path: Path
) -> None:
    """When the store cannot be opened at all, the page says so and offers "Try again",
    which works once the store is back."""
    missing = tmp_path / "not-yet"
    with ConsoleServer(missing / "keys.db", timeout=0.5) as server:
        context = browser.new_context(viewport=DESKTOP)
        console = Console(context.new_page(), server)
        console.open()
        console.page.get_by_label("Management token").fill(TOKEN)
        console.page.get_by_role("button", name="Sign in").click()
        alert = console.page.get_by_role("alert").filter(has_text="key store")
        expect(alert).to_contain_text(
            "The key store is not answering right now, so nothing was changed."
        )
        missing.mkdir()
        console.page.get_by_role("button", name="Try again").click()
        expect(alert).to_be_hidden()
        console.add_api(PROTECTED_API)
        context.close()
    assert console.problems == []


# -- usable by everyone -------------------------------------------------------------------------


def test_keyboard_alone_creates_and_deletes_a_key(console: Console) -> None:
    """Every step works from the keyboard, focus lands where the next step is (and comes back
    where it was after each dialog), and the focused control is visibly outlined."""
    page = console.page
    console.sign_in()
    console.add_api(PROTECTED_API)
    expect(page.get_by_role("heading", level=1, name=PROTECTED_API)).to_be_focused()
    console.expose()
    create = console.section(INTERNAL).get_by_role("button", name="Create API Key +")
    tab_to(page, create)
    assert create.evaluate("node => getComputedStyle(node).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    name = console.dialog.get_by_label("Key name")
    expect(name).to_be_focused()
    page.keyboard.type("Keyboard user")
    page.keyboard.press("Enter")
    expect(page.get_by_role("dialog", name="Copy the API secret now")).to_be_visible()
    expect(page.get_by_role("textbox", name="API secret")).to_be_focused()
    done = page.get_by_role("button", name="I have copied it, close")
    tab_to(page, done)
    assert done.evaluate("node => getComputedStyle(node).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    expect(console.dialog).to_have_count(0)
    expect(create).to_be_focused()  # back where the dialog was opened from

    menu_button = page.get_by_role("button", name="Actions for key Keyboard user")
    tab_to(page, menu_button)
    page.keyboard.press("Enter")
    first = page.get_by_role("menuitem", name="Disable key")
    item = page.get_by_role("menuitem", name="Delete key")  # the last one
    expect(first).to_be_focused()
    page.keyboard.press("End")
    expect(item).to_be_focused()
    page.keyboard.press("ArrowDown")  # round to the first
    expect(first).to_be_focused()
    page.keyboard.press("Escape")
    expect(item).to_be_hidden()
    expect(menu_button).to_be_focused()
    expect(menu_button).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("ArrowUp")  # opens on the last item
    expect(item).to_be_focused()
    page.keyboard.press("Enter")
    confirm = page.get_by_role("dialog", name="Delete key “Keyboard user”?")
    expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()  # the safe choice
    page.keyboard.press("Escape")
    expect(confirm).to_be_hidden()
    expect(menu_button).to_be_focused()
    expect(console.row("Keyboard user")).to_be_visible()

    page.keyboard.press("Enter")
    page.keyboard.press("End")
    page.keyboard.press("Enter")
    expect(confirm.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Tab")
    expect(confirm.get_by_role("button", name="Delete key")).to_be_focused()
    page.keyboard.press("Enter")
    expect(console.row("Keyboard user")).to_have_count(0)
    expect(page.get_by_role("heading", name=INTERNAL)).to_be_focused()


def tab_to(page: Page, target: Locator, limit: int = 40) -> None:
    """Press Tab until ``target`` has the focus, as a keyboard user would (fails past ``limit``)."""
    for _ in range(limit):
        if target.evaluate("node => node === document.activeElement"):
            return
        page.keyboard.press("Tab")
    expect(target).to_be_focused()


def test_every_control_has_a_name(console: Console) -> None:
    """Every input has a label and every button a name a screen reader can say."""
    console.open_exposed_api()
    console.create_internal("Labelled")
    console.create_external("Also labelled")
    # A name must hold a word: "⋮" or "+" alone says nothing to a screen reader.
    unnamed = console.page.evaluate(
        """() => [...document.querySelectorAll('input, button, [role=switch]')]
              .filter((node) => {
                const named = (text) => /\\p{L}{2}/u.test(text || '');
                if (node.tagName === 'INPUT') {
                  const label = [...node.labels].map((label) => label.textContent).join(' ');
                  return !named(label) && !named(node.getAttribute('aria-label'));
                }
                return !named(node.getAttribute('aria-label') || node.textContent);
              })
              .map((node) => node.outerHTML)"""
    )
    assert unnamed == []
    expect(console.page.get_by_role("spinbutton", name="Keys allowed of each kind")).to_be_visible()


def test_phone_width_needs_no_sideways_scrolling(browser: Browser, server: ConsoleServer) -> None:
    """At 320 px the page fits, with 100-character names and with a dialog open: nothing
    scrolls sideways and every action is within reach; nor does anything at wider widths."""
    long_name = "A customer with a very long name " * 3
    long_name = long_name[:100].strip()
    context = browser.new_context(viewport=PHONE)
    console = Console(context.new_page(), server)
    page = console.page
    console.open_exposed_api()
    console.create_internal(long_name)
    console.create_external("Phone")

    def overflow(selector: str) -> int:
        return int(page.evaluate(f"(n => n.scrollWidth - n.clientWidth)({selector})"))

    assert overflow("document.documentElement") <= 0
    for button in (
        page.get_by_role("button", name="Actions for key Phone"),
        page.get_by_role("button", name="Set API Secret for Phone"),
        page.get_by_role("button", name=f"Actions for key {long_name}"),
    ):
        box = button.bounding_box()
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= PHONE["width"]
    page.get_by_role("button", name=f"Actions for key {long_name}").click()
    page.get_by_role("menuitem", name="Delete key").click()
    expect(page.get_by_role("dialog")).to_be_visible()
    assert overflow("document.querySelector('dialog[open]')") <= 0
    assert overflow("document.documentElement") <= 0
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    # The dialogs with fields fit too.
    for key, action in (
        (long_name, "Replace key…"),
        ("Phone", "Set or clear expiry…"),
        ("Phone", "Edit metadata…"),
        ("Phone", "Edit rate limits…"),
    ):
        console.choose(key, action)
        expect(page.get_by_role("dialog")).to_be_visible()
        assert overflow("document.querySelector('dialog[open]')") <= 0, action
        assert overflow("document.documentElement") <= 0, action
        save = page.get_by_role("dialog").locator("#confirm-ok").bounding_box()
        assert save is not None
        assert save["x"] + save["width"] <= PHONE["width"], action
        page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    # The rate limit editors fit with their four rows, for the API and for a key.
    for of_key in (False, True):
        if of_key:
            console.choose("Phone", "Edit rate limits…")
        else:
            page.get_by_role("button", name="Edit rate limits…").click()
        dialog = page.get_by_role("dialog")
        if of_key:
            dialog.get_by_label("Its own limits").check()
        add = dialog.get_by_role("button", name="Add a limit")
        while add.is_enabled():
            add.click()
        dialog.get_by_label("Limit 4: requests", exact=True).fill("1000000000000")
        assert overflow("document.querySelector('dialog[open]')") <= 0
        assert overflow("document.documentElement") <= 0
        for control in (dialog.get_by_role("button", name="Remove limit 4"), add):
            box = control.bounding_box()
            assert box is not None
            assert box["x"] + box["width"] <= PHONE["width"]
        dialog.get_by_role("button", name="Cancel").click()

    # Nor at any width in between, where the key tables turn into cards.
    for width in (480, 768, 800, 900, 1024, 1100, 1280, 1600):
        page.set_viewport_size({"width": width, "height": 800})
        widest = page.evaluate(
            "Math.max(...[document.documentElement, ...document.querySelectorAll('.card')]"
            ".map((node) => node.scrollWidth - node.clientWidth))"
        )
        assert widest <= 0, f"{widest} px too wide at {width} px"
    context.close()
    assert console.problems == []


def test_the_limit_can_be_changed_from_the_page(console: Console) -> None:
    """ "Keys allowed of each kind" sets the API's limit; lowering it below the count deletes
    nothing and blocks the next key."""
    page = console.page
    console.open_exposed_api()
    console.create_external("One")
    console.create_external("Two")
    page.get_by_label("Keys allowed of each kind").fill("1")
    page.get_by_role("button", name="Save limit").click()
    external = console.section(EXTERNAL)
    expect(external.get_by_text("2 of 1")).to_be_visible()
    expect(console.row("Two")).to_be_visible()
    console.start_create(EXTERNAL, "Three")
    expect(console.dialog.get_by_role("alert")).to_contain_text("(1)")
    console.dialog.get_by_role("button", name="Cancel").click()
    page.get_by_label("Keys allowed of each kind").fill("")
    page.get_by_role("button", name="Save limit").click()
    expect(page.get_by_role("alert")).to_have_text("Enter a whole number of keys, such as 5.")
    page.get_by_label("Keys allowed of each kind").fill("1000001")
    page.get_by_role("button", name="Save limit").click()
    expect(page.get_by_role("alert")).to_have_text(
        "That was not accepted: max_keys_per_kind must be between 0 and 1000000."
    )
    expect(external.get_by_text("2 of 1")).to_be_visible()  # nothing changed


# -- what else can happen while the page is open ---------------------------------------------


def test_exposure_can_be_turned_off_and_on_again_from_the_page(console: Console) -> None:
    """Turning the switch off refuses the API's keys at once but keeps them (R8); on again,
    they work again."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Toggle")
    assert call_protected(server, client_id) == 200
    console.switch.click()
    confirm = page.get_by_role("dialog", name="Stop exposing “orders”?")
    expect(confirm).to_contain_text("No key is deleted.")
    confirm.get_by_role("button", name="Cancel").click()
    expect(console.switch).to_be_focused()
    expect(console.switch).to_have_attribute("aria-checked", "true")
    assert call_protected(server, client_id) == 200
    console.switch.click()
    confirm.get_by_role("button", name="Stop exposing").click()
    expect(console.switch).to_have_attribute("aria-checked", "false")
    expect(page.get_by_role("link", name=re.compile(r"^orders\s*Not exposed$"))).to_be_visible()
    assert call_protected(server, client_id) == 404
    expect(console.row("Toggle")).to_be_visible()
    console.expose()
    assert call_protected(server, client_id) == 200


def test_a_double_click_on_set_api_secret_issues_one_secret(console: Console) -> None:
    """A double click on "Set API Secret" sends one request: the secret shown is the one that
    works (a second request would have replaced it silently)."""
    server = console.server
    console.open_exposed_api()
    client_id = console.create_external("Hasty")
    console.row("Hasty").get_by_role("button", name="Set API Secret for Hasty").dblclick()
    _, secret = console.read_secret()
    console.close_secret()
    assert call_protected(server, client_id, secret) == 200
    expect(
        console.row("Hasty").get_by_role("button", name="Set API Secret for Hasty")
    ).to_be_focused()


def test_copy_buttons_put_the_values_on_the_clipboard(
    browser: Browser, server: ConsoleServer
) -> None:
    """Each Copy button copies its value, says so, and returns to "Copy" even when clicked
    twice in a row."""
    context = browser.new_context(viewport=DESKTOP)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base)
    console = Console(context.new_page(), server)
    page = console.page
    console.open_exposed_api()
    console.start_create(INTERNAL, "Clipboard")
    client_id, secret = console.read_secret()
    copy_secret = page.get_by_role("button", name="Copy the API secret")
    copy_secret.click()
    expect(copy_secret).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    copy_id = page.get_by_role("button", name="Copy the client ID", exact=True)
    copy_id.click()
    expect(copy_id).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == client_id
    console.close_secret()
    copy_row = page.get_by_role("button", name="Copy the client ID of Clipboard")
    copy_row.click()
    copy_row.click()
    expect(copy_row).to_have_text("Copied")
    expect(copy_row).to_have_text("Copy")  # after two seconds, whatever the clicks
    assert page.evaluate("navigator.clipboard.readText()") == client_id
    context.close()
    assert console.problems == []


def test_copy_buttons_of_the_secret_dialog_do_not_wrap(
    browser: Browser, server: ConsoleServer
) -> None:
    """At 1280x900 each Copy button of the secret dialog shows its label on one line."""
    context = browser.new_context(viewport=DESKTOP)
    console = Console(context.new_page(), server)
    page = console.page
    console.open_exposed_api()
    console.start_create(INTERNAL, "No wrap")
    console.read_secret()
    lines = page.evaluate(
        """() => Array.from(document.querySelectorAll("#secret-dialog button.copy"), (button) => {
            const range = document.createRange();
            range.selectNodeContents(button);
            return new Set(Array.from(range.getClientRects(), (rect) => rect.top)).size;
        })"""
    )
    assert lines == [1, 1]
    console.close_secret()
    context.close()
    assert console.problems == []


def test_going_back_while_creating_closes_the_dialog_and_creates_nothing(
    console: Console,
) -> None:
    """The create dialog belongs to one API: pressing Back to another API closes it, and no
    key is created in either."""
    page, server = console.page, console.server
    console.sign_in()
    console.add_api("billing")
    console.add_api(PROTECTED_API)
    console.expose()
    console.section(INTERNAL).get_by_role("button", name="Create API Key +").click()
    console.dialog.get_by_label("Key name").fill("Never")
    page.go_back()
    expect(page.get_by_role("heading", level=1, name="billing")).to_be_visible()
    expect(console.dialog).to_have_count(0)
    for api in ("billing", PROTECTED_API):
        assert admin(server, "GET", f"/apis/{api}/keys").json()["keys"] == []


def test_a_key_deleted_elsewhere_is_explained_and_the_list_refreshed(console: Console) -> None:
    """Deleting a key another operator already deleted says so in words and redraws the list."""
    page, server = console.page, console.server
    console.open_exposed_api()
    client_id = console.create_external("Gone")
    admin(server, "DELETE", f"/apis/{PROTECTED_API}/keys/{client_id}")
    page.get_by_role("button", name="Actions for key Gone").click()
    page.get_by_role("menuitem", name="Delete key").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete key").click()
    expect(page.get_by_role("alert").filter(has_text="no longer exists")).to_have_text(
        "That key no longer exists; someone may have deleted it. The list is refreshed."
    )
    expect(console.row("Gone")).to_have_count(0)
    expect(page.get_by_role("button", name="Try again")).to_be_hidden()  # retrying won't help


def test_a_token_rejected_mid_session_asks_to_sign_in_again(console: Console) -> None:
    """If the server stops accepting the token while the page is open (restarted with a new
    one), the next action says so and asks for it, with nothing of the session left shown."""
    page, server = console.page, console.server
    console.sign_in()
    console.add_api(PROTECTED_API)
    server.change_token("a-new-token-after-restart-0123456")
    console.switch.click()
    expect(page.get_by_role("alert")).to_have_text(
        "Your token is no longer accepted. Sign in again."
    )
    expect(page.get_by_label("Management token")).to_be_focused()
    expect(page.get_by_role("heading", level=1, name=PROTECTED_API)).to_have_count(0)
    assert PROTECTED_API not in page.title()
    assert page.evaluate("sessionStorage.length") == 0
    console.sign_in_here("a-new-token-after-restart-0123456")
    expect(page.get_by_role("link", name=re.compile("^orders"))).to_be_visible()
    assert (
        admin(
            server, "GET", f"/apis/{PROTECTED_API}", token="a-new-token-after-restart-0123456"
        ).json()["exposed"]
        is False
    )  # the refused click changed nothing


def test_an_api_that_does_not_exist_is_explained(console: Console) -> None:
    """A bookmarked address naming an API nobody created says so instead of an empty page."""
    page = console.page
    console.sign_in()
    page.goto(console.server.console + "#api=nosuch")
    expect(page.get_by_role("alert")).to_have_text(
        "The API “nosuch” does not exist. Add it with “Add an API”."
    )
    expect(page.get_by_role("heading", level=1)).to_have_count(0)


def test_an_unreachable_server_is_explained(browser: Browser, tmp_path: Path) -> None:
    """When the keyguard server goes away under the page, actions say it cannot be reached."""
    with ConsoleServer(tmp_path / "keys.db") as server:
        context = browser.new_context(viewport=DESKTOP)
        console = Console(context.new_page(), server)
        console.sign_in()
        console.add_api(PROTECTED_API)
    console.page.get_by_label("Add an API").fill("later")
    console.page.get_by_role("button", name="Add API").click()
    expect(console.page.get_by_role("alert").filter(has_text="reach")).to_have_text(
        "Could not reach the keyguard server. Check that it is running and try again."
    )
    context.close()
    assert [p for p in console.problems if "ERR_CONNECTION_REFUSED" not in p] == []


def test_a_secret_is_shown_even_if_the_operator_moved_on_while_it_was_issued(
    browser: Browser, tmp_path: Path
) -> None:
    """If the operator leaves for another API while an internal key is being created, the key's
    secret is still shown when it arrives (it can never be shown again), naming its API."""
    database = tmp_path / "slow.db"
    with ConsoleServer(database, timeout=15) as server:
        context = browser.new_context(viewport=DESKTOP)
        console = Console(context.new_page(), server)
        page = console.page
        console.sign_in()
        console.add_api("billing")
        console.add_api(PROTECTED_API)
        console.expose()
        # Another process holds the write lock, so the creation waits (within the timeout).
        locker = sqlite3.connect(database, timeout=10, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            console.start_create(INTERNAL, "Patient")
            expect(console.dialog.get_by_role("button", name="Save", exact=True)).to_be_disabled()
            page.go_back()
            expect(page.get_by_role("heading", level=1, name="billing")).to_be_visible()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        dialog = page.get_by_role("dialog", name="Copy the API secret now")
        expect(dialog).to_contain_text("The internal key “Patient” of the API “orders”")
        client_id, secret = console.read_secret()
        assert call_protected(server, client_id, secret) == 200
        console.close_secret()
        expect(page.get_by_role("heading", level=1, name="billing")).to_be_visible()
        context.close()
    assert console.problems == []


def test_one_change_at_a_time_so_no_secret_is_ever_lost(browser: Browser, tmp_path: Path) -> None:
    """While a change is being saved (here: held up by another process's write lock), a second
    one is refused with a word of explanation and signing out waits, so the first answer and
    its secret always reach the operator."""
    database = tmp_path / "slow.db"
    with ConsoleServer(database, timeout=15) as server:
        context = browser.new_context(viewport=DESKTOP)
        console = Console(context.new_page(), server)
        page = console.page
        console.open_exposed_api()
        first_id = console.create_external("First")
        second_id = console.create_external("Second")
        locker = sqlite3.connect(database, timeout=10, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            page.get_by_role("button", name="Set API Secret for First").click()
            expect(page.get_by_role("button", name="Set API Secret for First")).to_be_disabled()
            page.get_by_role("button", name="Set API Secret for Second").click()
            expect(page.get_by_role("status")).to_have_text(
                "Wait a moment: the last change is still being saved."
            )
            expect(page.get_by_role("button", name="Sign out")).to_be_disabled()
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        shown_id, secret = console.read_secret()
        assert shown_id == first_id
        assert call_protected(server, first_id, secret) == 200
        console.close_secret()
        keys = {
            key["client_id"]: key
            for key in admin(server, "GET", "/apis/orders/keys").json()["keys"]
        }
        assert keys[second_id]["has_secret"] is False  # the refused click changed nothing
        expect(page.get_by_role("button", name="Sign out")).to_be_enabled()
        context.close()
    assert console.problems == []


def test_the_limit_field_belongs_to_its_api(console: Console) -> None:
    """A limit typed but not saved for one API is not carried over to another one, even when
    the cursor is still in the field."""
    page = console.page
    console.open_exposed_api()
    console.add_api("billing")
    field = page.get_by_label("Keys allowed of each kind")
    admin(console.server, "PUT", "/apis/billing", json={"max_keys_per_kind": 2})
    page.get_by_role("link", name=re.compile("^orders")).click()
    expect(page.get_by_role("heading", level=1, name=PROTECTED_API)).to_be_visible()
    field.fill("7")
    page.go_back()  # the cursor stays in the field
    expect(page.get_by_role("heading", level=1, name="billing")).to_be_visible()
    expect(field).to_have_value("2")
    expect(console.section(INTERNAL).get_by_text("0 of 2")).to_be_visible()
