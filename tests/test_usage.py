"""Per-key usage (SPEC §10): counted on the request path in memory, written in batches.

Admitted requests and 429s are counted exactly; the store sees one write per
flush, never one per request; flushes happen in the background, on the
lifespan's shutdown (before the app's own shutdown) and in ``aclose``; a
failed write is kept for the next; four processes flushing the same hour of
one key on a shared store sum exactly. ``KeyManager.usage`` answers SPEC
§10's JSON shapes with every hour present.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyManager, KeyStore, MemoryStore
from keyguard.errors import (
    ConfigurationError,
    InvalidRequest,
    KeyNotFound,
    StoreUnavailable,
)
from keyguard.models import rfc3339, utcnow
from keyguard.usage import RETENTION, UsageCount, UsageRecorder, hour_start
from tests.backends import open_test_store
from tests.helpers import CountingStore, run_asgi

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"name": request.state.keyguard.name})


def guarded(store: KeyStore, **options: Any) -> KeyGuard:
    return KeyGuard(Starlette(routes=[Route("/", hello)]), store=store, api="orders", **options)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def counting() -> CountingStore:
    """A memory store behind a call counter, with API ``orders`` exposed."""
    store = CountingStore(MemoryStore())
    await KeyManager(store).expose("orders")
    return store


async def send(http: httpx.AsyncClient, client_id: str, n: int) -> list[int]:
    return [(await http.get("/", headers={ID: client_id})).status_code for _ in range(n)]


async def test_admitted_and_rate_limited_requests_are_counted_exactly(
    counting: CountingStore,
) -> None:
    """7 requests on a 3/minute key (3 admitted, 4 answered 429) and 5 on an unlimited key:
    after one flush the store holds exactly those counts, in the current hour."""
    manager = KeyManager(counting)
    limited = await manager.create_key(
        "orders", name="L", kind="external", rate_limits=["3/minute"]
    )
    free = await manager.create_key("orders", name="F", kind="external")
    guard = guarded(counting)
    async with client(guard) as http:
        assert await send(http, limited.client_id, 7) == [200] * 3 + [429] * 4
        assert await send(http, free.client_id, 5) == [200] * 5
        await http.get("/", headers={ID: "0" * 32})  # unknown: not a key's traffic
    assert guard.usage is not None
    await guard.usage.flush()
    usage = await manager.usage("orders", hours=2)
    assert usage["hours"][-1]["start"] == rfc3339(hour_start(utcnow()))
    assert usage["hours"][-1]["requests"] == 8
    assert usage["hours"][-1]["rate_limited"] == 4
    assert usage["hours"][0] == {
        "start": usage["hours"][0]["start"],
        "requests": 0,
        "rate_limited": 0,
    }
    assert usage["keys"] == [
        {"client_id": limited.client_id, "name": "L", "requests": 3, "rate_limited": 4},
        {"client_id": free.client_id, "name": "F", "requests": 5, "rate_limited": 0},
    ]
    await guard.aclose()


async def test_no_store_write_per_request(counting: CountingStore) -> None:
    """200 admitted requests cause no usage write until a flush, then exactly one write of
    every key's counts; a flush with nothing counted writes nothing."""
    manager = KeyManager(counting)
    keys = [await manager.create_key("orders", name=f"K{n}", kind="external") for n in range(3)]
    guard = guarded(counting)
    counting.calls.clear()
    async with client(guard) as http:
        for n in range(200):
            assert (await http.get("/", headers={ID: keys[n % 3].client_id})).status_code == 200
    assert counting.calls["record_usage"] == 0
    assert set(counting.calls) == {"lookup", "get_api"}  # reads only (get_api: rate limits)
    assert guard.usage is not None
    await guard.usage.flush()
    assert counting.calls["record_usage"] == 1
    await guard.usage.flush()
    assert counting.calls["record_usage"] == 1
    usage = await manager.usage("orders")
    assert [k["requests"] for k in usage["keys"]] == [67, 67, 66]
    await guard.aclose()


async def test_counts_are_flushed_in_the_background(counting: CountingStore) -> None:
    """With usage_flush=0.05 the counts reach the store by themselves, in few writes."""
    manager = KeyManager(counting)
    key = await manager.create_key("orders", name="K", kind="external")
    guard = guarded(counting, usage_flush=0.05)
    async with client(guard) as http:
        await send(http, key.client_id, 10)
        with anyio.fail_after(10):
            while True:  # polled: the flush task writes on its own schedule
                hours = (await manager.usage("orders", key.client_id))["hours"]
                if hours[-1]["requests"] == 10:
                    break
                await anyio.sleep(0.02)
    assert 1 <= counting.calls["record_usage"] <= 2
    await guard.aclose()


async def test_aclose_flushes(counting: CountingStore) -> None:
    """``KeyGuard.aclose()`` writes what was counted, and sets the key's last_used_at."""
    manager = KeyManager(counting)
    key = await manager.create_key("orders", name="K", kind="external")
    assert key.last_used_at is None
    guard = guarded(counting)
    before = utcnow()
    async with client(guard) as http:
        await send(http, key.client_id, 4)
    await guard.aclose()
    assert (await manager.usage("orders", key.client_id))["hours"][-1]["requests"] == 4
    used = (await manager.get_key("orders", key.client_id)).last_used_at
    assert used is not None
    assert before <= used <= utcnow()


async def test_lifespan_shutdown_flushes_before_the_apps_shutdown(
    counting: CountingStore,
) -> None:
    """The counts are written when the server announces the shutdown, before the app's own
    shutdown runs (here it makes the store fail, as closing it would); the lifespan
    messages pass unchanged."""
    manager = KeyManager(counting)
    key = await manager.create_key("orders", name="K", kind="external")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        counting.fail_with = StoreUnavailable("closed by the app")

    guard = KeyGuard(
        Starlette(routes=[Route("/", hello)], lifespan=lifespan), store=counting, api="orders"
    )
    async with client(guard) as http:
        await send(http, key.client_id, 3)
    sent = await run_asgi(
        guard,
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    counting.fail_with = None
    assert counting.calls["record_usage"] == 1
    assert (await manager.usage("orders", key.client_id))["hours"][-1]["requests"] == 3


async def test_a_failed_write_is_kept_for_the_next(
    counting: CountingStore, caplog: pytest.LogCaptureFixture
) -> None:
    """While the store fails, flushes keep the counts (one WARNING); the next flush that
    works writes all of them."""
    manager = KeyManager(counting)
    key = await manager.create_key("orders", name="K", kind="external")
    guard = guarded(counting)
    assert guard.usage is not None
    async with client(guard) as http:
        await send(http, key.client_id, 2)
        counting.fail_with = StoreUnavailable("down")
        with caplog.at_level(logging.WARNING, logger="keyguard"):
            await guard.usage.flush()
            await guard.usage.flush()
        counting.fail_with = None
        await send(http, key.client_id, 3)
    warnings = [r for r in caplog.records if "usage could not be written" in r.getMessage()]
    assert len(warnings) == 1
    await guard.usage.flush()
    assert (await manager.usage("orders", key.client_id))["hours"][-1]["requests"] == 5
    await guard.aclose()


async def test_usage_counting_can_be_turned_off(counting: CountingStore) -> None:
    """usage_flush=0 or None counts nothing and never writes; a bad value is refused."""
    manager = KeyManager(counting)
    key = await manager.create_key("orders", name="K", kind="external")
    for off in (0, None):
        guard = guarded(counting, usage_flush=off)
        assert guard.usage is None
        async with client(guard) as http:
            await send(http, key.client_id, 2)
        await guard.aclose()
    assert counting.calls["record_usage"] == 0
    for bad in (-1, True, "10", 7200):
        with pytest.raises(ConfigurationError, match="usage_flush"):
            guarded(counting, usage_flush=bad)


async def test_hours_are_buckets_of_the_wall_clock(counting: CountingStore) -> None:
    """Counts made before an hour boundary and after it land in two buckets; last_used_at is
    the time of the write carrying the latest admitted request (a 429 does not move it)."""
    manager = KeyManager(counting)
    key = await manager.create_key("orders", name="K", kind="external")
    base = hour_start(utcnow())
    now = [base.timestamp() - 1.5]
    recorder = UsageRecorder(counting, clock=lambda: now[0])
    recorder.admitted("orders", key.client_id)
    recorder.admitted("orders", key.client_id)
    now[0] = base.timestamp()
    await recorder.flush()  # as the task does at the boundary
    now[0] += 0.5
    recorder.admitted("orders", key.client_id)
    recorder.rate_limited("orders", key.client_id)
    now[0] += 0.5
    written = now[0]
    await recorder.flush()
    recorder.rate_limited("orders", key.client_id)
    now[0] += 60
    await recorder.aclose()
    stored = await counting.get_key("orders", key.client_id)
    assert stored is not None
    assert stored.last_used_at is not None
    assert stored.last_used_at.timestamp() == pytest.approx(written, abs=1e-5)
    hours = (await manager.usage("orders", key.client_id, hours=2))["hours"]
    assert [(h["start"], h["requests"], h["rate_limited"]) for h in hours] == [
        (rfc3339(base - timedelta(hours=1)), 2, 0),
        (rfc3339(base), 1, 2),
    ]


def test_the_flush_task_wakes_at_each_hour_boundary() -> None:
    """The task closes the bucket after the interval, or at the next hour boundary when
    that comes first, so no bucket holds counts of two hours; at once when the open
    bucket's hour is over (a write ran across the boundary)."""
    boundary = hour_start(utcnow()).timestamp() + 3600
    now = [boundary - 100]
    recorder = UsageRecorder(MemoryStore(), interval=10, clock=lambda: now[0])
    assert recorder.next_wake(boundary - 100) == boundary - 90
    assert recorder.next_wake(boundary - 4) == boundary
    assert recorder.next_wake(boundary + 2) == boundary + 2  # the bucket is the last hour's
    now[0] = boundary + 2
    recorder._close_bucket()
    assert recorder.next_wake(boundary + 2) == boundary + 12


def test_counting_reads_no_clock_and_builds_no_key() -> None:
    """A count of a key already in the open bucket is an increment of its entry: the
    recorder's clock is not read on that path (the cost the benchmark measures)."""
    reads = []

    def clock() -> float:
        reads.append(1)
        return utcnow().timestamp()

    recorder = UsageRecorder(MemoryStore(), clock=clock)
    recorder.admitted("orders", "a")  # outside a loop: no task, the hour is set once
    before = len(reads)
    for _ in range(100):
        recorder.admitted("orders", "a")
        recorder.rate_limited("orders", "a")
    assert len(reads) == before
    assert recorder._counts == {"a": [101, 100, "orders", "a"]}


async def test_one_client_id_in_two_apis_is_counted_apart() -> None:
    """Should a store hold one client id in two APIs, their counts stay apart."""
    store = MemoryStore()
    recorder = UsageRecorder(store)
    for api, n in (("orders", 3), ("billing", 2), ("orders", 1)):
        for _ in range(n):
            recorder.admitted(api, "same-id")
    recorder.rate_limited("billing", "same-id")
    await recorder.aclose()
    rows = {
        api: [
            (r.requests, r.rate_limited)
            for r in await store.read_usage(api, None, hour_start(utcnow()))
        ]
        for api in ("orders", "billing")
    }
    assert rows == {"orders": [(4, 0)], "billing": [(2, 1)]}


async def test_old_buckets_are_pruned_on_flush_once_an_hour(counting: CountingStore) -> None:
    """A flush prunes buckets older than 35 days; the next flushes of the hour do not prune
    again."""
    manager = KeyManager(counting)
    key = await manager.create_key("orders", name="K", kind="external")
    old = hour_start(utcnow()) - RETENTION - timedelta(hours=2)
    await counting.record_usage([UsageCount("orders", key.client_id, old, 9, 0)])
    recorder = UsageRecorder(counting)
    recorder.admitted("orders", key.client_id)
    await recorder.flush()
    assert counting.calls["prune_usage"] == 1
    assert await counting.read_usage("orders", None, old) == [
        UsageCount("orders", key.client_id, hour_start(utcnow()), 1, 0)
    ]
    recorder.admitted("orders", key.client_id)
    await recorder.flush()
    assert counting.calls["prune_usage"] == 1
    await recorder.aclose()


# -- KeyManager.usage ---------------------------------------------------------------------------


async def test_usage_shapes_with_every_hour(store: KeyStore) -> None:
    """A key's usage and an API's, on every store: ``hours`` entries oldest first, one per
    hour with zeros where there was no traffic, the last one the current hour; the API's
    keys all listed with their totals over the range (zeros included)."""
    manager = KeyManager(store)
    await manager.expose("orders")
    busy = await manager.create_key("orders", name="Busy", kind="external")
    idle = await manager.create_key("orders", name="Idle", kind="internal")
    now = hour_start(utcnow())
    await store.record_usage(
        [
            UsageCount("orders", busy.client_id, now, 5, 1, utcnow()),
            UsageCount("orders", busy.client_id, now - timedelta(hours=3), 2, 0, utcnow()),
            UsageCount("orders", busy.client_id, now - timedelta(hours=30), 100, 0, utcnow()),
        ]
    )
    one = await manager.usage("orders", busy.client_id, hours=6)
    assert list(one) == ["client_id", "hours"]
    assert one["client_id"] == busy.client_id
    assert [h["start"] for h in one["hours"]] == [
        rfc3339(now - timedelta(hours=n)) for n in range(5, -1, -1)
    ]
    assert [(h["requests"], h["rate_limited"]) for h in one["hours"]] == [
        (0, 0),
        (0, 0),
        (2, 0),
        (0, 0),
        (0, 0),
        (5, 1),
    ]
    everything = await manager.usage("orders")
    assert list(everything) == ["api", "hours", "keys"]
    assert everything["api"] == "orders"
    assert len(everything["hours"]) == 24
    assert sum(h["requests"] for h in everything["hours"]) == 7
    assert everything["keys"] == [
        {"client_id": busy.client_id, "name": "Busy", "requests": 7, "rate_limited": 1},
        {"client_id": idle.client_id, "name": "Idle", "requests": 0, "rate_limited": 0},
    ]
    month = await manager.usage("orders", hours=840)
    assert len(month["hours"]) == 840
    assert month["keys"][0]["requests"] == 107


async def test_usage_refuses_bad_ranges_and_unknown_names() -> None:
    """hours outside 1..840 (or not a whole number) is invalid_request; an unknown key is
    key_not_found; an API never created answers as one with no keys (SPEC §2)."""
    manager = KeyManager(MemoryStore())
    await manager.expose("orders")
    for bad in (0, 841, -1, 2.5, True, "24"):
        with pytest.raises(InvalidRequest, match="hours"):
            await manager.usage("orders", hours=bad)  # type: ignore[arg-type]
    never = await manager.usage("nope", hours=3)
    assert never["api"] == "nope"
    assert never["keys"] == []
    assert [(hour["requests"], hour["rate_limited"]) for hour in never["hours"]] == [(0, 0)] * 3
    paged = await manager.usage("nope", limit=10)
    assert (paged["keys"], paged["next"]) == ([], None)
    with pytest.raises(InvalidRequest):  # still a name that could be an API's
        await manager.usage("no/such")
    with pytest.raises(KeyNotFound):
        await manager.usage("orders", "0" * 32)
    with pytest.raises(KeyNotFound):  # as get_key: an API never created has no such key
        await manager.usage("nope", "0" * 32)
    assert (await manager.usage("orders", hours=1))["keys"] == []


# -- four processes, one shared store ------------------------------------------------------------


def _traffic(options: dict[str, Any], client_id: str, n: int, out: Any) -> None:
    """One process: KeyGuard over the shared store flushing every 20 ms, ``n`` requests, then
    its last flush in ``aclose``."""
    from keyguard import open_store

    async def run() -> int:
        store = open_store(**options)
        app = guarded(store, usage_flush=0.02)  # many writes, overlapping other processes'
        admitted = 0
        async with client(app) as http:
            for i in range(n):
                admitted += (await http.get("/", headers={ID: client_id})).status_code == 200
                if i % 10 == 9:
                    await asyncio.sleep(0.01)  # (in-process calls never yield: let it flush)
        await app.aclose()
        await store.aclose()
        return admitted

    out.put(asyncio.run(run()))


@pytest.fixture(params=["postgres", "mysql", "redis"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    async with open_test_store(request.param, tmp_path) as store:
        yield store


@pytest.mark.slow
async def test_four_processes_flushing_one_key_sum_exactly(shared: KeyStore) -> None:
    """4 spawned processes x 150 requests on one key of a shared store (PostgreSQL, MariaDB,
    Redis), each writing the same bucket every 20 ms and at the end: the stored total is the
    600 requests sent."""
    from keyguard.stores.redis import RedisStore
    from keyguard.stores.sql import SQLStore
    from tests.backends.servers import server_url

    if isinstance(shared, SQLStore):
        server = "postgres" if shared.engine.dialect.name == "postgresql" else "mysql"
        options = {"url": server_url(server), "table_prefix": shared.table_prefix}
    else:
        assert isinstance(shared, RedisStore)
        options = {"url": server_url("redis"), "prefix": shared.prefix}
    manager = KeyManager(shared)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [
        context.Process(target=_traffic, args=(options, key.client_id, 150, out)) for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    results = [await anyio.to_thread.run_sync(out.get, True, 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert [proc.exitcode for proc in procs] == [0] * 4
    assert sum(results) == 600
    usage = await manager.usage("orders", key.client_id, hours=2)
    assert sum(h["requests"] for h in usage["hours"]) == 600
    assert (await manager.get_key("orders", key.client_id)).last_used_at is not None


# -- a real server's shutdown ------------------------------------------------------------------

SERVED_APP = """
import contextlib, os
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from keyguard import KeyGuard, open_store

store = open_store(os.environ["KG_URL"])

@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    await store.aclose()  # the app closes its store in its own shutdown

async def hello(request):
    return PlainTextResponse("hello")

async def health(request):
    return PlainTextResponse("ok")

app = KeyGuard(Starlette(routes=[Route("/", hello), Route("/health", health)], lifespan=lifespan),
               store=store, api="orders", exclude_paths=["/health"], usage_flush=3600)
"""


@pytest.mark.slow
async def test_uvicorn_shutdown_writes_the_counts(tmp_path: Path) -> None:
    """uvicorn serving KeyGuard (flush interval one hour), stopped with SIGTERM: the requests
    it admitted are in the store afterwards, written before the app closed its store."""
    import os
    import subprocess
    import sys
    import time

    from keyguard import open_store
    from tests.test_real_servers import free_port

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    setup = open_store(url)
    manager = KeyManager(setup)
    await manager.expose("orders")
    key = await manager.create_key("orders", name="Acme", kind="external")
    await setup.aclose()
    (tmp_path / "servedapp.py").write_text(SERVED_APP)
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [sys.executable, "-m", "uvicorn", "--port", str(port), "--no-access-log", "servedapp:app"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "KG_URL": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            while True:
                try:
                    await http.get("/health")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        proc.kill()
                        pytest.fail(f"uvicorn did not start: {proc.communicate()[1][-2000:]!r}")
                    await anyio.sleep(0.1)
            assert await send(http, key.client_id, 6) == [200] * 6
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert b"usage could not be written" not in stderr, stderr
    after = open_store(url)
    try:
        usage = await KeyManager(after).usage("orders", key.client_id, hours=1)
        assert usage["hours"][-1]["requests"] == 6
        assert (await KeyManager(after).get_key("orders", key.client_id)).last_used_at is not None
    finally:
        await after.aclose()
