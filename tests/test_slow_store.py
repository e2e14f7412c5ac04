"""A slow store, end to end through ``KeyGuard``: a cache entry is valid for its TTL from
the moment its read *started* (SPEC §11), also while the store is held.

The store is held for real, for a few seconds: a private ``redis-server`` put to sleep
with ``DEBUG SLEEP`` (never the shared one), and PostgreSQL tables of the test's own
prefix locked (``LOCK TABLE`` in a connection of the test's own, on the shared server:
one connection, no load). Meanwhile an API is un-exposed by "another process" (a
second store on the same data, no cache), and the change feed is out of the picture
(the cache wraps a store view without one: a notice lost, the TTL the only bound).

What must hold: a request arriving after the un-expose has answered, and a TTL after
every read that began before it, is refused, never admitted on an entry read before the
change; requests caught in the hold are answered 200 or 404, never 5xx. The hold lasts
several TTLs past the reads it catches, so the second condition normally holds as the
change answers; the test measures when each read started rather than assuming it (an
event loop stalled on a loaded machine can start a read late, just before the change).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyManager, KeyStore
from keyguard.models import Api, KeyRecord
from keyguard.stores import CachedStore
from keyguard.stores.redis import RedisStore
from keyguard.stores.sql import SQLStore
from tests.backends.servers import require_server
from tests.backends.sql import drop_tables, unique_prefix
from tests.helpers import CountingStore
from tests.test_outages import free_port, need, wait_for_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TTL = 0.5
HOLD = 3.0  # how long the store is held: several TTLs
TIMEOUT = 15.0  # the stores' timeout: longer than the hold, so nothing is a 503


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


Hold = Callable[[], Awaitable[None]]


class ReadClock(CountingStore):
    """A view of a store that notes when each of the cache's reads started (on the
    monotonic clock the cache uses)."""

    def __init__(self, inner: KeyStore) -> None:
        super().__init__(inner)
        self.starts: list[float] = []

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        self.starts.append(time.monotonic())
        return await super().lookup(api, client_id)

    async def snapshot(
        self, api: str, *, max_keys: int
    ) -> tuple[Api | None, list[KeyRecord] | None]:
        self.starts.append(time.monotonic())
        return await super().snapshot(api, max_keys=max_keys)


async def run_scenario(store: KeyStore, elsewhere: KeyStore, hold: Hold) -> None:
    """Warm the cache, hold the store (``hold`` returns once it holds, and keeps holding
    for ``HOLD`` seconds in the background), let the entry expire, start a request whose
    read is caught in the hold, un-expose the API elsewhere meanwhile, and check what
    requests after the un-expose see."""
    cached_view = ReadClock(store)
    cached = CachedStore(cached_view, ttl=TTL)
    manager = KeyManager(elsewhere)
    await manager.expose("orders")
    issued = await manager.create_key("orders", name="Acme", kind="external")
    app = KeyGuard(
        Starlette(routes=[Route("/", hello)]), store=cached, api="orders", usage_flush=None
    )
    headers = {"X-IBM-Client-Id": issued.client_id}
    transport = httpx.ASGITransport(app=app)
    statuses: dict[str, int] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def get(label: str) -> None:
            statuses[label] = (await client.get("/", headers=headers)).status_code

        await get("warm")
        assert statuses["warm"] == 200
        with anyio.fail_after(HOLD + 4 * TIMEOUT):
            async with anyio.create_task_group() as group:
                await hold()
                await anyio.sleep(TTL * 1.6)  # the warm entry has expired
                group.start_soon(get, "caught")  # its read starts now, and is held
                await anyio.sleep(0.3)
                unexposed = anyio.Event()

                async def unexpose() -> None:
                    await manager.unexpose("orders")  # held too: answers after the hold
                    unexposed.set()

                group.start_soon(unexpose)
                await anyio.sleep(TTL * 1.6)  # past the TTL of the caught read
                group.start_soon(get, "mid-hold")
                await unexposed.wait()
                # Every read that began before the change has outlived its TTL (as the
                # hold makes sure, unless the loop was stalled: then wait for it).
                await anyio.sleep(max(0.0, max(cached_view.starts) + TTL - time.monotonic() + 0.01))
                await get("after")  # the change has answered: must be refused
                for i in range(3):
                    await get(f"after-{i}")
    await cached.aclose()
    assert statuses["after"] == 404, statuses
    assert all(statuses[f"after-{i}"] == 404 for i in range(3)), statuses
    assert statuses["caught"] in (200, 404), statuses
    assert statuses["mid-hold"] in (200, 404), statuses


@contextlib.contextmanager
def sleepy_redis(tmp_path: Path) -> Iterator[int]:
    """A private redis-server that allows ``DEBUG SLEEP``: its port."""
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
            "--enable-debug-command",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


async def test_redis_asleep_never_admits_on_an_entry_read_before_the_change(
    tmp_path: Path,
) -> None:
    """A private Redis held by DEBUG SLEEP: after an un-expose elsewhere has answered, its
    API's keys are refused, though the cache's read began before the change."""
    with sleepy_redis(tmp_path) as port:
        url = f"redis://127.0.0.1:{port}/0"
        store, elsewhere = (RedisStore.from_url(url, timeout=TIMEOUT) for _ in range(2))
        sleeper = Redis(host="127.0.0.1", port=port)
        try:
            # Connections ready in the pool: a read caught in the sleep is then sent at
            # once, not after a handshake the sleep holds too (which would put it after
            # the change, and the case under test would not arise).
            async with anyio.create_task_group() as warming:
                for _ in range(4):
                    warming.start_soon(store.get_api, "orders")
            async with anyio.create_task_group() as group:

                async def hold() -> None:
                    group.start_soon(sleeper.execute_command, "DEBUG", "SLEEP", HOLD)
                    await anyio.sleep(0.2)  # the server has the command, and sleeps

                await run_scenario(store, elsewhere, hold)
        finally:
            await sleeper.aclose()
            await elsewhere.aclose()
            await store.aclose()


async def test_postgres_locked_never_admits_on_an_entry_read_before_the_change() -> None:
    """PostgreSQL tables (of this test's own prefix) locked by another connection: after an
    un-expose elsewhere has answered, its API's keys are refused."""
    url = require_server("postgres")
    asyncpg = pytest.importorskip("asyncpg")
    prefix = unique_prefix()
    store, elsewhere = (
        SQLStore.from_url(url, table_prefix=prefix, timeout=TIMEOUT) for _ in range(2)
    )
    locker = await asyncpg.connect(url.replace("postgresql://", "postgres://", 1))
    try:
        async with anyio.create_task_group() as group:
            locked = anyio.Event()

            async def lock_for_a_while() -> None:
                async with locker.transaction():
                    await locker.execute(
                        f"LOCK TABLE {prefix}apis, {prefix}keys IN ACCESS EXCLUSIVE MODE"
                    )
                    locked.set()
                    await anyio.sleep(HOLD)

            async def hold() -> None:
                group.start_soon(lock_for_a_while)
                await locked.wait()

            await run_scenario(store, elsewhere, hold)
    finally:
        await locker.close()
        try:
            await drop_tables(elsewhere.engine, prefix)
        finally:
            await elsewhere.aclose()
            await store.aclose()
