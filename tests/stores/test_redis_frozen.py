"""A frozen Redis (SIGSTOP on a private server): every kind of store call ends within its
timeout as a whole (SPEC §7, issue 13 item 8), in one event loop and the next.

The server accepts connections (the kernel does) but never answers, the worst
case for a client. The bound asserted is a generous multiple of a short
timeout: the test proves "never hangs", not a speed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from keyguard.errors import StoreUnavailable
from keyguard.models import KeyChanges, KeyKind, KeyRecord, utcnow
from keyguard.secrets import new_client_id
from keyguard.stores.redis import RedisStore
from tests.test_outages import free_port, need, wait_for_port

pytestmark = pytest.mark.slow

TIMEOUT = 0.5
BOUND = TIMEOUT * 4  # generous: a hang guard, not a speed claim


@pytest.fixture
def frozen_redis(tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A private redis-server on a free port; the test freezes and thaws it."""
    port = free_port()
    proc = subprocess.Popen(
        [
            need("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port, proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def calls(store: RedisStore, rec: KeyRecord) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of each kind the store offers."""
    return {
        "lookup": lambda: store.lookup("orders", rec.client_id),
        "get_api": lambda: store.get_api("orders"),
        "list_apis": store.list_apis,
        "list_keys": lambda: store.list_keys("orders"),
        "get_key": lambda: store.get_key("orders", rec.client_id),
        "upsert_api": lambda: store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        ),
        "insert_key": lambda: store.insert_key(
            KeyRecord("orders", new_client_id(), "Other", KeyKind.EXTERNAL, None, utcnow())
        ),
        "update_key": lambda: store.update_key("orders", rec.client_id, KeyChanges(enabled=False)),
        "set_secret_hash": lambda: store.set_secret_hash("orders", rec.client_id, "h"),
        "delete_key": lambda: store.delete_key("orders", rec.client_id),
        "delete_api": lambda: store.delete_api("orders", force=True),
    }


def test_every_call_on_a_frozen_redis_ends_within_its_timeout(
    frozen_redis: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """Pooled connections to a frozen server and new ones alike: each call raises
    StoreUnavailable within the bound, in two event loops one after the other; after the
    thaw the store serves again."""
    port, proc = frozen_redis
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=TIMEOUT)
    rec = KeyRecord("orders", new_client_id(), "Acme", KeyKind.EXTERNAL, None, utcnow())

    async def warm() -> None:
        await store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        await store.insert_key(rec)

    async def frozen_calls() -> list[str]:
        outcomes = []
        for name, call in calls(store, rec).items():
            with anyio.fail_after(BOUND):
                with pytest.raises(StoreUnavailable):
                    await call()
            outcomes.append(name)
        return outcomes

    asyncio.run(warm())  # pooled connections now exist (in a loop that is then gone)
    proc.send_signal(signal.SIGSTOP)
    try:
        first = asyncio.run(frozen_calls())
        second = asyncio.run(frozen_calls())  # a second event loop, the server still frozen
    finally:
        proc.send_signal(signal.SIGCONT)
    assert first == second == list(calls(store, rec))

    async def served() -> list[str]:
        try:
            # (Whether the writes sent to the frozen server were applied once it thawed is
            # not known to the caller, who got StoreUnavailable: it may read them either way.)
            return [api.name for api in await store.list_apis()]
        finally:
            await store.aclose()

    assert asyncio.run(served()) in (["orders"], [])


def test_the_change_feed_of_a_frozen_redis_ends_within_its_timeout(
    frozen_redis: tuple[int, subprocess.Popen[bytes]],
) -> None:
    """A feed whose server stops answering without closing the connection (no error, no
    notice, ever) ends with StoreUnavailable within a few timeouts, so its cache listens
    again and forgets what it holds instead of trusting a silent feed (SPEC §11)."""
    port, proc = frozen_redis
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=TIMEOUT)

    async def watch_until_broken() -> None:
        ready = anyio.Event()

        async def watch() -> None:
            with pytest.raises(StoreUnavailable):
                await store.watch(lambda api, client_id: None, on_ready=ready.set)

        # Ready, then frozen: quiet for a timeout, a ping, no answer for another.
        with anyio.fail_after(BOUND * 2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await ready.wait()
                proc.send_signal(signal.SIGSTOP)

    try:
        asyncio.run(watch_until_broken())
    finally:
        proc.send_signal(signal.SIGCONT)

    async def close() -> None:
        await store.aclose()

    asyncio.run(close())
