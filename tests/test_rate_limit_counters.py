"""The rate-limit counters themselves (SPEC §9): the in-process moving window of memory://
against a brute-force model on a fake clock, and the one-script Redis window on real
Redis servers (shared, under a unique prefix; private where server statistics count)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits.aio.storage import MemoryStorage as AsyncMemoryStorage
from limits.aio.storage import Storage as AsyncStorage
from redis.asyncio import Redis
from redis.crc import key_slot

from keyguard.errors import ConfigurationError
from keyguard.models import RateLimit, parse_rate_limits
from keyguard.ratelimit import RateLimiter, Verdict
from keyguard.ratelimit.items import limits_item
from keyguard.ratelimit.local import SWEEP_INTERVAL, SWEEP_SLICE, LocalCounter
from tests.backends.redis import delete_prefixed, unique_prefix
from tests.backends.servers import require_server
from tests.test_outages import private_redis

pytestmark = pytest.mark.anyio

PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def model_admits(admitted: Sequence[float], limits: Sequence[RateLimit], now: float) -> bool:
    """The definition: a request passes when every limit had fewer than ``limit``
    admissions in the ``per`` seconds before it (an entry at ``t`` counts while now < t+per)."""
    return all(
        sum(1 for t in admitted if now - PERIODS[limit.per] < t) < limit.limit for limit in limits
    )


def limits_of(*texts: str) -> tuple[RateLimit, ...]:
    out = []
    for text in texts:
        n, per = text.split("/")
        out.append(RateLimit(int(n), per))  # type: ignore[arg-type]
    return tuple(out)


# -- memory:// : the in-process counter ------------------------------------------------------


def test_a_window_edge_admits_exactly_the_limit() -> None:
    """3/second: three within the second, the fourth refused until the first is a full
    second old, then exactly one more."""
    clock = Clock()
    counter = LocalCounter(clock=clock)
    limits = limits_of("3/second")
    verdicts = []
    for at in (0.0, 0.5, 0.999, 0.9999):
        clock.now = 1000.0 + at
        verdicts.append(counter.hit("orders", "c", limits))
    assert [v.admitted for v in verdicts] == [True, True, True, False]
    assert [v.remaining for v in verdicts] == [2, 1, 0, 0]
    assert verdicts[3].retry_after == 1
    clock.now = 1001.0  # the first entry (1000.0) has just left the window
    assert counter.hit("orders", "c", limits).admitted
    assert not counter.hit("orders", "c", limits).admitted
    clock.now = 1001.4999
    assert not counter.hit("orders", "c", limits).admitted
    clock.now = 1001.5
    assert counter.hit("orders", "c", limits).admitted


@settings(max_examples=150, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=25.0), min_size=1, max_size=60),
    chosen=st.lists(
        st.sampled_from(["1/second", "2/second", "3/minute", "5/minute", "4/hour"]),
        min_size=1,
        max_size=4,
        unique=True,
    ),
)
def test_the_counter_matches_the_moving_window_model(gaps: list[float], chosen: list[str]) -> None:
    """Any request times, up to four limits: admitted exactly when the definition admits,
    the tightest limit's remaining after it, and a Retry-After after which it would pass
    (and not a second earlier)."""
    limits = limits_of(*chosen)
    clock = Clock(0.0)
    counter = LocalCounter(clock=clock)
    admitted: list[float] = []
    for gap in gaps:
        clock.now += gap
        now = clock.now
        verdict = counter.hit("orders", "c", limits)
        assert verdict.admitted == model_admits(admitted, limits, now)
        if verdict.admitted:
            admitted.append(now)
            assert verdict.retry_after == 0
        else:
            wait = verdict.retry_after
            assert wait >= 1
            assert model_admits(admitted, limits, now + wait)
            if wait > 1:
                assert not model_admits(admitted, limits, now + (wait - 1))
        left = [
            (
                limit.limit - sum(1 for t in admitted if now - PERIODS[limit.per] < t),
                PERIODS[limit.per],
            )
            for limit in limits
        ]
        fewest = min(left)
        assert verdict.remaining == fewest[0]
        tightest = [
            limit.limit for limit, state in zip(limits, left, strict=True) if state == fewest
        ]
        assert verdict.limit in tightest


def test_a_refusal_consumes_nothing_in_any_limit() -> None:
    """1/second and 3/minute: a hundred refusals of the second limit leave the minute's
    count where it was."""
    clock = Clock()
    counter = LocalCounter(clock=clock)
    limits = limits_of("1/second", "3/minute")
    assert counter.hit("orders", "c", limits).admitted
    refusals = [counter.hit("orders", "c", limits) for _ in range(100)]
    assert not any(v.admitted for v in refusals)
    assert {(v.limit, v.remaining, v.retry_after) for v in refusals} == {(1, 0, 1)}
    assert counter.entries() == 2  # one entry per limit, none for the refusals
    later = []
    for _ in range(3):
        clock.now += 1
        later.append(counter.hit("orders", "c", limits))
    assert [v.admitted for v in later] == [True, True, False]  # 3 of the minute, no more
    assert (later[2].limit, later[2].remaining) == (3, 0)
    assert 55 <= later[2].retry_after <= 58


def test_peek_answers_what_count_would_counting_nothing() -> None:
    """peek (the fallback's entries consulted after a storage's return): None for a key
    never counted, else count's verdict, with nothing counted."""
    clock = Clock()
    counter = LocalCounter(clock=clock)
    limits = limits_of("2/second", "3/minute")
    assert counter.peek("orders", "c", limits) is None
    assert counter.count("orders", "c", limits) == (True, 2, 1, 0)
    assert counter.peek("orders", "c", limits) == (True, 2, 0, 0)
    assert counter.peek("orders", "c", limits) == (True, 2, 0, 0)  # nothing counted
    assert counter.count("orders", "c", limits) == (True, 2, 0, 0)
    assert counter.peek("orders", "c", limits) == (False, 2, 0, 1)
    clock.now += 1.0
    assert counter.peek("orders", "c", limits) == (True, 3, 0, 0)
    assert counter.count("orders", "c", limits) == (True, 3, 0, 0)
    assert counter.peek("orders", "c", limits) == counter.count("orders", "c", limits)
    assert counter.entries() == 4  # 1 in the second, 3 in the minute: a refusal adds none


def test_retry_after_waits_for_every_full_limit() -> None:
    """Two limits full at once: Retry-After is the longer wait (until both have room)."""
    clock = Clock()
    counter = LocalCounter(clock=clock)
    limits = limits_of("1/second", "1/minute")
    assert counter.hit("orders", "c", limits).admitted
    clock.now += 0.25
    refused = counter.hit("orders", "c", limits)
    assert (refused.admitted, refused.retry_after) == (False, 60)  # ceil(59.75)
    assert refused.limit == 1
    clock.now += 59.75
    assert counter.hit("orders", "c", limits).admitted


def test_keys_and_apis_are_counted_apart() -> None:
    """The same client id under two APIs, and two keys of one API, have their own counts."""
    counter = LocalCounter(clock=Clock())
    limits = limits_of("1/minute")
    assert counter.hit("orders", "a", limits).admitted
    assert counter.hit("billing", "a", limits).admitted
    assert counter.hit("orders", "b", limits).admitted
    assert not counter.hit("orders", "a", limits).admitted


def test_changing_a_keys_limits_keeps_the_counts_of_unchanged_ones() -> None:
    """A limit that stays keeps its entries; a new or changed one starts empty."""
    counter = LocalCounter(clock=Clock())
    before = limits_of("2/minute", "5/hour")
    assert counter.hit("orders", "c", before).admitted
    assert counter.hit("orders", "c", before).admitted
    after = limits_of("5/hour", "4/minute")  # the hour limit kept, the minute one changed
    verdicts = [counter.hit("orders", "c", after) for _ in range(4)]
    assert [v.admitted for v in verdicts] == [True, True, True, False]
    assert (verdicts[2].limit, verdicts[2].remaining) == (5, 0)  # 2 before + 3 after
    assert (verdicts[3].limit, verdicts[3].remaining) == (5, 0)  # the minute has 1 left


def test_idle_keys_are_forgotten_and_memory_stays_bounded() -> None:
    """Thousands of keys, then silence: within a few sweeps every expired key is gone, a
    slice per request; a busy key never holds more entries than its limit."""
    clock = Clock()
    counter = LocalCounter(clock=clock)
    limits = limits_of("3/second")
    keys = 3 * SWEEP_SLICE + 17
    for n in range(keys):
        counter.hit("orders", f"idle{n}", limits)
    for _ in range(50):
        counter.hit("orders", "busy", limits)
    assert len(counter) == keys + 1
    assert counter.entries() == keys + 3  # the busy key: 3 entries, not 50
    clock.now += SWEEP_INTERVAL + 1
    for _ in range(keys // SWEEP_SLICE + 2):
        counter.hit("orders", "busy", limits)  # each request sweeps one slice
    assert len(counter) == 1
    assert counter.entries() == 3


def test_a_key_with_entries_alive_survives_the_sweep() -> None:
    """A day limit's entry keeps its key through sweeps until the day is over."""
    clock = Clock()
    counter = LocalCounter(clock=clock)
    assert counter.hit("orders", "c", limits_of("1/day")).admitted
    for _ in range(3):
        clock.now += SWEEP_INTERVAL + 1
        counter.hit("orders", "other", limits_of("9/second"))
    assert not counter.hit("orders", "c", limits_of("1/day")).admitted
    clock.now += 86400
    assert counter.hit("orders", "c", limits_of("1/day")).admitted


async def test_memory_rate_limiter_uses_the_in_process_counter() -> None:
    """RateLimiter("memory://") answers Verdicts from the in-process counter (no limits
    storage object is made for it)."""
    limiter = RateLimiter("memory://")
    limits = limits_of("2/minute")
    verdicts = [await limiter.hit("orders", "c", limits) for _ in range(3)]
    assert verdicts[:2] == [Verdict(True, 2, 1, 0), Verdict(True, 2, 0, 0)]
    assert not verdicts[2].admitted
    assert 1 <= verdicts[2].retry_after <= 60
    assert limiter._remote is None


# -- Redis: one script, one round trip -------------------------------------------------------


@pytest.fixture
async def redis_limiter() -> AsyncIterator[tuple[RateLimiter, str, str]]:
    """A RateLimiter on the shared Redis under a unique prefix, its keys deleted after."""
    url = require_server("redis")
    prefix = unique_prefix()
    limiter = RateLimiter(url, key_prefix=prefix)
    yield limiter, url, prefix
    await limiter.aclose()
    await delete_prefixed(url, prefix)


async def test_redis_counts_every_limit_in_one_script(
    redis_limiter: tuple[RateLimiter, str, str],
) -> None:
    """Four limits on Redis: admitted until the tightest is used up, a refusal consuming
    nothing in any list, every list of the key in one hash slot with a TTL of its period."""
    limiter, url, prefix = redis_limiter
    limits = limits_of("3/second", "4/minute", "50/hour", "100/day")
    verdicts = [await limiter.hit("orders", "c1", limits) for _ in range(6)]
    assert [v.admitted for v in verdicts] == [True, True, True, False, False, False]
    assert [(v.limit, v.remaining) for v in verdicts[:3]] == [(3, 2), (3, 1), (3, 0)]
    assert verdicts[3].retry_after == 1
    async with Redis.from_url(url) as raw:
        keys = sorted([k.decode() async for k in raw.scan_iter(match=f"{prefix}*")])
        assert len(keys) == 4
        assert all("{c1}" in key for key in keys)
        assert len({key_slot(key.encode()) for key in keys}) == 1
        assert [await raw.llen(key) for key in keys] == [3, 3, 3, 3]  # refusals: nothing
        ttls = {key.rsplit("/", 1)[1]: await raw.ttl(key) for key in keys}
        assert 0 < ttls["second"] <= 1
        assert 3500 < ttls["hour"] <= 3600
        assert 86000 < ttls["day"] <= 86400


async def test_redis_retry_after_is_the_time_until_a_request_would_pass(
    redis_limiter: tuple[RateLimiter, str, str],
) -> None:
    """2/minute on Redis: the third request is told to come back in the minute's rest,
    and the headers name the limit that refused it."""
    limiter, _, _ = redis_limiter
    limits = limits_of("5/second", "2/minute")
    assert (await limiter.hit("orders", "c2", limits)).admitted
    second = await limiter.hit("orders", "c2", limits)
    assert (second.admitted, second.limit, second.remaining) == (True, 2, 0)
    refused = await limiter.hit("orders", "c2", limits)
    assert not refused.admitted
    assert refused.limit == 2
    assert 58 <= refused.retry_after <= 60


async def test_a_limit_listed_twice_is_counted_once(
    redis_limiter: tuple[RateLimiter, str, str],
) -> None:
    """The same limit twice (as stored before parse_rate_limits merged them) is one
    window: 4/minute admits 4, not 2 (one list pushed twice per request), and
    parse_rate_limits keeps it once."""
    limiter, _, _ = redis_limiter
    limits = limits_of("4/minute", "10/hour", "4/minute")
    verdicts = [await limiter.hit("orders", "twice", limits) for _ in range(5)]
    assert [v.admitted for v in verdicts] == [True] * 4 + [False]
    assert [v.remaining for v in verdicts[:4]] == [3, 2, 1, 0]
    assert parse_rate_limits(["4/minute", {"limit": 4, "per": "minute"}]) == limits_of("4/minute")


async def test_redis_instances_share_the_windows(
    redis_limiter: tuple[RateLimiter, str, str],
) -> None:
    """Two limiters on one Redis and prefix (two processes' worth) share one window."""
    limiter, url, prefix = redis_limiter
    other = RateLimiter(url, key_prefix=prefix)
    limits = limits_of("5/minute", "10/hour")
    try:
        results = [
            (await (limiter if n % 2 else other).hit("orders", "c3", limits)).admitted
            for n in range(9)
        ]
    finally:
        await other.aclose()
    assert results == [True] * 5 + [False] * 4


async def test_a_redis_check_is_one_round_trip(tmp_path: Path) -> None:
    """On a private server, N requests of a key with four limits are N EVALSHAs and no
    other command from the client (the script's own calls aside)."""
    limits = limits_of("100/second", "1000/minute", "10000/hour", "100000/day")
    with private_redis(tmp_path) as (port, _, _):
        url = f"redis://127.0.0.1:{port}/0"
        limiter = RateLimiter(url)
        await limiter.hit("orders", "c", limits)  # connect, load the script
        async with Redis.from_url(url) as raw:
            await raw.config_resetstat()
            for _ in range(20):
                assert (await limiter.hit("orders", "c", limits)).admitted
            stats = await raw.info("commandstats")
        await limiter.aclose()
    top_level = {"cmdstat_evalsha", "cmdstat_config|resetstat", "cmdstat_info"}
    scripted = {f"cmdstat_{c}" for c in ("time", "lindex", "rpop", "llen", "lpush", "expire")}
    assert stats["cmdstat_evalsha"]["calls"] == 20
    assert set(stats) <= top_level | scripted, sorted(set(stats) - top_level - scripted)
    assert stats["cmdstat_lpush"]["calls"] == 20 * len(limits)  # every limit hit each time


async def test_redis_cluster_counts_a_key_on_one_node() -> None:
    """On the test cluster: four limits of one key, one script on one node, exact."""
    from tests.backends.cluster import shared_cluster

    cluster = shared_cluster()
    prefix = unique_prefix()
    limiter = RateLimiter(cluster.url, key_prefix=prefix)
    limits = limits_of("3/second", "4/minute", "5/hour", "6/day")
    try:
        verdicts = [await limiter.hit("orders", "cc", limits) for _ in range(5)]
    finally:
        await limiter.aclose()
        for port in cluster.ports:
            node = cluster.node(port)
            for key in node.scan_iter(match=f"{prefix}*"):
                node.delete(key)
    assert [v.admitted for v in verdicts] == [True, True, True, False, False]
    assert verdicts[3].retry_after == 1
    assert (verdicts[2].limit, verdicts[2].remaining) == (3, 0)


class _CountersOnly(AsyncStorage):
    """A counter storage of limits' kind without a moving window (as its memcached one)."""

    STORAGE_SCHEME = ["async+kgtest-counters-only"]  # noqa: RUF012 (limits' own attribute)

    @property
    def base_exceptions(self) -> type[Exception]:
        return OSError

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return amount

    async def get(self, key: str) -> int:
        return 0

    async def get_expiry(self, key: str) -> float:
        return 0.0

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        return None

    async def clear(self, key: str) -> None:
        return None


class _MovingInMemory(AsyncMemoryStorage):
    """limits' own in-process storage under a scheme of its own: the generic path (its
    moving-window calls, as for MongoDB), not keyguard's memory:// counter."""

    STORAGE_SCHEME = ["async+kgtest-moving"]  # noqa: RUF012 (limits' own attribute)


async def test_the_generic_path_refuses_without_consuming_in_other_limits() -> None:
    """A storage without the Redis script: the windows of all limits read, a request one
    refuses counts in none; Retry-After is that limit's."""
    limiter = RateLimiter("kgtest-moving://")
    assert not limiter.local
    limits = limits_of("2/minute", "5/hour", "9/day")
    verdicts = [await limiter.hit("orders", "generic", limits) for _ in range(4)]
    assert [(v.admitted, v.limit, v.remaining) for v in verdicts] == [
        (True, 2, 1),
        (True, 2, 0),
        (False, 2, 0),
        (False, 2, 0),
    ]
    assert limiter._scripted is None
    assert 58 <= verdicts[2].retry_after <= 60
    storage = limiter._limiter().storage
    for limit in limits:
        item = limits_item(limit)
        key = item.key_for("orders", "generic")
        assert (await storage.get_moving_window(key, item.amount, item.get_expiry()))[1] == 2
    await limiter.aclose()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://user:hunter2@[::1/0", "Invalid IPv6 URL"),
        ("redis+cluster://:hunter2@[::1", "Invalid IPv6 URL"),
        ("redis://:hunter2@127.0.0.1:6379/0?socket_timeout=abc", "socket_timeout"),
        ("kgtest-counters-only://user:hunter2@host", "no moving window"),
    ],
)
def test_a_counter_storage_url_that_cannot_work_is_a_configuration_error(
    url: str, says: str
) -> None:
    """A URL that urllib or redis-py cannot parse, or a storage limits has no moving window
    for, is refused at start-up as a ConfigurationError saying why, its password masked —
    not a ValueError or NotImplementedError traceback."""
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(url)
    assert says in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_no_part_of_a_counter_storage_password_is_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A counter storage URL whose password holds ``:`` and ``@`` is masked whole in the
    limiter's repr, in the error about a bad URL (``limits``' own message included) and
    in the warning logged when the storage fails."""
    limiter = RateLimiter("redis://user:top:hunter2@127.0.0.1:1/0")
    try:
        assert "hunter2" not in repr(limiter)
        assert "top" not in repr(limiter)
        with pytest.raises(ConfigurationError) as info:
            RateLimiter("nosuch://user:top@hunter2@127.0.0.1:1")
        assert "hunter2" not in str(info.value)
        assert "top" not in str(info.value)
        with caplog.at_level(logging.WARNING, logger="keyguard"):
            await limiter.hit("orders", "client", (RateLimit(10, "minute"),))
        logged = " ".join(record.getMessage() for record in caplog.records)
        assert "user:***@127.0.0.1" in logged  # the warning names the storage, masked
        assert "hunter2" not in logged
        assert "top" not in logged
    finally:
        await limiter.aclose()
