"""What only the Redis Cluster store promises, tested against real local clusters.

The contract suites, the middleware, manager and lifecycle tests already run on
the cluster through the ``store`` fixture (backend id ``cluster``: the session's
cluster of three masters, see ``tests/backends/cluster.py``). These add what is
specific to a cluster: the URL, the API index living in a slot of its own,
processes racing for keys and for rate-limit places, the change feed heard on
every node, bursts, and one failover on a private cluster with replicas.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyManager, KeyStore
from keyguard.errors import ConfigurationError, StoreUnavailable
from keyguard.stores import CachedStore, open_store
from keyguard.stores.redis_cluster import RedisClusterStore
from tests.backends import open_test_store
from tests.backends.cluster import (
    LocalCluster,
    delete_prefixed_in_cluster,
    open_cluster_test_store,
    shared_cluster,
)
from tests.backends.redis import unique_prefix
from tests.helpers import eventually, expose, record
from tests.stores.racing import race_for_keys
from tests.test_rate_limits import _hammer

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"


@pytest.fixture
async def cluster_store(tmp_path: Path) -> AsyncIterator[RedisClusterStore]:
    """An empty store on the session's cluster, removed afterwards."""
    async with open_cluster_test_store("cluster", tmp_path) as store:
        yield store


# -- the URL --------------------------------------------------------------------------------------


def test_open_store_maps_cluster_urls_without_io() -> None:
    """redis+cluster:// and rediss+cluster:// open a RedisClusterStore (TLS for the second)
    behind the cache, with no I/O and no event loop; the password is never shown."""
    store = open_store("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    assert isinstance(store, CachedStore)
    inner = store.store
    assert isinstance(inner, RedisClusterStore)
    shown = f"{inner!r} {inner.description}"
    for text in (repr(inner), inner.description):  # an IPv6 node bracketed, as in the URL
        assert "redis+cluster://10.0.0.1:7000,10.0.0.2:7001,[::1]:7002" in text
    assert "s3cret" not in shown
    nodes = {(node.host, int(node.port)) for node in inner.client.startup_nodes}
    assert nodes == {("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002)}
    assert inner.client.nodes_manager.connection_kwargs["password"] == "s3cret"
    tls = open_store("rediss+cluster://app:pw@redis.example.com:6380", cache_ttl=0)
    assert isinstance(tls, RedisClusterStore)
    assert repr(tls).startswith("RedisClusterStore('rediss+cluster://")
    assert tls.client.nodes_manager.connection_kwargs["username"] == "app"


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://host:notaport",
        "redis+cluster://host:70000",
        "redis+cluster://a:1,,b:2",
        "redis+cluster://a:1/3",
        "redis+cluster://a:1?ssl_cert_reqs=none",
        "redis+cluster://[::1:7000",
    ],
)
def test_bad_cluster_urls_are_refused_at_once(url: str) -> None:
    """A malformed cluster URL (no host, bad port, a database other than 0, a query) is a
    ConfigurationError when the store is opened."""
    with pytest.raises(ConfigurationError):
        open_store(url)


def test_a_misspelt_option_is_refused_at_once() -> None:
    with pytest.raises(ConfigurationError, match="invalid Redis Cluster store URL or option"):
        open_store("redis+cluster://127.0.0.1:7000", socket_timout=1)


@pytest.mark.parametrize("value", [0, "x", "50", 2.5, True, None])
def test_a_bad_max_connections_is_refused_at_once(value: object) -> None:
    """``max_connections`` must be a whole number of at least 1 (the gate's places): anything
    else is a ConfigurationError, as on the standalone store (a text raised ValueError; a
    float or True was rounded into a gate)."""
    with pytest.raises(ConfigurationError, match="max_connections"):
        open_store("redis+cluster://127.0.0.1:7000", max_connections=value)


def test_the_rate_limiter_defaults_to_the_cluster() -> None:
    """KeyGuard over a cluster store counts rate limits on the same cluster, through limits'
    cluster storage (redis-py); a TLS cluster keeps TLS."""
    app = KeyGuard(Starlette(), store=open_store("redis+cluster://h1:7000,h2:7001"), api="a")
    assert app.rate_limiter.uri == "async+redis+cluster://h1:7000,h2:7001"
    tls = KeyGuard(Starlette(), store=open_store("rediss+cluster://:pw@h1:7000"), api="a")
    assert tls.rate_limiter.uri == "async+redis+cluster://:pw@h1:7000"
    assert tls.rate_limiter._options["ssl"] is True
    assert "pw" not in repr(tls.rate_limiter)


async def test_unreachable_cluster_is_store_unavailable_within_the_timeout() -> None:
    """No node answers: every call raises StoreUnavailable (never a redis-py error)."""
    from tests.test_real_servers import free_port

    store = RedisClusterStore.from_url(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.5)
    try:
        with anyio.fail_after(10):
            for call in (
                lambda: store.lookup("orders", "x"),
                lambda: store.list_apis(),
                lambda: expose(store),
                lambda: store.insert_key(record()),
            ):
                with pytest.raises(StoreUnavailable, match="Redis Cluster at redis"):
                    await call()
    finally:
        await store.aclose()


# -- the index of APIs, in a slot of its own -----------------------------------------------------


async def test_apis_on_every_master_are_listed(cluster_store: RedisClusterStore) -> None:
    """APIs whose hashes live on different masters are all listed, with their counts."""
    cluster = shared_cluster()
    names = [f"api{n}" for n in range(12)]
    for name in names:
        await expose(cluster_store, name)
    await cluster_store.insert_key(record(api="api3"))
    masters = {cluster.master_of(f"{cluster_store.prefix}{{{name}}}") for name in names}
    assert len(masters) == 3  # the names do spread over the three masters
    listed = await cluster_store.list_apis()
    assert [api.name for api in listed] == sorted(names)
    assert [api.external_keys for api in listed if api.name == "api3"] == [1]


async def test_an_indexed_name_without_its_hash_is_skipped_then_completed(
    cluster_store: RedisClusterStore,
) -> None:
    """A process that died between indexing a new API and creating it leaves a name with no
    hash: it is not listed, the API does not exist, and the next upsert completes it."""
    await cluster_store.client.zadd(f"{cluster_store.prefix}apis", {"ghost": 0})
    assert await cluster_store.list_apis() == []
    assert await cluster_store.get_api("ghost") is None
    await expose(cluster_store, "ghost")
    assert [api.name for api in await cluster_store.list_apis()] == ["ghost"]


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_an_api_that_exists_is_always_listed_under_racing_deletes(
    backend: str, tmp_path: Path
) -> None:
    """upsert_api racing delete_api on one API, many times: whenever the API exists after
    a round, list_apis has it (the index is written beside the scripts, never in them)."""
    async with open_test_store(backend, tmp_path) as store:
        for _ in range(40):
            await asyncio.gather(
                expose(store, "hot"),
                store.delete_api("hot", force=True),
                expose(store, "hot"),
                store.delete_api("hot", force=True),
            )
            exists = await store.get_api("hot") is not None
            listed = [api.name for api in await store.list_apis()]
            assert listed == (["hot"] if exists else [])


# -- many processes -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_four_processes_racing_on_the_cluster_get_exactly_five_keys_per_kind(
    cluster_store: RedisClusterStore, tmp_path: Path
) -> None:
    """R2 holds across processes on a cluster: four interpreters racing for keys of one API
    get exactly max_keys_per_kind (5) of each kind between them."""
    await expose(cluster_store, "race")
    accepted = await race_for_keys(shared_cluster().url, cluster_store.prefix, tmp_path)
    assert accepted == ["external"] * 5 + ["internal"] * 5
    api = await cluster_store.get_api("race")
    assert api is not None
    assert (api.internal_keys, api.external_keys) == (5, 5)
    assert len(await cluster_store.list_keys("race")) == 10


@pytest.mark.slow
async def test_four_processes_admit_exactly_the_limit_counting_on_the_cluster(
    cluster_store: RedisClusterStore,
) -> None:
    """4 processes x 60 requests on one key limited to 100/minute, each KeyGuard counting on
    the cluster (the default for a cluster store): exactly 100 admitted."""
    url = shared_cluster().url
    manager = KeyManager(cluster_store)
    await manager.expose("orders")
    key = await manager.create_key(
        "orders", name="Acme", kind="external", rate_limits=["100/minute"]
    )
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    out = context.Queue()
    procs = [
        context.Process(
            target=_hammer, args=(url, cluster_store.prefix, key.client_id, 60, start, out)
        )
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    try:
        start.set()
        results = [await anyio.to_thread.run_sync(out.get, True, 120) for _ in procs]
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * 4
        assert sum(results) == 100
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        # The counters are the rate limiter's, under its own prefix: remove this key's.
        for port in shared_cluster().ports:
            node = shared_cluster().node(port)
            for counter in node.scan_iter(match=f"keyguard-rl:*{key.client_id}*"):
                node.delete(counter)


# -- the change feed ----------------------------------------------------------------------------


class FeedCountingStore(RedisClusterStore):
    """A cluster store whose change feed counts what it hears."""

    def count_feed(self) -> None:
        self.heard: list[tuple[str, str | None]] = []
        self.ready = asyncio.Event()
        self.notice = asyncio.Event()

    async def watch(
        self, on_change: Callable[[str, str | None], None], *, on_ready: Callable[[], None]
    ) -> None:
        def changed(api: str, client_id: str | None) -> None:
            self.heard.append((api, client_id))
            on_change(api, client_id)
            self.notice.set()

        def ready() -> None:
            on_ready()
            self.ready.set()

        await super().watch(changed, on_ready=ready)


def feed_counting_store(url: str, prefix: str, **options: Any) -> FeedCountingStore:
    """A ``FeedCountingStore`` on ``url`` under ``prefix``."""
    store = FeedCountingStore.from_url(url, prefix=prefix, **options)
    assert isinstance(store, FeedCountingStore)
    store.count_feed()
    return store


async def test_a_change_reaches_a_cache_listening_on_any_node(
    cluster_store: RedisClusterStore,
) -> None:
    """A key disabled (then deleted) through one store object is refused at once by a
    CachedStore (ttl 10 minutes) over another, whichever node its feed listens on: the
    notice published on the API's master is heard on every node."""
    cluster = shared_cluster()
    manager = KeyManager(cluster_store)
    await manager.expose("orders")
    master = cluster.master_of(f"{cluster_store.prefix}{{orders}}")
    listened: set[str] = set()
    for turn in range(3):
        inner = feed_counting_store(cluster.url, cluster_store.prefix)
        inner._feed_turn = turn  # one reader per node, in turn
        reader = CachedStore(inner, ttl=600)
        try:
            key = await manager.create_key("orders", name=f"Acme {turn}", kind="external")
            exposed, found = await reader.lookup("orders", key.client_id)
            assert exposed  # and the key is cached now:
            assert found is not None
            assert found.enabled
            with anyio.fail_after(30):
                await inner.ready.wait()
            assert inner.feed_node is not None
            listened.add(inner.feed_node)
            inner.notice.clear()
            await manager.update_key("orders", key.client_id, enabled=False)
            with anyio.fail_after(30):
                while ("orders", key.client_id) not in inner.heard:
                    await inner.notice.wait()
                    inner.notice.clear()
            exposed, found = await reader.lookup("orders", key.client_id)
            assert found is not None
            assert not found.enabled
            heard = len(inner.heard)
            await manager.delete_key("orders", key.client_id)
            with anyio.fail_after(30):
                while len(inner.heard) == heard:
                    await inner.notice.wait()
                    inner.notice.clear()
            assert await reader.lookup("orders", key.client_id) == (True, None)
        finally:
            await reader.aclose()
    assert listened == {f"127.0.0.1:{port}" for port in cluster.ports}
    assert f"127.0.0.1:{master}" in listened  # so two of the three were not the API's master


async def _listen_or_lose_setup(
    store: FeedCountingStore, readies: list[None], settled: anyio.Event
) -> None:
    """``store.watch``, each ``on_ready`` appended to ``readies``; ``settled`` is set once
    it listens, or when its first connect outlasted the store's short timeout (a loaded
    machine: the set-up lost, not what is tested), which ends it quietly."""

    def ready() -> None:
        readies.append(None)
        settled.set()

    try:
        await store.watch(lambda api, client_id: None, on_ready=ready)
    except StoreUnavailable:
        if readies:
            raise  # after it listened: what the test is about
        settled.set()


async def test_a_quiet_feed_on_any_node_stays_up_through_its_pings(
    cluster_store: RedisClusterStore,
) -> None:
    """A feed that hears nothing for several timeouts pings its node and, answered, keeps
    listening (no re-listen, no error) on every node, then hears the next change."""
    cluster = shared_cluster()
    for turn in range(3):
        for _attempt in range(5):
            store = feed_counting_store(cluster.url, cluster_store.prefix, timeout=0.2)
            store._feed_turn = turn
            readies: list[None] = []
            settled = anyio.Event()  # listening, or its set-up lost
            try:
                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_listen_or_lose_setup, store, readies, settled)
                        await settled.wait()
                        if not readies:
                            continue  # set-up only, on a loaded machine: start again
                        await anyio.sleep(1.2)  # six quiet timeouts: pinged, answered
                        await cluster_store.upsert_api(
                            "orders",
                            exposed=True,
                            max_keys_per_kind=None,
                            default_max_keys_per_kind=5,
                        )
                        await store.notice.wait()
                        tg.cancel_scope.cancel()
            finally:
                await store.aclose()
            break
        else:
            pytest.fail("the feed never started listening within 0.2 s in five tries")
        assert store.heard == [("orders", None)]
        assert len(readies) == 1


# -- the client ----------------------------------------------------------------------------------


async def test_a_burst_beyond_the_pool_waits_instead_of_failing(tmp_path: Path) -> None:
    """More concurrent calls than a node has connections queue for a place (within the
    timeout) instead of failing: a burst of requests is not a burst of 503s."""
    async with open_cluster_test_store("cluster", tmp_path, max_connections=4) as store:
        await expose(store)
        key = record()
        await store.insert_key(key)
        answers = await asyncio.gather(*(store.lookup("orders", key.client_id) for _ in range(300)))
    assert answers == [(True, key)] * 300


def test_store_opened_outside_a_loop_works_across_event_loops() -> None:
    """One store, two asyncio.run calls one after the other: both work, and the first
    loop's client is closed with its loop."""
    cluster = shared_cluster()
    prefix = unique_prefix()
    store = RedisClusterStore.from_url(cluster.url, prefix=prefix)

    async def use(n: int) -> int:
        await expose(store, f"api{n}")
        return len(await store.list_apis())

    try:
        assert asyncio.run(use(1)) == 1
        assert asyncio.run(use(2)) == 2
        assert len(store._by_loop) == 0  # each loop's client went with its loop
    finally:
        asyncio.run(store.aclose())
        asyncio.run(delete_prefixed_in_cluster(cluster, prefix))


async def test_an_existing_cluster_client_is_used_and_left_open() -> None:
    """RedisClusterStore(client) uses the client as it is and leaves it open at aclose."""
    cluster = shared_cluster()
    prefix = unique_prefix()
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.ports[0])])
    try:
        store = RedisClusterStore(client, prefix=prefix)
        assert store.client is client
        assert store.counter_url is None
        await expose(store)
        await store.aclose()
        assert await client.hget(f"{prefix}{{orders}}", "exposed") == b"1"
    finally:
        await client.aclose()
        await delete_prefixed_in_cluster(cluster, prefix)


class _RecordingCluster(RedisCluster):
    """A real cluster client noting when its start-up ended and when commands began."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.events: list[str] = []

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        client = await super().initialize(*args, **kwargs)
        if "started" not in self.events:
            self.events.append("started")
        return client

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        self.events.append("command")
        return await super().execute_command(*args, **kwargs)


async def test_first_calls_racing_on_a_fresh_client_wait_for_its_start_up() -> None:
    """Six store objects on one fresh client racing their first calls send no command
    before the client has learnt the cluster (redis-py recycled a connection still
    being opened when first commands raced its start-up), and all agree."""
    cluster = shared_cluster()
    prefix = unique_prefix()
    client = _RecordingCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.ports[0])])
    racers = [RedisClusterStore(client, prefix=prefix) for _ in range(6)]
    try:
        found = await asyncio.gather(*(racer.id_tag_key() for racer in racers))
        assert len(set(found)) == 1
        assert client.events[0] == "started"
        assert client.events.count("command") >= 6
    finally:
        await client.aclose()
        await delete_prefixed_in_cluster(cluster, prefix)


async def test_a_connection_torn_down_inside_redis_py_is_store_unavailable(
    cluster_store: RedisClusterStore,
) -> None:
    """redis-py writing on a connection whose writer went away under it fails inside its
    own code: before 8.2 with an ``AttributeError`` (``'NoneType' object has no attribute
    'writelines'``), from 8.2 with its own ``ConnectionError``. Either way the store
    answers StoreUnavailable (a 503 at the front doors)."""
    from redis.asyncio.connection import Connection

    closed = Connection(host="127.0.0.1", port=shared_cluster().ports[0])  # never opened

    async def write_on_closed(client: RedisCluster) -> None:
        await closed._send_packed_command([b"PING\r\n"])

    with pytest.raises(StoreUnavailable, match=r"\((AttributeError|ConnectionError)\)"):
        await cluster_store._call(write_on_closed)


async def test_an_attribute_error_is_a_failure_only_when_redis_py_raised_it(
    cluster_store: RedisClusterStore,
) -> None:
    """The AttributeError redis-py before 8.2 raised from a torn-down connection (its
    innermost frame in a ``redis.`` module, about a ``None``) is StoreUnavailable; an
    AttributeError of the caller's own, worded the same, stays what it is. The first is
    raised here by a function whose module is named as redis-py's, so that this holds
    whichever redis-py is installed."""
    namespace: dict[str, object] = {"__name__": "redis.asyncio.connection"}
    exec(  # noqa: S102 - a fixed snippet: a function living in a module named as redis-py's
        "def send(writer):\n    writer.writelines([b'PING'])\n", namespace
    )
    send = namespace["send"]
    assert callable(send)

    async def torn_down(client: RedisCluster) -> None:
        send(None)

    with pytest.raises(StoreUnavailable, match=r"\(AttributeError\)"):
        await cluster_store._call(torn_down)

    async def own_bug(client: RedisCluster) -> None:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    with pytest.raises(AttributeError):
        await cluster_store._call(own_bug)


# -- a failover ----------------------------------------------------------------------------------


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"name": request.state.keyguard.name})


@pytest.mark.slow
async def test_a_killed_master_fails_closed_then_its_replica_takes_over(tmp_path: Path) -> None:
    """A private cluster of 3 masters with a replica each; the master holding the API is
    killed mid-traffic. Every request answers 200 (the good key only) or 503, never 500,
    and a deleted or disabled key is never admitted; once the replica has taken over,
    the good key is admitted again, writes work, and the change feed (which listened on
    the killed master) hears changes again, from another node."""
    cluster = LocalCluster(tmp_path / "failover", masters=3, replicas=1, node_timeout=2000)
    await anyio.to_thread.run_sync(cluster.start)
    prefix = unique_prefix()
    writer = RedisClusterStore.from_url(cluster.url, prefix=prefix, timeout=1.0)
    inner = feed_counting_store(cluster.url, prefix, timeout=1.0)
    store: KeyStore = CachedStore(inner, ttl=1.0)
    app = KeyGuard(Starlette(routes=[Route("/", hello)]), store=store, api="orders")
    try:
        manager = KeyManager(writer)
        await manager.expose("orders")
        good = await manager.create_key("orders", name="Good", kind="external")
        disabled = await manager.create_key("orders", name="Disabled", kind="external")
        await manager.update_key("orders", disabled.client_id, enabled=False)
        deleted = await manager.create_key("orders", name="Deleted", kind="external")
        await manager.delete_key("orders", deleted.client_id)
        master = cluster.master_of(f"{prefix}{{orders}}")
        # The feed listens on the master about to die.
        await inner.client.initialize()
        names = sorted(node.name for node in inner.client.get_nodes())
        inner._feed_turn = names.index(f"127.0.0.1:{master}")
        await anyio.to_thread.run_sync(cluster.wait_replicated, master)

        statuses: dict[str, list[int]] = {"good": [], "disabled": [], "deleted": []}
        ids = {"good": good.client_id, "disabled": disabled.client_id, "deleted": deleted.client_id}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:

            async def round_of_requests() -> None:
                for which, client_id in ids.items():
                    response = await http.get("/", headers={ID: client_id})
                    statuses[which].append(response.status_code)

            await round_of_requests()
            with anyio.fail_after(30):
                await inner.ready.wait()
            assert inner.feed_node == f"127.0.0.1:{master}"
            assert statuses == {"good": [200], "disabled": [401], "deleted": [401]}
            inner.ready.clear()

            await anyio.to_thread.run_sync(cluster.kill, master)

            async def refused(client_id: str) -> bool:
                response = await http.get("/", headers={ID: client_id})
                return response.status_code == 401

            async def recovered() -> bool:
                await round_of_requests()
                return statuses["good"][-1] == 200 and inner.ready.is_set()

            await eventually(recovered, deadline=120)
            for _ in range(5):
                await round_of_requests()

            assert set(statuses["good"]) <= {200, 503}
            assert set(statuses["disabled"]) <= {401, 503}
            assert set(statuses["deleted"]) <= {401, 503}
            assert statuses["good"][-5:] == [200] * 5
            assert statuses["disabled"][-5:] == statuses["deleted"][-5:] == [401] * 5
            assert cluster.master_of(f"{prefix}{{orders}}") != master  # a replica took over
            assert inner.feed_node != f"127.0.0.1:{master}"

            # Writes work again, and the feed (now on another node) hears them. While the
            # client settles on the new layout the feed may re-subscribe (a notice sent in
            # between is missed, and the cache starts afresh): write until one is heard.
            async def heard_a_write() -> bool:
                try:
                    await manager.update_key("orders", good.client_id, meta={"n": len(statuses)})
                except StoreUnavailable:
                    return False
                inner.notice.clear()
                with anyio.move_on_after(2):
                    while ("orders", good.client_id) not in inner.heard:
                        await inner.notice.wait()
                        inner.notice.clear()
                return ("orders", good.client_id) in inner.heard

            await eventually(heard_a_write)
            await manager.update_key("orders", good.client_id, enabled=False)
            await eventually(lambda: refused(good.client_id))
    finally:
        await app.aclose()
        await store.aclose()
        await writer.aclose()
        cluster.stop()
