"""Take the console's usage screenshot for the docs: the chart of an API's requests.

Like ``scripts/console_screenshots.py`` (same live server and Chromium as the
browser tests), over a throw-away SQLite file; writes
``docs/images/console-usage.png`` (the last 24 hours). The last 30 days of traffic are made up (a
daily rhythm, written with ``record_usage``); the current hour's is real,
sent through ``KeyGuard`` and flushed, 429s included.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from tests.browser import CHROMIUM_ARGS, TOKEN, ConsoleServer, chromium_path  # noqa: E402

from keyguard import KeyGuard, open_store  # noqa: E402
from keyguard.models import utcnow  # noqa: E402
from keyguard.usage import UsageCount, hour_start  # noqa: E402

OUT = ROOT / "docs" / "images"


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def history(keys: dict[str, dict[str, Any]]) -> list[UsageCount]:
    """30 days of made-up hourly traffic with a daily rhythm, busier for Acme Corp."""
    dice = random.Random(16)  # noqa: S311 (made-up traffic, not a secret)
    now = hour_start(utcnow())
    counts = []
    for back in range(1, 30 * 24):
        hour = now - timedelta(hours=back)
        # Busy in the (UTC) working day, quiet at night and at weekends.
        weekend = 0.3 if hour.weekday() >= 5 else 1.0
        rhythm = weekend * max(0.0, math.sin((hour.hour - 6) / 24 * 2 * math.pi))
        for name, peak, limited in (("Acme Corp", 90, 0.08), ("Warehouse team", 30, 0.0)):
            requests = int(peak * rhythm * dice.uniform(0.6, 1.2))
            rate_limited = int(requests * limited * dice.random()) if rhythm > 0.7 else 0
            if requests or rate_limited:
                client_id = keys[name]["client_id"]
                counts.append(UsageCount("orders", client_id, hour, requests, rate_limited))
    return counts


def send(server: ConsoleServer, keys: dict[str, dict[str, Any]]) -> None:
    """The current hour's traffic, through KeyGuard, and the history, in the store."""

    async def run() -> None:
        store = open_store(server.url, cache_ttl=0)
        guard = KeyGuard(Starlette(routes=[Route("/", _hello)]), store=store, api="orders")
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            for name, times in (("Acme Corp", 14), ("Warehouse team", 6)):
                key = keys[name]
                headers = {"X-IBM-Client-Id": key["client_id"]}
                headers["X-IBM-Client-Secret"] = key["secret"]
                for _ in range(times):
                    await http.get("/", headers=headers)
        assert guard.usage is not None
        await guard.usage.flush()
        await store.record_usage(history(keys))
        await guard.aclose()
        await store.aclose()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result(timeout=120)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as scratch,
        ConsoleServer(Path(scratch) / "keys.db") as server,
        sync_playwright() as playwright,
    ):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        keys: dict[str, dict[str, Any]] = {}
        with httpx.Client(base_url=server.base + "/keyguard", headers=headers) as c:
            c.put("/apis/orders", json={"exposed": True})
            for body in (
                {"name": "Warehouse team", "kind": "internal"},
                {
                    "name": "Acme Corp",
                    "kind": "internal",
                    "rate_limits": [{"limit": 10, "per": "minute"}],
                },
            ):
                keys[str(body["name"])] = c.post("/apis/orders/keys", json=body).json()
        send(server, keys)
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(server.console)
        page.get_by_label("Management token").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("link", name="orders").click()
        usage = page.get_by_role("region", name="Usage")
        expect(usage.get_by_role("img")).to_be_visible()
        page.mouse.move(0, 0)
        usage.screenshot(path=str(OUT / "console-usage.png"), animations="disabled")
        print("wrote docs/images/console-usage.png")
        browser.close()


if __name__ == "__main__":
    main()
