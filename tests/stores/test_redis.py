"""What only the Redis store promises, tested against real servers.

The contract suite (``test_contract.py``) already runs on Redis through the
``store`` fixture. These tests add what is specific to Redis: processes
racing, the one-command request path, outages and restarts, authentication,
failovers, prefixes, Cluster hash slots, TLS configuration, the change feed
and a missing driver. Tests that stop or misconfigure a server start a
private ``redis-server`` of their own; the machine's Redis is never flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import AuthenticationError, MasterDownError, ReadOnlyError, RedisError
from starlette.types import Receive, Scope, Send

from keyguard import KeyGuard, KeyManager
from keyguard.errors import ConfigurationError, DuplicateName, KeyLimitReached, StoreUnavailable
from keyguard.manager import Denial
from keyguard.models import (
    EMPTY_META,
    KeyChanges,
    KeyInfo,
    KeyKind,
    KeyRecord,
    RateLimit,
    load_meta,
    utcnow,
)
from keyguard.secrets import new_client_id
from keyguard.stores import CachedStore, open_store
from keyguard.stores.redis import RedisStore
from tests.backends.redis import delete_prefixed, open_redis_test_store, unique_prefix
from tests.backends.servers import in_ci, require_server
from tests.helpers import eventually, expose, record
from tests.stores.racing import race_for_keys
from tests.stores.test_upgrades import load_redis, manifest

pytestmark = pytest.mark.anyio

REDIS_SERVER = "/usr/bin/redis-server"


# -- helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str:
    """The redis-server to start; skipped (failed in CI) if there is none."""
    binary = shutil.which("redis-server") or REDIS_SERVER
    if not Path(binary).exists():
        message = f"no redis-server binary at {REDIS_SERVER}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return binary


class PrivateRedis:
    """A ``redis-server`` of this test's own, on a free port in a temporary folder.

    It can be stopped (killed, as in a crash) and started again on the same port.
    Every write is fsynced to an append-only file, so its data survives a restart.
    """

    def __init__(self, folder: Path, *options: str) -> None:
        self.binary = redis_server_binary()
        self.folder = folder
        self.options = options
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: anyio.abc.Process | None = None

    async def start(self) -> None:
        """Start the server and wait until it answers."""
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--logfile", str(self.folder / "redis.log"),
            *self.options,
        ]  # fmt: skip
        self.process = await anyio.open_process(
            command, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL
        )
        with anyio.fail_after(20):
            while not await self._answers():
                if self.process.returncode is not None:
                    pytest.fail(f"redis-server exited at start, see {self.folder / 'redis.log'}")
                await anyio.sleep(0.02)

    async def _answers(self) -> bool:
        try:
            async with await anyio.connect_tcp("127.0.0.1", self.port) as stream:
                await stream.send(b"PING\r\n")
                reply = await stream.receive()
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            return False
        # NOAUTH or MASTERDOWN is an answer too; LOADING means not ready yet.
        return not reply.startswith(b"-LOADING")

    async def stop(self) -> None:
        """Kill the server (no clean shutdown) and reap it; harmless if it is not running."""
        if self.process is not None:
            process, self.process = self.process, None
            if process.returncode is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await process.aclose()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A private Redis (started by the test with ``await server.start()``), killed afterwards."""
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        await server.stop()


def shared_store(**options: Any) -> AbstractAsyncContextManager[RedisStore]:
    """A store on the machine's Redis under a fresh prefix, removed afterwards."""
    return open_redis_test_store("redis", Path(tempfile.gettempdir()), **options)


async def command_calls(admin: Redis) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT``, without the counting's own."""
    stats = await admin.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(values["calls"])
        for name, values in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }


# -- many processes ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_four_processes_racing_get_exactly_five_keys_per_kind(tmp_path: Path) -> None:
    """R2 holds across processes: four fresh interpreters racing for keys get five per kind."""
    url = require_server("redis")
    async with shared_store() as store:
        await expose(store, "race")
        accepted = await race_for_keys(url, store.prefix, tmp_path)
        assert accepted == ["external"] * 5 + ["internal"] * 5
        api = await store.get_api("race")
        assert api is not None
        assert (api.internal_keys, api.external_keys) == (5, 5)
        assert len(await store.list_keys("race")) == 10


# -- the request path: one command ------------------------------------------------------------


async def test_lookup_is_exactly_one_redis_command(private_redis: PrivateRedis) -> None:
    """lookup costs one Redis command (an HMGET), counted by the server's commandstats."""
    await private_redis.start()
    store = RedisStore.from_url(private_redis.url)
    try:
        async with Redis.from_url(private_redis.url) as admin:
            await expose(store)
            key = record()
            await store.insert_key(key)
            await store.lookup("orders", key.client_id)  # connected: no handshake below
            await admin.config_resetstat()
            assert await store.lookup("orders", key.client_id) == (True, key)
            assert await command_calls(admin) == {"hmget": 1}
            await admin.config_resetstat()
            assert await store.lookup("orders", None) == (True, None)
            assert await command_calls(admin) == {"hmget": 1}
    finally:
        await store.aclose()


async def test_protected_request_costs_one_redis_command(private_redis: PrivateRedis) -> None:
    """A request through KeyGuard on a Redis store costs one Redis command, and succeeds."""
    await private_redis.start()
    store = RedisStore.from_url(private_redis.url)
    try:
        manager = KeyManager(store)
        await manager.expose("orders")
        issued = await manager.create_key("orders", name="Acme", kind="internal")
        assert issued.secret is not None
        headers = {"X-IBM-Client-Id": issued.client_id, "X-IBM-Client-Secret": issued.secret}
        async with (
            Redis.from_url(private_redis.url) as admin,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=KeyGuard(ok_app, store=store, api="orders")),
                base_url="http://test",
            ) as http,
        ):
            assert (await http.get("/", headers=headers)).status_code == 200  # warm
            await admin.config_resetstat()
            assert (await http.get("/", headers=headers)).status_code == 200
            assert await command_calls(admin) == {"hmget": 1}
    finally:
        await store.aclose()


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The protected app: 200 with a small body."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


# -- outages ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_server_stopped_and_restarted_mid_traffic(private_redis: PrivateRedis) -> None:
    """A dying Redis makes calls raise StoreUnavailable (nothing else); after a restart on
    the same port the same store works again by itself."""
    await private_redis.start()
    store = RedisStore.from_url(private_redis.url, timeout=1.0)
    outcomes: list[str] = []
    causes: list[BaseException | None] = []
    waiting: dict[str, anyio.Event] = {}
    try:
        await expose(store)
        key = record()
        await store.insert_key(key)

        def note(outcome: str) -> None:
            outcomes.append(outcome)
            if outcome in waiting:
                waiting.pop(outcome).set()

        async def traffic() -> None:
            while True:
                try:
                    found = await store.lookup("orders", key.client_id)
                except StoreUnavailable as exc:
                    causes.append(exc.__cause__)
                    note("unavailable")
                    await anyio.sleep(0.01)
                except Exception as exc:  # what the test exists to catch
                    note(f"raised {exc!r}")
                    raise
                else:
                    note("ok" if found == (True, key) else f"wrong answer {found}")
                    await anyio.lowlevel.checkpoint()

        async def wait_for(outcome: str) -> None:
            waiting[outcome] = anyio.Event()
            await waiting[outcome].wait()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(traffic)
                await wait_for("ok")
                await private_redis.stop()
                await wait_for("unavailable")
                await wait_for("unavailable")
                await private_redis.start()
                await wait_for("ok")
                tg.cancel_scope.cancel()
        assert set(outcomes) == {"ok", "unavailable"}
        assert outcomes[-1] == "ok"
        assert all(isinstance(c, (RedisError, OSError, TimeoutError)) for c in causes)
        # Writes work again too (the restarted server has no scripts loaded: NOSCRIPT).
        await store.insert_key(record(name="after restart"))
        assert len(await store.list_keys("orders")) == 2
    finally:
        await store.aclose()


async def test_every_method_raises_store_unavailable_when_redis_is_down() -> None:
    """With nothing listening, every method raises StoreUnavailable with the cause chained."""
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.lookup("orders", None),
        lambda: store.lookup("orders", new_client_id()),
        lambda: store.get_api("orders"),
        lambda: store.list_apis(),
        lambda: store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        ),
        lambda: store.insert_key(record()),
        lambda: store.get_key("orders", new_client_id()),
        lambda: store.list_keys("orders"),
        lambda: store.update_key("orders", new_client_id(), KeyChanges(enabled=False)),
        lambda: store.set_secret_hash("orders", new_client_id(), "h"),
        lambda: store.set_secret_hash("orders", new_client_id(), "h", previous_until=utcnow()),
        lambda: store.delete_key("orders", new_client_id()),
    ]
    try:
        with anyio.fail_after(30):
            for call in calls:
                with pytest.raises(StoreUnavailable) as caught:
                    await call()
                assert isinstance(caught.value.__cause__, (RedisError, OSError))
    finally:
        await store.aclose()


async def test_a_silent_server_times_out_as_store_unavailable() -> None:
    """A server that accepts connections but never answers costs at most ``timeout``,
    then StoreUnavailable."""
    with socket.socket() as silent:
        # The kernel completes the handshake for a listening socket nobody accepts on.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = RedisStore.from_url(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout=0.3)
        try:
            with anyio.fail_after(15), pytest.raises(StoreUnavailable) as caught:
                await store.lookup("orders", None)
        finally:
            await store.aclose()
    assert isinstance(caught.value.__cause__, (TimeoutError, RedisError))
    assert "timed out" in str(caught.value) or "TimeoutError" in str(caught.value)


async def test_wrong_or_missing_password_is_store_unavailable(tmp_path: Path) -> None:
    """Authentication failures raise StoreUnavailable; the password shows nowhere."""
    server = PrivateRedis(tmp_path, "--requirepass", "right-horse-battery")
    try:
        await server.start()
        wrong = f"redis://:wrong-staple-7@127.0.0.1:{server.port}/0"
        for url in (wrong, server.url):
            store = RedisStore.from_url(url, timeout=2.0)
            try:
                with anyio.fail_after(30), pytest.raises(StoreUnavailable) as caught:
                    await store.lookup("orders", None)
            finally:
                await store.aclose()
            assert isinstance(caught.value.__cause__, AuthenticationError)
            assert "wrong-staple-7" not in f"{caught.value} {store!r}"
        good = RedisStore.from_url(
            f"redis://:right-horse-battery@127.0.0.1:{server.port}/0", timeout=2.0
        )
        try:
            assert await good.lookup("orders", None) == (False, None)
            assert "right-horse-battery" not in repr(good)
        finally:
            await good.aclose()
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("stale_data", "operation", "cause"),
    [("yes", "write", ReadOnlyError), ("no", "read", MasterDownError)],
)
async def test_failover_states_are_store_unavailable(
    tmp_path: Path, stale_data: str, operation: str, cause: type[Exception]
) -> None:
    """A replica whose master is gone (READONLY to writes, MASTERDOWN to reads when it
    serves no stale data) makes calls raise StoreUnavailable."""
    server = PrivateRedis(
        tmp_path,
        "--replicaof", "127.0.0.1", str(free_port()),
        "--replica-serve-stale-data", stale_data,
    )  # fmt: skip
    store = RedisStore.from_url(server.url, timeout=2.0)
    try:
        await server.start()
        call = expose(store) if operation == "write" else store.lookup("orders", None)
        with anyio.fail_after(30), pytest.raises(StoreUnavailable) as caught:
            await call
        assert isinstance(caught.value.__cause__, cause)
    finally:
        await store.aclose()
        await server.stop()


# -- the data model ---------------------------------------------------------------------------


async def test_prefixes_isolate_stores_on_one_redis() -> None:
    """Two prefixes on one Redis are two independent stores."""
    async with shared_store() as first, shared_store() as second:
        await expose(first)
        key = record()
        await first.insert_key(key)
        assert await second.get_api("orders") is None
        assert await second.list_apis() == []
        assert await second.lookup("orders", key.client_id) == (False, None)
        assert await second.list_keys("orders") == []
        await expose(second)
        await second.insert_key(record(name="Acme"))  # no duplicate: another store
        assert [a.external_keys for a in await first.list_apis()] == [1]
        assert [a.external_keys for a in await second.list_apis()] == [1]


async def test_all_keys_of_an_api_share_one_cluster_slot() -> None:
    """Every Redis key an API uses hashes to that API's slot (hash tag), as Cluster needs."""
    url = require_server("redis")
    async with shared_store() as store, Redis.from_url(url) as admin:
        for api in ("orders", "billing"):
            await expose(store, api)
            keys = [record(api, f"{kind} {i}", kind) for i in range(3) for kind in KeyKind]
            for key in keys:
                await store.insert_key(key)
            await store.set_secret_hash(api, keys[1].client_id, "h2")
            await store.delete_key(api, keys[0].client_id)
        names = [k.decode() async for k in admin.scan_iter(match=f"{store.prefix}*")]
        by_api: dict[str, set[int]] = {}
        for name in names:
            if name == f"{store.prefix}apis":
                continue
            api = name.split("{", 1)[1].split("}", 1)[0]
            by_api.setdefault(api, set()).add(key_slot(name.encode()))
        assert by_api == {
            "orders": {key_slot(b"orders")},
            "billing": {key_slot(b"billing")},
        }


async def test_created_at_keeps_microseconds_and_comes_back_in_utc() -> None:
    """created_at is kept to the microsecond and read back as an aware UTC datetime."""
    async with shared_store() as store:
        await expose(store)
        moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5)))
        key = KeyRecord("orders", new_client_id(), "Acme", KeyKind.EXTERNAL, None, moment)
        await store.insert_key(key)
        got = await store.get_key("orders", key.client_id)
        assert got is not None
        assert got.created_at == moment
        assert got.created_at.tzinfo == timezone.utc
        assert got.created_at.microsecond == 678901


async def test_lowered_limit_refuses_even_after_deletes_until_below() -> None:
    """With the limit lowered below the count, a delete frees no place until under it."""
    async with shared_store() as store:
        await expose(store)
        keys = [record(name=f"k{i}") for i in range(3)]
        for key in keys:
            await store.insert_key(key)
        await store.upsert_api(
            "orders", exposed=None, max_keys_per_kind=1, default_max_keys_per_kind=5
        )
        await store.delete_key("orders", keys[0].client_id)
        with pytest.raises(KeyLimitReached):
            await store.insert_key(record(name="new"))


# -- clients, loops, configuration --------------------------------------------------------------


async def test_an_existing_client_is_used_and_left_open() -> None:
    """A store over a caller's client works, and aclose leaves that client open."""
    url = require_server("redis")
    prefix = unique_prefix()
    async with Redis.from_url(url) as client:
        store = RedisStore(client, prefix=prefix)
        try:
            assert store.client is client
            await expose(store)
            assert await store.lookup("orders", None) == (True, None)
        finally:
            await store.aclose()
        assert await client.ping() is True
        assert await client.exists(f"{prefix}{{orders}}") == 1
        await delete_prefixed(url, prefix)


async def test_an_existing_client_that_decodes_responses_works() -> None:
    """A caller's client with decode_responses=True reads the same records."""
    url = require_server("redis")
    prefix = unique_prefix()
    async with Redis.from_url(url, decode_responses=True) as client:
        store = RedisStore(client, prefix=prefix)
        try:
            await expose(store)
            key = record(kind=KeyKind.INTERNAL)
            await store.insert_key(key)
            assert await store.lookup("orders", key.client_id) == (True, key)
            assert await store.list_keys("orders") == [key]
            assert [a.internal_keys for a in await store.list_apis()] == [1]
        finally:
            await store.aclose()
            await delete_prefixed(url, prefix)


def test_store_opened_outside_a_loop_works_across_event_loops() -> None:
    """open_store needs no loop; the store then serves one event loop after another and
    leaves no connection open (warnings are errors here)."""
    url = require_server("redis")
    prefix = unique_prefix()
    store = RedisStore.from_url(url, prefix=prefix)

    async def use() -> tuple[bool, KeyRecord | None]:
        return await store.lookup("orders", None)

    async def use_and_close() -> None:
        await store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        assert await use() == (True, None)
        await store.aclose()
        await delete_prefixed(url, prefix)

    assert asyncio.run(use()) == (False, None)
    assert anyio.run(use) == (False, None)
    asyncio.run(use_and_close())
    gc.collect()


def test_rediss_url_configures_tls_without_connecting() -> None:
    """A rediss:// URL gives a client that verifies the server's certificate and host name
    (checked without any server), with the password hidden."""
    store = RedisStore.from_url("rediss://app:p4ssw0rd-x@redis.example.invalid:6380/2")
    pool = store.client.connection_pool
    assert issubclass(pool.connection_class, SSLConnection)
    connection = pool.connection_class(**pool.connection_kwargs)  # builds, does not connect
    assert isinstance(connection, SSLConnection)
    assert connection.ssl_context.cert_reqs == ssl.CERT_REQUIRED
    assert connection.ssl_context.check_hostname is True
    assert (connection.host, connection.port, connection.db) == ("redis.example.invalid", 6380, 2)
    assert repr(store) == "RedisStore('rediss://redis.example.invalid:6380/2', prefix='keyguard:')"
    assert "p4ssw0rd-x" not in repr(store)


def test_plain_redis_url_configures_no_tls_and_the_timeout() -> None:
    """A redis:// URL gives a plain TCP client with the store's timeout on connect and read."""
    store = RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.5)
    pool = store.client.connection_pool
    assert not issubclass(pool.connection_class, SSLConnection)
    assert pool.connection_kwargs["socket_connect_timeout"] == 0.5
    assert pool.connection_kwargs["socket_timeout"] == 0.5


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis://127.0.0.1:6379/0", {"timeout": 0}),
        ("redis://127.0.0.1:6379/0", {"prefix": "{app}:"}),
        ("redis://127.0.0.1:6379/0", {"no_such_option": 1}),
        ("redis://127.0.0.1:not-a-port/0", {}),
        ("http://127.0.0.1:6379/0", {}),
    ],
)
def test_bad_configuration_is_refused_at_once(url: str, options: dict[str, Any]) -> None:
    """Bad options or URLs raise ConfigurationError when the store is opened, not later."""
    with pytest.raises(ConfigurationError):
        RedisStore.from_url(url, **options)


def test_missing_redis_driver_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-py, a redis:// store raises ConfigurationError naming the extra."""
    for name in [n for n in sys.modules if n == "redis" or n.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [n for n in sys.modules if n.startswith("keyguard.stores.redis")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigurationError, match=r"pip install 'keyguard\[redis\]'"):
        open_store("redis://127.0.0.1:6379/0")


# -- the change feed ----------------------------------------------------------------------------


async def test_another_process_delete_reaches_a_cached_store_through_the_feed() -> None:
    """A delete through another store object is announced and drops the cached lookup,
    long before the cache's ttl."""
    async with shared_store() as writer:
        inner = RedisStore.from_url(require_server("redis"), prefix=writer.prefix)
        reader = CachedStore(inner, ttl=600)
        try:
            await expose(writer)
            key = record()
            await writer.insert_key(key)
            assert await reader.lookup("orders", key.client_id) == (True, key)
            await writer.delete_key("orders", key.client_id)

            async def forgotten() -> bool:
                return await reader.lookup("orders", key.client_id) == (True, None)

            await eventually(forgotten)
        finally:
            await reader.aclose()


async def test_watch_reports_each_change_with_its_api_and_key() -> None:
    """Each write is announced as (api, client_id), or (api, None) for the API itself; a
    write that changes nothing (a refused rename, a second delete) announces nothing."""
    async with shared_store() as store:
        seen: list[tuple[str, str | None]] = []
        ready, done = anyio.Event(), anyio.Event()
        key = record()

        def on_change(api: str, client_id: str | None) -> None:
            seen.append((api, client_id))
            if client_id == "last":
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(store.watch, on_change, on_ready=ready.set))
            with anyio.fail_after(30):
                await ready.wait()
                await expose(store)
                await store.insert_key(key)
                await store.insert_key(other := record(name="Other"))
                await store.set_secret_hash("orders", key.client_id, "h")
                await store.set_secret_hash("orders", key.client_id, "h2", previous_until=utcnow())
                await store.update_key("orders", key.client_id, KeyChanges(enabled=False))
                with pytest.raises(DuplicateName):  # refused: nothing changes, no notice
                    await store.update_key("orders", key.client_id, KeyChanges(name="other"))
                await store.delete_key("orders", key.client_id)
                await store.delete_key("orders", key.client_id)  # nothing changes: no notice
                await store.insert_key(dataclasses.replace(record(name="z"), client_id="last"))
                await done.wait()
            tg.cancel_scope.cancel()
        mine = [("orders", key.client_id)]
        assert seen == (
            [("orders", None)]
            + mine
            + [("orders", other.client_id)]
            + mine * 4
            + [("orders", "last")]
        )


def test_a_cache_listens_again_after_its_loop_stopped_with_the_watcher_pending() -> None:
    """A cache whose event loop stopped without ending its tasks (run_until_complete, the
    loop then left idle) has its feed's watcher stuck there; the next loop's lookups
    listen anew, so a change elsewhere is still refused at once (not after the ttl)."""
    url = require_server("redis")
    prefix = unique_prefix()
    writer = RedisStore.from_url(url, prefix=prefix)
    reader = CachedStore(RedisStore.from_url(url, prefix=prefix), ttl=600)
    key = record()

    async def disabled() -> bool:
        found = (await reader.lookup("orders", key.client_id))[1]
        return found is not None and not found.enabled

    async def first() -> asyncio.Task[None] | None:
        await expose(writer)
        await writer.insert_key(key)
        assert await reader.lookup("orders", key.client_id) == (True, key)
        await writer.update_key("orders", key.client_id, KeyChanges(enabled=False))
        await eventually(disabled)  # heard: this loop's watcher listens
        return reader._watcher

    async def forgotten() -> bool:
        return await reader.lookup("orders", key.client_id) == (True, None)

    async def second() -> None:
        assert await disabled()  # still cached from the first loop
        await writer.delete_key("orders", key.client_id)
        await eventually(forgotten)

    stopped = asyncio.new_event_loop()
    stuck: asyncio.Task[None] | None = None
    try:
        stuck = stopped.run_until_complete(first())
        assert stuck is not None
        assert not stuck.done()
        asyncio.run(second())
    finally:

        async def end_stuck_and_clean() -> None:
            if stuck is not None:
                stuck.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stuck

            await delete_prefixed(url, prefix)
            await writer.aclose()
            await reader.aclose()  # (the first loop's connections, there)

        stopped.run_until_complete(end_stuck_and_clean())
        stopped.close()


async def test_a_quiet_feed_stays_up_through_its_pings() -> None:
    """A feed that hears nothing for several timeouts pings its server and, answered, keeps
    listening (no re-listen, no error), then hears the next change."""
    async with shared_store() as writer:
        store = RedisStore.from_url(require_server("redis"), prefix=writer.prefix, timeout=0.2)
        seen: list[tuple[str, str | None]] = []
        readies: list[None] = []
        ready, heard = anyio.Event(), anyio.Event()

        def on_change(api: str, client_id: str | None) -> None:
            seen.append((api, client_id))
            heard.set()

        def on_ready() -> None:
            readies.append(None)
            ready.set()

        try:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(partial(store.watch, on_change, on_ready=on_ready))
                    await ready.wait()
                    await anyio.sleep(1.2)  # six quiet timeouts: pinged, answered
                    await expose(writer)
                    await heard.wait()
                    tg.cancel_scope.cancel()
        finally:
            await store.aclose()
        assert seen == [("orders", None)]
        assert len(readies) == 1


async def test_watch_raises_store_unavailable_when_redis_goes_away(
    private_redis: PrivateRedis,
) -> None:
    """The change feed ends with StoreUnavailable when its server dies, so its user
    (the cache) knows to listen again and to distrust what it holds."""
    await private_redis.start()
    store = RedisStore.from_url(private_redis.url, timeout=1.0)
    ready, broken = anyio.Event(), anyio.Event()

    async def watch_until_broken() -> None:
        with pytest.raises(StoreUnavailable):
            await store.watch(lambda api, client_id: None, on_ready=ready.set)
        broken.set()

    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_until_broken)
                await ready.wait()
                await private_redis.stop()
                await broken.wait()
    finally:
        await store.aclose()


async def test_a_burst_beyond_the_pool_waits_instead_of_failing() -> None:
    """More concurrent calls than the pool has connections queue for one (within the
    timeout) instead of failing: a burst of requests is not a burst of 503s."""
    async with shared_store(max_connections=4) as store:
        await store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        rec = record()
        await store.insert_key(rec)
        answers = await asyncio.gather(*(store.lookup("orders", rec.client_id) for _ in range(200)))
    assert answers == [(True, rec)] * 200


# -- the lifecycle fields (issue 14) ------------------------------------------------------------

FIRST_LAYOUT_MICROS = 1796210861652650  # 2026-12-02T…: a created_at of 16 digits


async def write_first_layout_key(
    admin: Redis, store: RedisStore, *, name: str, kind: KeyKind, secret_hash: str | None
) -> str:
    """A key written as the first layout wrote it (a five-field record), under an API
    the store has created; returns its client id."""
    client_id = new_client_id()
    api = f"{store.prefix}{{orders}}"
    seq = await admin.hincrby(api, "seq", 1)
    await admin.hincrby(api, f"c:{kind.value}", 1)
    folded = name.casefold()
    raw = json.dumps(
        [seq, kind.value, name, folded, FIRST_LAYOUT_MICROS],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    await admin.hset(api, mapping={f"k:{client_id}": raw, f"n:{folded}": client_id})
    if secret_hash is not None:
        await admin.hset(api, f"s:{client_id}", secret_hash)
    return client_id


def first_layout_created_at() -> datetime:
    return datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=FIRST_LAYOUT_MICROS)


async def test_first_layout_records_read_with_the_lifecycle_defaults() -> None:
    """A five-field record of the first layout reads, through every read, as an enabled key
    with no expiry, empty meta, no previous secret, no use and the API's rate limits."""
    url = require_server("redis")
    async with shared_store() as store, Redis.from_url(url) as admin:
        await expose(store)
        client_id = await write_first_layout_key(
            admin, store, name="Straße Café", kind=KeyKind.EXTERNAL, secret_hash="h0"
        )
        expected = KeyRecord(
            "orders", client_id, "Straße Café", KeyKind.EXTERNAL, "h0", first_layout_created_at()
        )
        assert await store.get_key("orders", client_id) == expected
        assert await store.lookup("orders", client_id) == (True, expected)
        assert await store.list_keys("orders") == [expected]
        got = await store.get_key("orders", client_id)
        assert got is not None
        assert (got.enabled, got.expires_at, got.meta, got.rate_limits) == (
            True,
            None,
            EMPTY_META,
            None,
        )
        assert (got.previous_secret_hash, got.previous_secret_expires_at, got.last_used_at) == (
            None,
            None,
            None,
        )


async def test_first_layout_record_takes_update_and_roll_and_reads_back_whole() -> None:
    """update_key and a rolling set_secret_hash on a first-layout record write every field,
    keep its seq, kind and created_at, move its name entry, and read back whole."""
    url = require_server("redis")
    async with shared_store() as store, Redis.from_url(url) as admin:
        await expose(store)
        client_id = await write_first_layout_key(
            admin, store, name="Acme", kind=KeyKind.EXTERNAL, secret_hash="h0"
        )
        expires = datetime(2099, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
        limits = (RateLimit(100, "minute"), RateLimit(5, "second"))
        changes = KeyChanges(
            name="Acme Two",
            enabled=False,
            expires_at=expires,
            meta=load_meta('{"plan":"gold","ids":[1,2],"path":"a/b"}'),
            rate_limits=limits,
        )
        updated = await store.update_key("orders", client_id, changes)
        until = datetime(2099, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
        rolled = await store.set_secret_hash("orders", client_id, "h1/+=", previous_until=until)
        expected = KeyRecord(
            "orders",
            client_id,
            "Acme Two",
            KeyKind.EXTERNAL,
            "h1/+=",
            first_layout_created_at(),
            enabled=False,
            expires_at=expires,
            meta=load_meta('{"plan":"gold","ids":[1,2],"path":"a/b"}'),
            previous_secret_hash="h0",
            previous_secret_expires_at=until,
            rate_limits=limits,
        )
        assert updated == dataclasses.replace(
            expected, secret_hash="h0", previous_secret_hash=None, previous_secret_expires_at=None
        )
        assert rolled == expected
        assert await store.get_key("orders", client_id) == expected
        assert await store.lookup("orders", client_id) == (True, expected)
        assert await store.list_keys("orders") == [expected]
        # The record keeps the first layout's five fields in front (old readers read them).
        raw = await admin.hget(f"{store.prefix}{{orders}}", f"k:{client_id}")
        assert raw is not None
        assert json.loads(raw)[:5] == [1, "external", "Acme Two", "acme two", FIRST_LAYOUT_MICROS]
        # The name entry moved: the old name is free, the new one taken (R3).
        await store.insert_key(record(name="ACME"))
        with pytest.raises(DuplicateName):
            await store.insert_key(record(name="acme TWO"))
        # A roll without a grace period drops the previous secret.
        replaced = await store.set_secret_hash("orders", client_id, "h2")
        assert replaced == dataclasses.replace(
            expected, secret_hash="h2", previous_secret_hash=None, previous_secret_expires_at=None
        )


async def test_first_layout_fixture_keys_read_with_defaults() -> None:
    """Every key of the first layout's fixture reads with the lifecycle defaults, its APIs
    with no rate limits."""
    url = require_server("redis")
    prefix = unique_prefix()
    store = RedisStore.from_url(url, prefix=prefix)
    try:
        await load_redis(url, prefix)
        apis = await store.list_apis()
        assert [api.rate_limits for api in apis] == [()] * len(manifest()["apis"])
        keys = [key for api in apis for key in await store.list_keys(api.name)]
        assert len(keys) == sum(len(api["keys"]) for api in manifest()["apis"])
        for key in keys:
            assert await store.get_key(key.api, key.client_id) == key
            assert (key.enabled, key.expires_at, key.meta, key.rate_limits) == (
                True,
                None,
                EMPTY_META,
                None,
            )
            assert (key.previous_secret_hash, key.previous_secret_expires_at) == (None, None)
            assert key.last_used_at is None
    finally:
        await store.aclose()
        await delete_prefixed(url, prefix)


async def test_update_keeps_fields_a_later_layout_appended() -> None:
    """A record with more fields than this code knows (a later layout) keeps them through
    update_key, so an older process never erases what a newer one wrote."""
    url = require_server("redis")
    async with shared_store() as store, Redis.from_url(url) as admin:
        await expose(store)
        key = record()
        await store.insert_key(key)
        field = f"k:{key.client_id}"
        api = f"{store.prefix}{{orders}}"
        raw = await admin.hget(api, field)
        assert raw is not None
        await admin.hset(api, field, json.dumps([*json.loads(raw), {"future": 1}]))
        updated = await store.update_key("orders", key.client_id, KeyChanges(enabled=False))
        assert updated == dataclasses.replace(key, enabled=False)
        after = await admin.hget(api, field)
        assert after is not None
        assert json.loads(after)[10:] == [{"future": 1}]


async def test_times_keep_microseconds_through_every_write() -> None:
    """expires_at, last_used_at and previous_secret_expires_at come back, in UTC, equal to
    the microsecond (also the one the roll script writes), even beyond 14 digits."""
    async with shared_store() as store:
        await expose(store)
        zone = timezone(timedelta(hours=-7))
        far = datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=zone)
        key = dataclasses.replace(
            record(secret_hash="h0"),
            expires_at=far,
            last_used_at=far - timedelta(microseconds=1),
            previous_secret_hash="older",
            previous_secret_expires_at=far + timedelta(microseconds=1),
        )
        await store.insert_key(key)
        assert await store.get_key("orders", key.client_id) == key
        rolled = await store.set_secret_hash("orders", key.client_id, "h1", previous_until=far)
        assert rolled is not None
        assert rolled.previous_secret_expires_at == far
        assert rolled.previous_secret_hash == "h0"
        got = await store.get_key("orders", key.client_id)
        assert got is not None
        for moment in (got.expires_at, got.last_used_at, got.previous_secret_expires_at):
            assert moment is not None
            assert moment.tzinfo == timezone.utc
            assert moment.microsecond in (854775, 854774)
        assert got.expires_at == far


async def test_api_rate_limits_are_kept_and_none_leaves_them() -> None:
    """upsert_api keeps an API's rate limits; None leaves them, () clears them."""
    async with shared_store() as store:
        limits = (RateLimit(10, "second"),)
        created = await store.upsert_api(
            "orders", exposed=True, max_keys_per_kind=None, default_max_keys_per_kind=5
        )
        assert created.rate_limits == ()
        set_ = await store.upsert_api(
            "orders",
            exposed=None,
            max_keys_per_kind=None,
            default_max_keys_per_kind=5,
            rate_limits=limits,
        )
        assert set_.rate_limits == limits
        left = await store.upsert_api(
            "orders", exposed=False, max_keys_per_kind=3, default_max_keys_per_kind=5
        )
        assert (left.rate_limits, left.exposed, left.max_keys_per_kind) == (limits, False, 3)
        assert [api.rate_limits for api in await store.list_apis()] == [limits]
        cleared = await store.upsert_api(
            "orders",
            exposed=None,
            max_keys_per_kind=None,
            default_max_keys_per_kind=5,
            rate_limits=(),
        )
        assert cleared.rate_limits == ()
        got = await store.get_api("orders")
        assert got is not None
        assert got.rate_limits == ()


RACERS = 8


async def test_concurrent_renames_to_one_name_leave_exactly_one_winner() -> None:
    """Keys renamed at once to one name (in several casings) through separate stores, each
    with its own connection: exactly one wins, the others change nothing (R3)."""
    url = require_server("redis")
    async with shared_store() as store, AsyncExitStack() as stack:
        stores = []
        for _ in range(RACERS):
            other = RedisStore.from_url(url, prefix=store.prefix)
            stack.push_async_callback(other.aclose)
            stores.append(other)
        await expose(store, limit=RACERS + 3)
        keys = [record(name=f"key {i}") for i in range(RACERS)]
        for key in keys:
            await store.insert_key(key)
        for racer in stores:  # each connected before the race
            await racer.lookup("orders", None)
        outcomes: list[KeyRecord | str | None] = [None] * RACERS

        async def rename(i: int) -> None:
            target = "Winner" if i % 2 else "WINNER"
            try:
                outcomes[i] = await stores[i].update_key(
                    "orders", keys[i].client_id, KeyChanges(name=target)
                )
            except DuplicateName:
                outcomes[i] = "duplicate"

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(RACERS):
                    tg.start_soon(rename, i)
        winners = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, KeyRecord)]
        assert len(winners) == 1
        assert outcomes.count("duplicate") == RACERS - 1
        names = {key.client_id: key.name for key in await store.list_keys("orders")}
        winner = outcomes[winners[0]]
        assert isinstance(winner, KeyRecord)
        assert winner.name == names[winner.client_id]
        assert winner.name in ("Winner", "WINNER")
        assert [names[key.client_id] for i, key in enumerate(keys) if i not in winners] == [
            key.name for i, key in enumerate(keys) if i not in winners
        ]
        # The index agrees: the losers keep their own names, the winner holds the new one.
        with pytest.raises(DuplicateName):
            await store.insert_key(record(name="winner"))
        with pytest.raises(DuplicateName):
            await store.insert_key(record(name=keys[(winners[0] + 1) % RACERS].name))
        await store.insert_key(record(name=keys[winners[0]].name))  # its old name is free


async def test_concurrent_changes_of_one_key_lose_none() -> None:
    """Different fields of one key changed at once through separate stores are all kept:
    a change made between another's read and write is read again, never overwritten."""
    url = require_server("redis")
    async with shared_store() as store, AsyncExitStack() as stack:
        await expose(store)
        key = record()
        await store.insert_key(key)
        stores = []
        for _ in range(4):
            other = RedisStore.from_url(url, prefix=store.prefix)
            stack.push_async_callback(other.aclose)
            await other.lookup("orders", None)
            stores.append(other)
        expires = datetime(2030, 1, 1, tzinfo=timezone.utc)
        changes = [
            KeyChanges(name="Renamed"),
            KeyChanges(enabled=False),
            KeyChanges(expires_at=expires),
            KeyChanges(meta=load_meta('{"plan":"gold"}')),
        ]
        for _ in range(5):  # a few rounds, so the writes really interleave
            await store.update_key(
                "orders",
                key.client_id,
                KeyChanges(name="Acme", enabled=True, expires_at=None, meta=EMPTY_META),
            )
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for racer, change in zip(stores, changes, strict=True):
                        tg.start_soon(racer.update_key, "orders", key.client_id, change)
            got = await store.get_key("orders", key.client_id)
            assert got is not None
            assert (got.name, got.enabled, got.expires_at, dict(got.meta)) == (
                "Renamed",
                False,
                expires,
                {"plan": "gold"},
            )


async def test_concurrent_rolls_each_keep_a_whole_pair() -> None:
    """Two rolls with a grace period racing through separate stores end with one new
    secret current and the other as its previous one: neither is lost, the hash both
    replaced is not kept."""
    url = require_server("redis")
    async with shared_store() as store, AsyncExitStack() as stack:
        racers = []
        for _ in range(2):
            other = RedisStore.from_url(url, prefix=store.prefix)
            stack.push_async_callback(other.aclose)
            racers.append(other)
        await expose(store)
        key = record(secret_hash="h0")
        await store.insert_key(key)
        until = utcnow() + timedelta(days=1)
        for round_ in range(10):
            await store.set_secret_hash("orders", key.client_id, f"start{round_}")
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i, racer in enumerate(racers):
                        tg.start_soon(
                            partial(
                                racer.set_secret_hash,
                                "orders",
                                key.client_id,
                                f"new{round_}-{i}",
                                previous_until=until,
                            )
                        )
            got = await store.get_key("orders", key.client_id)
            assert got is not None
            pair = (got.secret_hash, got.previous_secret_hash)
            first, second = f"new{round_}-0", f"new{round_}-1"
            assert pair in ((first, second), (second, first))


async def test_roll_without_a_current_secret_keeps_no_previous() -> None:
    """A first secret set with previous_until keeps no previous secret; an internal key
    or an unknown one changes nothing and answers None."""
    async with shared_store() as store:
        await expose(store)
        key = record()
        internal = record(name="Internal", kind=KeyKind.INTERNAL, secret_hash="fixed")
        await store.insert_key(key)
        await store.insert_key(internal)
        until = utcnow() + timedelta(hours=1)
        first = await store.set_secret_hash("orders", key.client_id, "h1", previous_until=until)
        assert first == dataclasses.replace(key, secret_hash="h1")
        assert (
            await store.set_secret_hash("orders", internal.client_id, "x", previous_until=until)
            is None
        )
        assert await store.set_secret_hash("orders", new_client_id(), "x") is None
        assert await store.get_key("orders", internal.client_id) == internal


async def test_update_of_a_missing_key_is_none_and_changes_nothing() -> None:
    """update_key of an unknown key, or of another API's key, answers None and writes
    nothing; no change given answers the key as it is."""
    url = require_server("redis")
    async with shared_store() as store, Redis.from_url(url) as admin:
        await expose(store)
        await expose(store, "billing")
        key = record()
        await store.insert_key(key)
        before = await admin.hgetall(f"{store.prefix}{{orders}}")
        change = KeyChanges(name="Other", enabled=False)
        assert await store.update_key("orders", new_client_id(), change) is None
        assert await store.update_key("billing", key.client_id, change) is None
        assert await store.update_key("nowhere", key.client_id, change) is None
        assert await store.update_key("orders", key.client_id, KeyChanges()) == key
        assert await admin.hgetall(f"{store.prefix}{{orders}}") == before
        assert await admin.exists(f"{store.prefix}{{nowhere}}") == 0


async def test_another_process_change_reaches_a_cached_store_through_the_feed() -> None:
    """update_key and set_secret_hash through another store object are announced and drop
    the cached lookup long before the cache's ttl: a disabled key or a replaced secret is
    refused at once by a KeyManager over the cache."""
    async with shared_store() as writer:
        inner = RedisStore.from_url(require_server("redis"), prefix=writer.prefix)
        reader = CachedStore(inner, ttl=600)
        manager = KeyManager(reader)
        try:
            await KeyManager(writer).expose("orders")
            issued = await KeyManager(writer).create_key("orders", name="Acme", kind="external")
            secret = await KeyManager(writer).set_secret("orders", issued.client_id)
            found = await reader.lookup("orders", issued.client_id)
            assert found[1] is not None
            assert found[1].enabled is True

            await writer.update_key("orders", issued.client_id, KeyChanges(enabled=False))

            async def disabled() -> bool:
                outcome = await manager.authenticate("orders", issued.client_id, str(secret))
                return outcome is Denial.DISABLED

            await eventually(disabled)
            await writer.update_key("orders", issued.client_id, KeyChanges(enabled=True))
            replaced = await KeyManager(writer).set_secret("orders", issued.client_id)

            async def replaced_seen() -> bool:
                old = await manager.authenticate("orders", issued.client_id, str(secret))
                new = await manager.authenticate("orders", issued.client_id, str(replaced))
                return old is Denial.INVALID_SECRET and isinstance(new, KeyInfo)

            await eventually(replaced_seen)
        finally:
            await reader.aclose()
