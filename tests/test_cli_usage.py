"""``keyguard usage API [CLIENT_ID] [--hours N]`` (SPEC §6, §10), through the console script.

The traffic is written to the store in-process (as KeyGuard's flushes would),
then read by ``keyguard`` in a subprocess on the same SQLite file.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from keyguard import KeyManager
from keyguard.models import rfc3339, utcnow
from keyguard.usage import UsageCount, hour_start
from tests.test_cli import Run, manage, one_line_error

pytestmark = pytest.mark.slow


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """``keyguard`` on a fresh SQLite store in a temporary folder."""
    return Run(tmp_path, f"sqlite:///{tmp_path / 'keys.db'}")


def traffic(run: Run) -> tuple[str, str]:
    """Expose ``orders`` with two keys; 5 requests + 2 429s now and 3 requests two hours ago
    for the first. Returns both client ids."""

    async def work(manager: KeyManager) -> tuple[str, str]:
        await manager.expose("orders")
        busy = await manager.create_key("orders", name="Busy", kind="external")
        idle = await manager.create_key("orders", name="Idle", kind="internal")
        now = hour_start(utcnow())
        await manager.store.record_usage(
            [
                UsageCount("orders", busy.client_id, now, 5, 2, utcnow()),
                UsageCount("orders", busy.client_id, now - timedelta(hours=2), 3, 0),
            ]
        )
        return busy.client_id, idle.client_id

    return manage(run, work)


def test_usage_of_an_api_as_a_table(run: Run) -> None:
    """The API's totals, a table of its keys (zeros for the idle one) and one row per hour."""
    busy, idle = traffic(run)
    lines = run("usage", "orders", "--hours", "3").stdout.splitlines()
    assert lines[0] == (
        "Usage of API orders, last 3 hours (UTC, the current hour last): 8 requests, "
        "2 rate limited (429)."
    )
    assert lines[2].split() == ["CLIENT_ID", "NAME", "REQUESTS", "RATE", "LIMITED"]
    assert lines[3].split() == [busy, "Busy", "8", "2"]
    assert lines[4].split() == [idle, "Idle", "0", "0"]
    now = hour_start(utcnow())
    hour_rows = [line.split() for line in lines[6:]]
    assert hour_rows[0] == ["HOUR", "(UTC)", "REQUESTS", "RATE", "LIMITED"]
    assert [row[2:] for row in hour_rows[1:]] == [["3", "0"], ["0", "0"], ["5", "2"]]
    assert hour_rows[-1][:2] == rfc3339(now)[:16].split("T")


def test_usage_of_a_key_as_json(run: Run) -> None:
    """``--json`` prints KeyManager.usage's object: every hour, the current one last."""
    busy, _ = traffic(run)
    body = run.json("usage", "orders", busy, "--hours", "2")
    now = hour_start(utcnow())
    assert body == {
        "client_id": busy,
        "hours": [
            {"start": rfc3339(now - timedelta(hours=1)), "requests": 0, "rate_limited": 0},
            {"start": rfc3339(now), "requests": 5, "rate_limited": 2},
        ],
    }
    api = run.json("usage", "orders")
    assert len(api["hours"]) == 24
    assert [k["requests"] for k in api["keys"]] == [8, 0]


def test_long_ranges_are_summed_per_day(run: Run) -> None:
    """Beyond 48 hours the text table has one row per UTC day."""
    traffic(run)
    lines = run("usage", "orders", "--hours", "840").stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("DAY (UTC)")))
    days = lines[header + 1 :]
    assert 35 <= len(days) <= 36
    assert sum(int(line.split()[1]) for line in days) == 8


@pytest.mark.parametrize("hours", ["0", "841", "abc", "2.5"])
def test_a_bad_hours_is_an_invalid_value(run: Run, hours: str) -> None:
    """--hours outside 1..840 or not a whole number: exit 1, one line naming --hours."""
    traffic(run)
    result = run("usage", "orders", "--hours", hours, expect=1)
    assert "--hours" in one_line_error(result)


def test_unknown_api_and_key_exit_1(run: Run) -> None:
    """An API the store never saw names the store; an unknown key is key_not_found."""
    traffic(run)
    line = one_line_error(run("usage", "nope", expect=1))
    assert "not found in store sqlite:///" in line
    missing = run("--json", "usage", "orders", "0" * 32, expect=1)
    assert '"code": "key_not_found"' in missing.stderr
