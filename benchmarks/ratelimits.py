"""What a rate limit costs a request (SPEC §9): ``python -m benchmarks.ratelimits``.

``KeyGuard`` in front of a minimal raw ASGI app (it sends a response start and a
body, so the rate-limit headers are added as on any response), one memory key
store, three keys alike but for their limits: none, one (``1000000/second``), four
(the same, plus a minute, an hour and a day, none of them ever reached). The
contenders run in a new random order each round; figures are medians over rounds of
the paired per-round differences against the key without limits, so the machine's
drift between rounds cancels out.

* ``memory://`` counters: what counting adds per request, timed in this thread's CPU
  time (``time.thread_time_ns``: on a shared machine, wall time also counts the other
  processes that ran meanwhile — several times the cost here), with, to split it,
  the same key on a ``RateLimiter`` whose ``hit`` counts nothing and answers a fixed
  verdict: what the middleware's part (the call, the two headers) costs alone;
* Redis counters (``--redis URL``, default the test server), in wall time (the round
  trip is mostly waiting): what counting adds,
  next to what one raw redis-py round trip adds in the same place — a ``PING`` and
  an ``EVALSHA`` of a script returning 1, on a client with the rate limiter's own
  options (1 s socket timeouts) — and the ratio of the two.

With ``--limits-storage``, also the evidence for counting ``memory://`` in keyguard's
own counter rather than in ``limits``' ``MemoryStorage``: one check (read the window,
then acquire an entry, what a moving window needs for its headers) timed on each, for
one and for four limits.

Counters go under a fresh key prefix on Redis, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from benchmarks import inprocess, report
from benchmarks.stores import SERVER_URLS, reachable
from keyguard import KeyGuard, KeyManager, MemoryStore
from keyguard.ratelimit import RateLimiter, Verdict

ID = b"x-ibm-client-id"
ONE = ["1000000/second"]
FOUR = ["1000000/second", "10000000/minute", "100000000/hour", "1000000000/day"]
_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
_BODY: Message = {"type": "http.response.body", "body": b"ok"}


class HeadersOnly(RateLimiter):
    """A memory RateLimiter that counts nothing: every request admitted, 999,999 left."""

    _VERDICT = Verdict(True, 1_000_000, 999_999, 0)

    async def hit(self, api: str, client_id: str, limits: Any) -> Verdict:
        return self._VERDICT

    def hit_now(self, api: str, client_id: str, limits: Any) -> Verdict:
        # Without an await, as the memory:// counter is called (RateLimiter.hit_now).
        return self._VERDICT


@dataclass
class Row:
    """A contender: an app and the client id it is asked with."""

    name: str
    app: ASGIApp
    client_id: bytes
    rounds: list[float] = field(default_factory=list)  # µs per request


def minimal_app(before: Callable[[], Awaitable[Any]] | None = None) -> ASGIApp:
    """A raw ASGI app answering 200 ``ok``; ``before`` is awaited first (a Redis call)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if before is not None:
            await before()
        await send(_START)
        await send(_BODY)

    return app


async def _timed(row: Row, batch: int, clock: Callable[[], int] = time.perf_counter_ns) -> float:
    template = inprocess.scope_for([(ID, row.client_id)])
    statuses: list[int] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            statuses.append(message["status"])

    start = clock()
    for _ in range(batch):
        scope = dict(template)
        scope["state"] = {}
        await row.app(scope, inprocess._receive, send)
    elapsed = (clock() - start) / batch / 1000
    if statuses:
        raise RuntimeError(f"{row.name} answered {statuses[0]}: a limit was reached")
    return elapsed


async def run(
    rows: list[Row], *, rounds: int, batch: int, clock: Callable[[], int] = time.perf_counter_ns
) -> None:
    """Warm every row up, then time them ``rounds`` times in a new random order each."""
    for row in rows:
        await _timed(row, max(1, batch // 5))
    order = list(rows)
    for _ in range(rounds):
        random.shuffle(order)
        for row in order:
            gc.collect()
            row.rounds.append(await _timed(row, batch, clock))


def added(row: Row, base: Row) -> float:
    """Median over rounds of (row - base), µs."""
    return statistics.median(r - b for r, b in zip(row.rounds, base.rounds, strict=True))


async def measure(redis_url: str | None, *, rounds: int, batch: int) -> list[str]:
    """Both groups; the report's lines."""
    store = MemoryStore()
    manager = KeyManager(store)
    await manager.expose("bench")
    free = (await manager.create_key("bench", name="free", kind="external")).client_id.encode()
    one = (
        await manager.create_key("bench", name="one", kind="external", rate_limits=ONE)
    ).client_id.encode()
    four = (
        await manager.create_key("bench", name="four", kind="external", rate_limits=FOUR)
    ).client_id.encode()
    out = [f"Machine: {report.machine()}\n"]

    guard = KeyGuard(minimal_app(), store=store, api="bench", rate_limiter="memory://")
    fixed = KeyGuard(minimal_app(), store=store, api="bench", rate_limiter=HeadersOnly())
    memory = [
        Row("key without limits", guard, free),
        Row("1 limit, a RateLimiter counting nothing (the call and headers only)", fixed, one),
        Row("1 limit, memory:// counters", guard, one),
        Row("4 limits, memory:// counters", guard, four),
    ]
    await run(memory, rounds=rounds, batch=batch, clock=time.thread_time_ns)
    base = memory[0]
    out.append(f"### memory:// ({rounds} rounds of {batch:,} requests, thread CPU time)\n")
    out.append(
        report.table(
            ["contender", "µs / request", "added µs over the key without limits"],
            [
                [
                    r.name,
                    report.num(statistics.median(r.rounds)),
                    "—" if r is base else report.num(added(r, base)),
                ]
                for r in memory
            ],
        )
    )
    counting = added(memory[2], memory[1]), added(memory[3], memory[1])
    out.append(
        f"\nThe counting itself (memory:// row - the row counting nothing): "
        f"{report.num(counting[0])} µs with 1 limit, {report.num(counting[1])} µs with 4."
    )
    await guard.aclose()
    if redis_url is None:
        return out

    import redis.asyncio as aioredis

    prefix = f"kgbench-rl:{secrets.token_hex(4)}"
    limiter = RateLimiter(redis_url, key_prefix=prefix)
    # A client with the rate limiter's own options (RateLimiter sets these timeouts).
    raw = aioredis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    trivial = raw.register_script("return 1")
    tag = "{" + secrets.token_hex(4) + "}"
    counted = KeyGuard(minimal_app(), store=store, api="bench", rate_limiter=limiter)
    pinged = KeyGuard(minimal_app(raw.ping), store=store, api="bench")
    scripted = KeyGuard(
        minimal_app(lambda: trivial([f"{prefix}:{tag}"], [1])), store=store, api="bench"
    )
    rows = [
        Row("key without limits", counted, free),
        Row("… + one raw redis-py PING", pinged, free),
        Row("… + one raw redis-py EVALSHA (script returning 1)", scripted, free),
        Row("1 limit, Redis counters", counted, one),
        Row("4 limits, Redis counters", counted, four),
    ]
    redis_batch = max(50, batch // 20)
    try:
        await run(rows, rounds=rounds, batch=redis_batch)
    finally:
        await counted.aclose()
        await raw.aclose()
        async with aioredis.from_url(redis_url) as cleanup:
            doomed = [k async for k in cleanup.scan_iter(match=f"{prefix}:*", count=1000)]
            if doomed:
                await cleanup.delete(*doomed)
    base, ping, evalsha = rows[0], added(rows[1], rows[0]), added(rows[2], rows[0])
    out.append(f"\n### Redis at {_host(redis_url)} ({rounds} rounds of {redis_batch:,} requests)\n")
    out.append(
        report.table(
            ["contender", "µs / request", "added µs", "÷ PING's added", "÷ EVALSHA's added"],
            [
                [
                    r.name,
                    report.num(statistics.median(r.rounds)),
                    "—" if r is base else report.num(added(r, base)),
                    "—" if r is base else report.num(added(r, base) / ping) + "x",
                    "—" if r is base else report.num(added(r, base) / evalsha) + "x",
                ]
                for r in rows
            ],
        )
    )
    return out


def _check_makers(texts: list[str]) -> dict[str, Callable[[], Callable[[], object]]]:
    """Per counter, a factory of a fresh counter's one-check function for ``texts``."""
    from limits.aio.storage import MemoryStorage as AsyncMemoryStorage
    from limits.aio.strategies import MovingWindowRateLimiter
    from limits.storage import MemoryStorage

    from keyguard.models import RateLimit
    from keyguard.ratelimit.items import limits_item
    from keyguard.ratelimit.local import LocalCounter

    limits = tuple(RateLimit(int(n), per) for n, per in (t.split("/") for t in texts))  # type: ignore[arg-type]
    items = [limits_item(x) for x in limits]
    entries = [(item.key_for("bench", "c"), item.amount, item.get_expiry()) for item in items]

    def async_storage() -> Callable[[], object]:
        storage = AsyncMemoryStorage()

        async def check() -> None:
            for entry in entries:
                await storage.get_moving_window(*entry)
            for entry in entries:
                await storage.acquire_entry(*entry)

        return check

    def sync_storage() -> Callable[[], object]:
        storage = MemoryStorage()

        def check() -> None:
            for entry in entries:
                storage.get_moving_window(*entry)
            for entry in entries:
                storage.acquire_entry(*entry)

        return check

    def strategy() -> Callable[[], object]:
        limiter = MovingWindowRateLimiter(AsyncMemoryStorage())

        async def check() -> None:
            for item in items:
                await limiter.hit(item, "bench", "c")

        return check

    def local() -> Callable[[], object]:
        counter = LocalCounter()
        return lambda: counter.hit("bench", "c", limits)

    return {
        "limits' async MemoryStorage, window + acquire": async_storage,
        "limits' sync MemoryStorage, window + acquire": sync_storage,
        "limits' async MovingWindowRateLimiter.hit (no window read)": strategy,
        "keyguard's LocalCounter.hit": local,
    }


async def limits_storage_rows(checks: int = 5000, repeat: int = 5) -> list[list[str]]:
    """µs of thread CPU time per check, best of ``repeat`` runs of ``checks`` checks on a
    fresh counter each: ``limits``' async and sync ``MemoryStorage`` (window, then
    acquire, limit by limit) and its async ``MovingWindowRateLimiter.hit`` (acquire only,
    so no headers), against keyguard's ``LocalCounter``."""
    rows = []
    for label, texts in (("1 limit", ONE), ("4 limits", FOUR)):
        for name, make in _check_makers(texts).items():
            times = []
            for _ in range(repeat):
                check = make()
                start = time.thread_time_ns()
                for _ in range(checks):
                    result = check()
                    if asyncio.iscoroutine(result):
                        await result
                times.append((time.thread_time_ns() - start) / checks / 1000)
            rows.append([f"{label}: {name}", report.num(min(times))])
    return rows


def _host(url: str) -> str:
    return url.split("@")[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis", default=SERVER_URLS["redis"], help="counter Redis URL")
    parser.add_argument("--no-redis", action="store_true", help="memory:// only")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4000, help="requests per round (memory)")
    parser.add_argument(
        "--limits-storage", action="store_true", help="also time limits' MemoryStorage"
    )
    args = parser.parse_args()
    redis_url = None if args.no_redis or not reachable("redis") else args.redis
    lines = asyncio.run(measure(redis_url, rounds=args.rounds, batch=args.batch))
    print("## What a rate limit costs\n")
    print("\n".join(lines))
    if args.limits_storage:
        rows = asyncio.run(limits_storage_rows())
        print("\n### One check, counter alone (thread CPU time, best of 5 runs of 5,000 checks)\n")
        print(report.table(["counter", "µs per check"], rows))


if __name__ == "__main__":
    main()
