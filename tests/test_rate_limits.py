"""Rate limits per key (SPEC §9) on the request path: counters in memory and in real Redis,
exact across processes, and a counter storage killed and restarted mid-traffic."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from keyguard import KeyGuard, KeyManager, KeyStore, MemoryStore
from keyguard.errors import ConfigurationError
from keyguard.models import RateLimit
from keyguard.ratelimit import RateLimiter
from tests.backends.servers import require_server
from tests.helpers import run_asgi
from tests.test_outages import private_redis

pytestmark = pytest.mark.anyio

ID = "X-IBM-Client-Id"
TOO_MANY = {
    "httpCode": "429",
    "httpMessage": "Too Many Requests",
    "moreInformation": "Rate Limit exceeded",
}


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"name": request.state.keyguard.name})


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            yield f"chunk {n};".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


def app_for(store: KeyStore, **options: Any) -> KeyGuard:
    app = Starlette(routes=[Route("/", hello, methods=["GET", "HEAD"]), Route("/stream", stream)])
    return KeyGuard(app, store=store, api="orders", **options)


def client(app: KeyGuard) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


class CountingLimiter(RateLimiter):
    """A memory RateLimiter that counts its checks."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.checks = 0

    async def hit(self, api: str, client_id: str, limits: Any) -> Any:
        self.checks += 1
        return await super().hit(api, client_id, limits)


@pytest.fixture
async def manager() -> KeyManager:
    manager = KeyManager(MemoryStore())
    await manager.expose("orders")
    return manager


async def test_a_key_limit_admits_its_limit_then_429(manager: KeyManager) -> None:
    """3/minute: three requests pass with the headers counting down, the fourth is IBM's 429."""
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["3/minute"])
    async with client(app_for(manager.store)) as http:
        answers = [await http.get("/", headers={ID: key.client_id}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-limit"] for a in answers] == ["3"] * 4
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
    refused = answers[3]
    assert refused.json() == TOO_MANY
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["cache-control"] == "no-store"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert answers[0].json() == {"name": "Acme"}


async def test_api_limits_apply_to_keys_without_their_own(manager: KeyManager) -> None:
    """A key inherits the API's limits (null); its own list replaces them; [] is unlimited."""
    await manager.update_api("orders", rate_limits=["2/minute"])
    inherits = await manager.create_key("orders", name="Inherits", kind="external")
    own = await manager.create_key("orders", name="Own", kind="external", rate_limits=["4/hour"])
    free = await manager.create_key("orders", name="Free", kind="external", rate_limits=[])
    async with client(app_for(manager.store)) as http:

        async def statuses(client_id: str, n: int) -> list[int]:
            return [(await http.get("/", headers={ID: client_id})).status_code for _ in range(n)]

        assert await statuses(inherits.client_id, 3) == [200, 200, 429]
        assert await statuses(own.client_id, 5) == [200] * 4 + [429]
        assert await statuses(free.client_id, 10) == [200] * 10
        response = await http.get("/", headers={ID: free.client_id})
    assert "x-ratelimit-limit" not in response.headers


async def test_a_key_without_limits_costs_no_counter_call(manager: KeyManager) -> None:
    """No limits on the key or its API: no check at all, no headers."""
    key = await manager.create_key("orders", name="Acme", kind="external")
    limiter = CountingLimiter()
    async with client(app_for(manager.store, rate_limiter=limiter)) as http:
        for _ in range(5):
            response = await http.get("/", headers={ID: key.client_id})
            assert response.status_code == 200
            assert "x-ratelimit-remaining" not in response.headers
    assert limiter.checks == 0


async def test_refused_requests_are_not_counted_and_the_tightest_limit_shows(
    manager: KeyManager,
) -> None:
    """1/second and 3/minute: requests refused by the first do not use up the second; the
    headers show the limit with the fewest requests left."""
    key = await manager.create_key(
        "orders", name="Acme", kind="external", rate_limits=["1/second", "3/minute"]
    )
    async with client(app_for(manager.store)) as http:

        async def get() -> httpx.Response:
            return await http.get("/", headers={ID: key.client_id})

        first = await get()
        refused = [await get() for _ in range(6)]  # all within the second
        assert first.status_code == 200
        assert [r.status_code for r in refused] == [429] * 6
        assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) == (
            "1",
            "0",
        )
        await anyio.sleep(1.1)
        second = await get()
        assert second.status_code == 200  # had the refusals counted, 3/minute would be spent
        await anyio.sleep(1.1)
        third = await get()
        assert third.status_code == 200
        assert (third.headers["x-ratelimit-limit"], third.headers["x-ratelimit-remaining"]) == (
            "1",
            "0",
        )  # a tie at 0: the shorter period
        await anyio.sleep(1.1)
        fourth = await get()
    assert fourth.status_code == 429
    assert fourth.headers["x-ratelimit-limit"] == "3"  # the minute limit is the one used up
    assert int(fourth.headers["retry-after"]) > 1


async def test_headers_are_added_without_touching_a_streamed_body(manager: KeyManager) -> None:
    """The rate-limit headers join the app's own; the streamed body arrives whole."""
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["9/minute"])
    async with client(app_for(manager.store)) as http:
        response = await http.get("/stream", headers={ID: key.client_id})
    assert response.text == "chunk 0;chunk 1;chunk 2;"
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["x-ratelimit-remaining"] == "8"


async def test_a_head_refusal_has_no_body(manager: KeyManager) -> None:
    """429 to HEAD: the same status and headers, no body."""
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["1/hour"])
    async with client(app_for(manager.store)) as http:
        await http.head("/", headers={ID: key.client_id})
        response = await http.head("/", headers={ID: key.client_id})
    assert response.status_code == 429
    assert response.content == b""
    body = json.dumps(TOO_MANY, separators=(", ", ": ")).encode()
    assert int(response.headers["content-length"]) == len(body)


async def test_rate_limits_come_after_every_other_check(manager: KeyManager) -> None:
    """A used-up key that is disabled says disabled; a wrong secret says so, not 429."""
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["1/hour"])
    async with client(app_for(manager.store)) as http:
        assert (await http.get("/", headers={ID: key.client_id})).status_code == 200
        assert (await http.get("/", headers={ID: key.client_id})).status_code == 429
        await manager.update_key("orders", key.client_id, enabled=False)
        response = await http.get("/", headers={ID: key.client_id})
    assert response.json()["moreInformation"] == "Client id disabled."


def test_bad_options_fail_at_start_up() -> None:
    """An unknown storage or failure mode is a ConfigurationError, not a 500 later."""
    with pytest.raises(ConfigurationError):
        KeyGuard(Starlette(), store=MemoryStore(), api="orders", rate_limiter="nosuch://x")
    with pytest.raises(ConfigurationError):
        KeyGuard(Starlette(), store=MemoryStore(), api="orders", rate_limit_fail="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        KeyGuard(Starlette(), store=MemoryStore(), api="orders", rate_limiter=42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://:pw@127.0.0.1:6379/0x", "the path is the database number"),
        ("async+redis://127.0.0.1:6379/1/2", "the path is the database number"),
        ("redis://:se/cret@127.0.0.1:6379/0", "must be percent-encoded"),
        ("rediss://:12?34@127.0.0.1:6379/0", "must be percent-encoded"),
    ],
)
def test_a_redis_counter_url_redis_py_would_misread_fails_at_start_up(
    url: str, reason: str
) -> None:
    """A rate_limiter URL redis-py would misread (a database path that is no number, read
    as 0 or as 12; a raw '/', '?' in the password, cut into a host and a "port") is a
    ConfigurationError when KeyGuard is made, quoting no password, as for a Redis store."""
    with pytest.raises(ConfigurationError, match=reason) as caught:
        KeyGuard(Starlette(), store=MemoryStore(), api="orders", rate_limiter=url)
    assert "rate_limiter URL" in str(caught.value)
    for secret in ("pw", "se/cret", "12?34", "cret"):
        assert f":{secret}@" not in str(caught.value)
        assert secret not in str(caught.value).replace("rediss", "").replace("127.0.0.1", "")


async def test_memory_counters_are_announced_once(
    manager: KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    """With memory:// counters, one INFO line says they are per process."""
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["5/minute"])
    with caplog.at_level(logging.INFO, logger="keyguard"):
        async with client(app_for(manager.store)) as http:
            for _ in range(3):
                await http.get("/", headers={ID: key.client_id})
    lines = [r for r in caplog.records if "counted per process" in r.getMessage()]
    assert len(lines) == 1


# -- Redis counters -------------------------------------------------------------------------


async def test_redis_counters_are_shared_between_instances(manager: KeyManager) -> None:
    """Two KeyGuards (as two processes would) counting on one Redis share the limit."""
    url = require_server("redis")
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["5/minute"])
    apps = [app_for(manager.store, rate_limiter=url) for _ in range(2)]
    statuses: list[int] = []
    async with client(apps[0]) as one, client(apps[1]) as two:
        for n in range(12):
            response = await (one if n % 2 else two).get("/", headers={ID: key.client_id})
            statuses.append(response.status_code)
    for app in apps:
        await app.aclose()
    assert statuses.count(200) == 5
    assert statuses[:5] == [200] * 5


def _hammer(url: str, prefix: str, client_id: str, requests: int, start: Any, out: Any) -> None:
    """One process: KeyGuard over the shared Redis store, counting on its Redis (the default)."""
    from keyguard import open_store

    async def run() -> int:
        store = open_store(url, prefix=prefix)
        app = app_for(store)
        admitted = 0
        async with client(app) as http:
            await http.get("/", headers={ID: "0" * 32})  # connect before the start signal
            start.wait()
            for _ in range(requests):
                response = await http.get("/", headers={ID: client_id})
                assert response.status_code in (200, 429), response.text
                admitted += response.status_code == 200
        await app.aclose()
        await store.aclose()
        return admitted

    out.put(asyncio.run(run()))


@pytest.mark.slow
async def test_four_processes_admit_exactly_the_limit(tmp_path: Path) -> None:
    """4 processes x 60 requests on one key limited to 100/minute: exactly 100 admitted."""
    from tests.backends.redis import delete_prefixed, unique_prefix

    url = require_server("redis")
    prefix = unique_prefix()
    from keyguard.stores.redis import RedisStore

    store = RedisStore.from_url(url, prefix=prefix)
    try:
        manager = KeyManager(store)
        await manager.expose("orders")
        key = await manager.create_key(
            "orders", name="Acme", kind="external", rate_limits=["100/minute"]
        )
        context = multiprocessing.get_context("spawn")
        start = context.Event()
        out = context.Queue()
        procs = [
            context.Process(target=_hammer, args=(url, prefix, key.client_id, 60, start, out))
            for _ in range(4)
        ]
        for proc in procs:
            proc.start()
        start.set()  # (whenever each is ready: the total must be exact either way)
        results = [await anyio.to_thread.run_sync(out.get, True, 120) for _ in procs]
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * 4
        assert sum(results) == 100
    finally:
        await store.aclose()
        await delete_prefixed(url, prefix)


# -- the counter storage failing --------------------------------------------------------------


async def wait_out_backoff(limiter: RateLimiter) -> None:
    """Sleep until the limiter tries its storage again (it backs off after a failure)."""
    await anyio.sleep(max(0.0, limiter._down_until - time.monotonic()) + 0.05)


@pytest.mark.slow
async def test_counter_storage_killed_fails_open_then_recovers(
    manager: KeyManager, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed mid-traffic: requests keep being admitted, counted in memory (the limit still
    holds per process), one WARNING, never a 500; restarted: counting there again, next to
    what memory counted during the outage while that is still in its window."""
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["3/minute"])
    once = await manager.create_key(
        "orders", name="Once", kind="external", rate_limits=["3/minute"]
    )
    with private_redis(tmp_path) as (port, stop, start):
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0")
        async with client(app_for(manager.store, rate_limiter=limiter)) as http:

            async def get(client_id: str = key.client_id) -> httpx.Response:
                return await http.get("/", headers={ID: client_id})

            assert (await get()).status_code == 200
            stop()
            with caplog.at_level(logging.WARNING, logger="keyguard"):
                during = [(await get()).status_code for _ in range(5)]
                await wait_out_backoff(limiter)
                during += [(await get()).status_code for _ in range(2)]
                assert (await get(once.client_id)).status_code == 200  # in memory
            assert during == [200, 200, 200, 429, 429, 429, 429]  # memory: 3 per minute
            warnings = [r for r in caplog.records if "counter storage" in r.getMessage()]
            assert len(warnings) == 1
            assert warnings[0].levelno == logging.WARNING
            start()  # an empty Redis (no persistence of counters needed)
            await wait_out_backoff(limiter)
            after = [(await get()).status_code for _ in range(4)]
            # One in memory: two more, counted in Redis and in memory alike.
            after_once = [(await get(once.client_id)).status_code for _ in range(3)]
            other = await manager.create_key(
                "orders", name="Other", kind="external", rate_limits=["3/minute"]
            )
            fresh = [
                (await http.get("/", headers={ID: other.client_id})).status_code for _ in range(4)
            ]
            async with Redis.from_url(f"redis://127.0.0.1:{port}/0") as raw:
                lengths = sorted(
                    [await raw.llen(name) async for name in raw.scan_iter(match="keyguard-rl*")]
                )
        await limiter.aclose()
    # Redis kept (AOF) the one request from before the outage and would take two more, but
    # the outage's three, counted in memory, are still in the minute: all four refused
    # (before, two passed: six in a minute on a 3/minute key), and not counted in Redis.
    # A key memory never counted is counted in Redis alone.
    assert after == [429, 429, 429, 429]
    assert after_once == [200, 200, 429]
    assert fresh == [200, 200, 200, 429]
    assert lengths == [1, 2, 3]


@pytest.mark.slow
async def test_counter_storage_killed_fails_closed_with_503(
    manager: KeyManager, tmp_path: Path
) -> None:
    """rate_limit_fail="closed": while the storage is down a limited key gets 503 with
    Retry-After (a key without limits is not affected); back when it is."""
    limited = await manager.create_key(
        "orders", name="Acme", kind="external", rate_limits=["9/minute"]
    )
    free = await manager.create_key("orders", name="Free", kind="external")
    with private_redis(tmp_path) as (port, stop, start):
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0", fail="closed")
        async with client(app_for(manager.store, rate_limiter=limiter)) as http:
            assert (await http.get("/", headers={ID: limited.client_id})).status_code == 200
            stop()
            refused = await http.get("/", headers={ID: limited.client_id})
            assert refused.status_code == 503
            assert refused.json()["moreInformation"] == "Key store unavailable."
            assert int(refused.headers["retry-after"]) >= 1
            # Every request while it is down, not only the one that found it down (the
            # pause before asking the storage again must not count in memory instead).
            again = [(await http.get("/", headers={ID: limited.client_id})) for _ in range(3)]
            assert [r.status_code for r in again] == [503, 503, 503]
            assert all("x-ratelimit-remaining" not in r.headers for r in again)
            assert (await http.get("/", headers={ID: free.client_id})).status_code == 200
            start()
            await wait_out_backoff(limiter)
            back = await http.get("/", headers={ID: limited.client_id})
        await limiter.aclose()
    assert back.status_code == 200


async def test_counts_beyond_the_preformatted_values_are_written_out(manager: KeyManager) -> None:
    """X-RateLimit-Remaining is right across the table of ready-made values (0-1023) and
    past it, and two keys with different limits each get their own X-RateLimit-Limit."""
    big = await manager.create_key("orders", name="Big", kind="external", rate_limits=["1025/hour"])
    small = await manager.create_key(
        "orders", name="Small", kind="external", rate_limits=["2/hour"]
    )
    async with client(app_for(manager.store)) as http:
        remaining = []
        for _ in range(3):
            response = await http.get("/", headers={ID: big.client_id})
            assert response.headers["x-ratelimit-limit"] == "1025"
            remaining.append(response.headers["x-ratelimit-remaining"])
        other = await http.get("/", headers={ID: small.client_id})
    assert remaining == ["1024", "1023", "1022"]
    assert other.headers["x-ratelimit-limit"] == "2"
    assert other.headers["x-ratelimit-remaining"] == "1"


async def test_a_subclass_hit_is_always_awaited_even_on_memory(manager: KeyManager) -> None:
    """A RateLimiter subclass with its own ``hit`` is called for every check: the in-process
    shortcut (``hit_now``) is only the base class's."""
    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["5/hour"])
    limiter = CountingLimiter()
    assert limiter.hit_now("orders", key.client_id, key.rate_limits or ()) is None
    async with client(app_for(manager.store, rate_limiter=limiter)) as http:
        statuses = [
            (await http.get("/", headers={ID: key.client_id})).status_code for _ in range(6)
        ]
    assert statuses == [200] * 5 + [429]
    assert limiter.checks == 6


async def test_an_api_limit_change_applies_at_once_on_a_memory_store(manager: KeyManager) -> None:
    """On a memory store the API's limits are read from the store itself on every request:
    a change takes effect on the very next request (no second of remembered limits)."""
    key = await manager.create_key("orders", name="Acme", kind="external")
    async with client(app_for(manager.store)) as http:
        first = await http.get("/", headers={ID: key.client_id})
        await manager.update_api("orders", rate_limits=["1/hour"])
        second = await http.get("/", headers={ID: key.client_id})
        third = await http.get("/", headers={ID: key.client_id})
    assert "x-ratelimit-limit" not in first.headers
    assert second.status_code == 200
    assert second.headers["x-ratelimit-remaining"] == "0"
    assert third.status_code == 429


async def test_websockets_get_the_headers_and_a_refusal_before_accept(manager: KeyManager) -> None:
    """A rate-limited key's accepted websocket carries the headers on its accept; the
    handshake past the limit is refused before the app runs: the 429 where the server
    takes an HTTP answer, else a close with 1013 (try again later) — never a 500."""

    async def socket(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept", "headers": [(b"x-app", b"1")]})
        await send({"type": "websocket.close", "code": 1000})

    key = await manager.create_key("orders", name="Acme", kind="external", rate_limits=["1/minute"])
    guard = KeyGuard(socket, store=manager.store, api="orders")

    async def handshake(**extra: Any) -> list[Any]:
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "scheme": "ws",
            "path": "/ws",
            "raw_path": b"/ws",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"x-ibm-client-id", key.client_id.encode())],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
            **extra,
        }
        return await run_asgi(guard, scope, [{"type": "websocket.connect"}])

    accepted = await handshake()
    assert [m["type"] for m in accepted] == ["websocket.accept", "websocket.close"]
    assert accepted[0]["headers"] == [
        (b"x-app", b"1"),
        (b"x-ratelimit-limit", b"1"),
        (b"x-ratelimit-remaining", b"0"),
    ]
    denied = await handshake(extensions={"websocket.http.response": {}})
    assert [m["type"] for m in denied] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert denied[0]["status"] == 429
    headers = dict(denied[0]["headers"])
    assert headers[b"x-ratelimit-remaining"] == b"0"
    assert 1 <= int(headers[b"retry-after"]) <= 60
    assert json.loads(denied[1]["body"]) == TOO_MANY
    assert await handshake() == [{"type": "websocket.close", "code": 1013, "reason": ""}]


@pytest.mark.slow
async def test_a_flapping_counter_storage_logs_at_most_two_warnings_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Down, back, down, back within a minute: one WARNING that it failed, one that it is
    back — the second return is not logged on its own (a storage flapping every few
    seconds would log every few seconds)."""
    limits = (RateLimit(100, "minute"),)
    with private_redis(tmp_path) as (port, stop, start):
        limiter = RateLimiter(f"redis://127.0.0.1:{port}/0")
        try:
            with caplog.at_level(logging.WARNING, logger="keyguard"):
                for _ in range(2):
                    stop()
                    assert (await limiter.hit("orders", "c", limits)).admitted  # in memory
                    start()
                    await wait_out_backoff(limiter)
                    assert (await limiter.hit("orders", "c", limits)).admitted  # in Redis
                    assert limiter._down_until < time.monotonic()
        finally:
            await limiter.aclose()
    said = [r.getMessage() for r in caplog.records if "counter storage" in r.getMessage()]
    assert len(said) == 2, said
    assert "failed" in said[0]
    assert said[1].endswith("is back")
