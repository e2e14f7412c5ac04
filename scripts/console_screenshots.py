"""Take the web console's screenshots for the docs: ``scripts/screenshots``.

Drives the real page (the same live server and Chromium as the browser tests)
through its main states and writes PNGs to ``docs/images/``. The keys shown are
made up on the spot in a throw-away SQLite file.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import FloatRect, Page, ViewportSize, expect, sync_playwright  # noqa: E402
from tests.browser import CHROMIUM_ARGS, TOKEN, ConsoleServer, chromium_path  # noqa: E402

OUT = ROOT / "docs" / "images"
DESKTOP: ViewportSize = {"width": 1280, "height": 860}
PHONE: ViewportSize = {"width": 390, "height": 844}


def shoot(page: Page, name: str, *, full_page: bool = False, down_to: str | None = None) -> None:
    """``down_to``: the name of a region the picture ends with (the page below it is cut)."""
    path = OUT / f"console-{name}.png"
    clip: FloatRect | None = None
    if down_to is not None:
        # In page coordinates (a bounding box is the viewport's, which may be scrolled).
        bottom = page.get_by_role("region", name=down_to).evaluate(
            "e => e.getBoundingClientRect().bottom + window.scrollY"
        )
        width = page.viewport_size["width"] if page.viewport_size else DESKTOP["width"]
        clip = {"x": 0, "y": 0, "width": width, "height": float(bottom) + 16}
    page.screenshot(path=str(path), full_page=full_page, clip=clip, animations="disabled")
    print(f"wrote {path.relative_to(ROOT)}")


def create(page: Page, section: str, name: str) -> None:
    page.get_by_role("region", name=section).get_by_role("button", name="Create API Key +").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Key name").fill(name)
    dialog.get_by_role("button", name="Save", exact=True).click()


def choose(page: Page, key: str, action: str) -> None:
    page.get_by_role("button", name=f"Actions for key {key}", exact=True).click()
    page.get_by_role("menuitem", name=action, exact=True).click()


def close_secret(page: Page) -> None:
    page.get_by_role("button", name="I have copied it, close").click()
    expect(page.get_by_role("dialog")).to_have_count(0)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    inside, outside = "Sharing within your organization", "Sharing outside your organization"
    with (
        tempfile.TemporaryDirectory() as scratch,
        ConsoleServer(Path(scratch) / "keys.db") as server,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=DESKTOP)
        page.goto(server.console)
        expect(page.get_by_label("Management token")).to_be_focused()
        shoot(page, "sign-in")

        page.get_by_label("Management token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        for api in ("billing", "orders"):
            page.get_by_label("Add an API").fill(api)
            page.get_by_role("button", name="Add API").click()
            expect(page.get_by_role("heading", level=1, name=api)).to_be_visible()
        page.get_by_role("switch", name="Expose Managed API").click()
        expect(page.get_by_role("switch")).to_have_attribute("aria-checked", "true")

        create(page, inside, "Warehouse team")
        expect(page.get_by_role("dialog", name="Copy the API secret now")).to_be_visible()
        shoot(page, "secret-once")
        close_secret(page)
        create(page, inside, "Finance reports")
        close_secret(page)
        for name in ("Acme Corp", "Globex"):
            create(page, outside, name)
            expect(page.get_by_role("dialog")).to_have_count(0)
        page.get_by_role("button", name="Set API Secret for Acme Corp").click()
        close_secret(page)
        # Some of each key's lifecycle (SPEC §8), through the ⋮ menus.
        choose(page, "Acme Corp", "Edit metadata…")
        page.get_by_role("dialog").get_by_label("Metadata (JSON)").fill(
            '{"customer": "C-1042", "plan": "gold"}'
        )
        shoot(page, "edit-metadata")
        page.get_by_role("button", name="Save metadata").click()
        expect(page.get_by_role("dialog")).to_have_count(0)
        page.get_by_role("button", name="Set API Secret for Acme Corp").click()
        page.get_by_label("Keep the current secret working for").select_option(label="7 days")
        page.get_by_role("button", name="Replace secret").click()
        expect(page.get_by_role("dialog", name="Copy the API secret now")).to_be_visible()
        shoot(page, "secret-with-grace")
        close_secret(page)
        choose(page, "Finance reports", "Set or clear expiry…")
        page.get_by_role("dialog").get_by_role("button", name="In 30 days").click()
        page.get_by_role("button", name="Save expiry").click()
        expect(page.get_by_role("dialog")).to_have_count(0)
        choose(page, "Globex", "Disable key")
        page.get_by_role("dialog").get_by_role("button", name="Disable key").click()
        expect(page.get_by_role("dialog")).to_have_count(0)
        page.mouse.move(0, 0)
        page.evaluate("document.activeElement && document.activeElement.blur()")
        # The keys, not the usage chart and activity below them (their own pictures).
        shoot(page, "sharing-and-keys", full_page=True, down_to=outside)

        page.get_by_role("button", name="Actions for key Warehouse team").click()
        shoot(page, "key-menu")
        page.get_by_role("menuitem", name="Replace key…").click()
        expect(page.get_by_role("dialog", name=re.compile("Replace key"))).to_be_visible()
        shoot(page, "replace-key")
        page.get_by_role("dialog").get_by_role("button", name="Cancel").click()

        page.get_by_role("button", name="Actions for key Globex").click()
        page.get_by_role("menuitem", name="Delete key").click()
        expect(page.get_by_role("dialog", name=re.compile("Delete key"))).to_be_visible()
        shoot(page, "delete-confirm")
        page.get_by_role("dialog").get_by_role("button", name="Cancel").click()

        page.get_by_label("Keys allowed of each kind").fill("2")
        page.get_by_role("button", name="Save limit").click()
        expect(page.get_by_text("2 of 2").first).to_be_visible()
        create(page, inside, "Third team")
        expect(page.get_by_role("dialog").get_by_role("alert")).to_be_visible()
        shoot(page, "limit-reached")
        page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
        page.get_by_label("Keys allowed of each kind").fill("5")
        page.get_by_role("button", name="Save limit").click()
        expect(page.get_by_text("2 of 5").first).to_be_visible()

        page.set_viewport_size(PHONE)
        page.evaluate("window.scrollTo(0, document.getElementById('api-detail').offsetTop - 8)")
        shoot(page, "phone")
        browser.close()


if __name__ == "__main__":
    main()
