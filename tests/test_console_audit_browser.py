"""The console's read-only sessions and its Activity panel (SPEC §5a), in headless Chromium.

Same set-up as ``test_console_browser.py``: a real management app on a real
socket over SQLite, here with a named admin token and a read-only one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from keyguard import ReadOnly, management_app
from tests.browser import CHROMIUM_ARGS, PROTECTED_API, TOKEN, ConsoleServer, chromium_path

pytestmark = pytest.mark.slow

VIEWER = "console-viewer-token-0123456789-ab"
WAIT_MS = 20_000

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
        # The test server serves whatever app _admin holds: swap in one with two tokens.
        running._admin = management_app(
            running.store, tokens={"admin": TOKEN, "viewer": ReadOnly(VIEWER)}
        )
        yield running


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab, failing its test on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.set_default_timeout(WAIT_MS)
    yield tab
    context.close()
    assert errors == []


def sign_in(page: Page, server: ConsoleServer, token: str) -> None:
    page.goto(server.console)
    page.get_by_label("Management token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="APIs")).to_be_visible()


def seed(server: ConsoleServer) -> str:
    """An exposed API with one external key, made with the admin token; its client id."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    base = server.base + "/keyguard"
    with httpx.Client(base_url=base, headers=headers) as client:
        assert client.put(f"/apis/{PROTECTED_API}", json={"exposed": True}).status_code == 200
        created = client.post(
            f"/apis/{PROTECTED_API}/keys", json={"name": "Acme", "kind": "external"}
        )
        assert created.status_code == 201
        client_id: str = created.json()["client_id"]
        return client_id


def test_activity_lists_the_apis_changes_and_who_made_them(
    page: Page, server: ConsoleServer
) -> None:
    """The Activity panel shows the API's audit events, newest first, with their actor, and
    gains the change the operator just made in the page."""
    seed(server)
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    activity = page.get_by_role("region", name="Activity")
    rows = activity.get_by_role("listitem")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("token:admin")
    expect(rows.nth(0)).to_contain_text("created the key “Acme”")
    expect(rows.nth(1)).to_contain_text("exposed the API")
    page.get_by_role("switch", name="Expose Managed API").click()
    page.get_by_role("dialog").get_by_role("button", name="Stop exposing").click()
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_contain_text("stopped exposing the API")


def test_a_read_only_session_sees_everything_and_can_change_nothing(
    page: Page, server: ConsoleServer
) -> None:
    """Signed in with a read-only token, the page says so, shows the keys and the activity,
    and every control that would change something is disabled."""
    seed(server)
    sign_in(page, server, VIEWER)
    banner = page.get_by_role("note")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("read-only token viewer")
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(page.get_by_text("Acme").first).to_be_visible()
    expect(page.get_by_role("switch", name="Expose Managed API")).to_be_disabled()
    expect(page.get_by_role("button", name="Add API")).to_be_disabled()
    expect(page.get_by_role("button", name="Delete API")).to_be_disabled()
    for create in page.get_by_role("button", name="Create API Key +").all():
        expect(create).to_be_disabled()
    # Only reads stay on (data-read): the usage chart's buttons, the search by name.
    enabled_changes = page.locator(
        "#console button:not([disabled]):not(#retry):not([data-read]),"
        " #console input:not([disabled]):not([data-read])"
    )
    expect(enabled_changes).to_have_count(0)
    expect(page.get_by_role("searchbox", name="Search keys by name")).to_be_enabled()
    # Copying a client id changes nothing either.
    expect(page.get_by_role("button", name="Copy the client ID of Acme")).to_be_enabled()
    rows = page.get_by_role("region", name="Activity").get_by_role("listitem")
    expect(rows).to_have_count(2)
    # Signing out and in with the admin token turns the controls back on.
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, server, TOKEN)
    expect(page.get_by_role("note")).to_be_hidden()
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(page.get_by_role("switch", name="Expose Managed API")).to_be_enabled()


def test_a_token_made_read_only_meanwhile_turns_the_controls_off(
    page: Page, server: ConsoleServer
) -> None:
    """Signed in while the token could change things, then the server restarted with it
    ``ReadOnly``: the refused change says why in words (not "something went wrong, try
    again"), and the page turns into a read-only session, as if signed in so."""
    seed(server)
    sign_in(page, server, TOKEN)
    page.get_by_role("link", name=PROTECTED_API).click()
    expect(page.get_by_text("Acme").first).to_be_visible()
    server._admin = management_app(server.store, tokens={"admin": ReadOnly(TOKEN)})
    page.get_by_role("button", name="Create API Key + (internal)").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Key name").fill("Staff")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog.get_by_role("alert")).to_contain_text("this token is read-only")
    dialog.get_by_role("button", name="Cancel").click()
    banner = page.get_by_role("note")
    expect(banner).to_contain_text("read-only token admin")
    expect(page.get_by_role("switch", name="Expose Managed API")).to_be_disabled()
    for create in page.get_by_role("button", name="Create API Key +").all():
        expect(create).to_be_disabled()
    expect(page.get_by_role("button", name="Actions for key Acme")).to_be_disabled()
    expect(page.get_by_role("button", name="Copy the client ID of Acme")).to_be_enabled()
