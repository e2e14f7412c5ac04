"""Take the console's audit screenshots for the docs: the Activity panel, a read-only session.

Like ``scripts/console_screenshots.py`` (same live server and Chromium as the
browser tests), over a throw-away SQLite file; writes ``docs/images/console-
activity.png`` and ``docs/images/console-read-only.png``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402
from tests.browser import CHROMIUM_ARGS, TOKEN, ConsoleServer, chromium_path  # noqa: E402

from keyguard import ReadOnly, management_app  # noqa: E402

OUT = ROOT / "docs" / "images"
VIEWER = "console-viewer-token-0123456789-ab"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as scratch,
        ConsoleServer(Path(scratch) / "keys.db") as server,
        sync_playwright() as playwright,
    ):
        server._admin = management_app(
            server.store, tokens={"ops": TOKEN, "dashboard": ReadOnly(VIEWER)}
        )
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.base + "/keyguard", headers=headers) as c:
            c.put(
                "/apis/orders",
                json={"exposed": True, "rate_limits": [{"limit": 100, "per": "minute"}]},
            )
            staff = c.post("/apis/orders/keys", json={"name": "Staff", "kind": "internal"})
            acme = c.post("/apis/orders/keys", json={"name": "Acme", "kind": "external"}).json()
            c.put(f"/apis/orders/keys/{acme['client_id']}/secret", json={"grace_seconds": 86400})
            c.patch(f"/apis/orders/keys/{acme['client_id']}", json={"meta": {"plan": "gold"}})
            c.patch(f"/apis/orders/keys/{staff.json()['client_id']}", json={"enabled": False})
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(server.console)
        page.get_by_label("Management token").fill(VIEWER)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("link", name="orders").click()
        expect(page.get_by_role("region", name="Activity").get_by_role("listitem")).to_have_count(6)
        page.screenshot(path=str(OUT / "console-read-only.png"), animations="disabled")
        page.get_by_role("region", name="Activity").screenshot(
            path=str(OUT / "console-activity.png"), animations="disabled"
        )
        print("wrote docs/images/console-read-only.png, docs/images/console-activity.png")
        browser.close()


if __name__ == "__main__":
    main()
