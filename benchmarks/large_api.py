"""One API with 10, 100,000 and 1,000,000 keys: does a request through keyguard's cache
cost more, and does the cache grow, with the keys of the API?

For each store (memory always; PostgreSQL and Redis if reachable, at 10 and 100,000 keys
unless ``--full``), one exposed API ``bench`` is filled with N external keys, loaded in
bulk straight through the store (memory, Redis) or as rows (PostgreSQL): inserting a
million keys one rule-checked transaction at a time would measure nothing this is about.
Every size's app (``KeyGuard`` over a ``CachedStore``, ``max_entries`` 10,000, a TTL of
60 s so that the timed hits stay hits across rounds)
is timed in the same rounds, interleaved in a new random order each round:

* **hit, one key**: the same key again and again (answered from the cache);
* **hit, 1,000 keys in turn**: a thousand distinct real keys cycling (all cached);
* **miss, made-up ids**: a new well-formed id per request, with the miss budget lifted
  so each costs its one store read (a 10-key API answers them from its snapshot, with
  no read at all: the ratio that matters for misses is 1,000,000 ÷ 100,000).

Then the bounds: the cache's entries after 20,000 distinct real keys went through
(``max_entries`` 10,000), and the store reads a flood of made-up ids costs per second
at the default miss budget, for a couple of seconds, with a real caller mixed in.

Run:  python -m benchmarks.large_api [--full] [--stores memory,postgres,redis]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import secrets
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Scope

from benchmarks.inprocess import _receive, scope_for, status_of
from benchmarks.stores import SERVER_URLS, drop_prefix, reachable
from keyguard import KeyGuard, KeyStore, MemoryStore
from keyguard.models import KeyKind, KeyRecord, name_key, utcnow
from keyguard.secrets import new_client_id
from keyguard.stores import CachedStore
from keyguard.stores.cache import DEFAULT_MISS_READS_PER_SECOND
from keyguard.stores.cache._entries import MissBudget

ID = b"x-ibm-client-id"
MAX_ENTRIES = 10_000
TTL = 60.0  # long enough that the timed hits stay hits across rounds
CYCLE = 1000


async def ok_app(scope: Scope, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@dataclass
class Size:
    """One API of ``keys`` keys behind its own cache and app."""

    keys: int
    backend: str
    store: KeyStore
    reads: list[int]  # [store lookups so far]
    cached: CachedStore
    app: ASGIApp
    ids: list[str]
    prefix: str = ""
    rounds: dict[str, list[float]] = field(default_factory=dict)


def _records(n: int) -> list[KeyRecord]:
    now = utcnow()
    return [
        KeyRecord("bench", new_client_id(), f"key {i}", KeyKind.EXTERNAL, None, now)
        for i in range(n)
    ]


async def _open(backend: str, prefix: str) -> KeyStore:
    if backend == "memory":
        return MemoryStore()
    if backend == "postgres":
        from keyguard.stores.sql import SQLStore

        return SQLStore.from_url(SERVER_URLS["postgres"], table_prefix=prefix)
    from keyguard.stores.redis import RedisStore

    return RedisStore.from_url(SERVER_URLS["redis"], prefix=prefix)


async def _fill(backend: str, store: Any, records: list[KeyRecord]) -> None:
    """Load ``records`` into the (already created) API 'bench' of ``store``, fast."""
    if backend == "memory":
        for r in records:  # (the memory store never awaits: no tasks needed)
            await store.insert_key(r)
    elif backend == "postgres":
        schema = store._schema if getattr(store, "_schema", None) else None
        if schema is None:  # the schema is made on first use
            await store.get_api("bench")
            schema = store._schema
        async with store._engine.begin() as conn:
            rows = [
                {
                    "client_id": r.client_id,
                    "api": r.api,
                    "name": r.name,
                    "name_key": name_key(r.name),
                    "kind": r.kind.value,
                    "secret_hash": None,
                    "created_at": r.created_at,
                }
                for r in records
            ]
            for i in range(0, len(rows), 5000):
                await conn.execute(schema.keys.insert(), rows[i : i + 5000])
            await conn.execute(
                schema.apis.update()
                .where(schema.apis.c.name == "bench")
                .values(external_count=len(records))
            )
    else:  # redis: the API hash's fields as the insert script writes them
        from keyguard.stores.redis._common import _body

        redis = store.client
        key = store._api_key("bench")
        for i in range(0, len(records), 5000):
            mapping: dict[str, str] = {}
            for seq, r in enumerate(records[i : i + 5000], start=i + 1):
                folded = name_key(r.name)
                mapping[f"k:{r.client_id}"] = json.dumps([seq, *_body(r, folded)])
                mapping[f"n:{folded}"] = r.client_id
            await redis.hset(key, mapping=mapping)
        await redis.hset(key, mapping={"c:external": len(records), "seq": len(records)})


async def _size(backend: str, keys: int) -> Size:
    prefix = (
        f"kgbench:{secrets.token_hex(4)}:" if backend == "redis" else f"kgb_{secrets.token_hex(4)}_"
    )
    store = await _open(backend, prefix)
    await store.upsert_api(
        "bench", exposed=True, max_keys_per_kind=1_000_000, default_max_keys_per_kind=5
    )
    records = _records(keys)
    await _fill(backend, store, records)
    reads = [0]
    inner_lookup = store.lookup

    async def counted(api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        reads[0] += 1
        return await inner_lookup(api, client_id)

    store.lookup = counted  # type: ignore[method-assign]
    cached = CachedStore(store, ttl=TTL, max_entries=MAX_ENTRIES)
    app = KeyGuard(ok_app, store=cached, api="bench", usage_flush=None)
    step = max(1, keys // CYCLE)
    ids = [r.client_id for r in records[::step]][:CYCLE]
    return Size(keys, backend, store, reads, cached, app, ids, prefix)


async def _send(message: Message) -> None:
    pass


async def _time(app: ASGIApp, scopes: list[Scope]) -> float:
    """µs per request over ``scopes``."""
    start = time.perf_counter_ns()
    for template in scopes:
        scope = dict(template)
        scope["state"] = {}
        await app(scope, _receive, _send)
    return (time.perf_counter_ns() - start) / len(scopes) / 1000


def _scopes(ids: list[str]) -> list[Scope]:
    return [scope_for([(ID, i.encode())]) for i in ids]


async def measure(sizes: list[Size], *, rounds: int, batch: int, misses: int) -> None:
    """Interleaved rounds of every workload on every size."""
    for s in sizes:
        s.cached.miss_reads_per_second = 1e9  # every miss is read (timed, not refused)
        s.cached._budget.rate = 1e9
        one = _scopes([s.ids[0]] * batch)
        cycle = _scopes([s.ids[i % len(s.ids)] for i in range(batch)])
        await _time(s.app, one)  # warm up: the API entry, then every key of the cycle
        await _time(s.app, cycle)
        s.rounds = {"hit, one key": [], f"hit, {CYCLE:,} keys in turn": [], "miss": []}
    order = list(sizes)
    for _ in range(rounds):
        random.shuffle(order)
        for s in order:
            gc.collect()
            s.rounds["hit, one key"].append(await _time(s.app, _scopes([s.ids[0]] * batch)))
            turn = [s.ids[i % len(s.ids)] for i in range(batch)]
            s.rounds[f"hit, {CYCLE:,} keys in turn"].append(await _time(s.app, _scopes(turn)))
            made_up = _scopes([new_client_id() for _ in range(misses)])
            s.rounds["miss"].append(await _time(s.app, made_up))


async def bounds(s: Size, seconds: float = 2.0) -> dict[str, float]:
    """The cache's size after 20,000 distinct real keys, and a flood's store reads/s."""
    s.cached.clear()
    many = min(s.keys, 2 * MAX_ENTRIES)
    if s.backend == "memory" and hasattr(s.store, "_apis"):
        real = list(s.store._apis["bench"].keys)[:many]
    else:
        real = s.ids
    for chunk in range(0, len(real), 1000):
        await _time(s.app, _scopes(real[chunk : chunk + 1000]))
    entries = len(s.cached)
    budget = DEFAULT_MISS_READS_PER_SECOND
    s.cached.miss_reads_per_second = budget
    s.cached._budget = MissBudget(budget, s.cached._clock())
    reads_before = s.reads[0]
    refused_before = s.cached.refused_misses
    flood = refused_real = 0
    real_headers = [(ID, s.ids[0].encode())]
    assert await status_of(s.app, real_headers) == 200  # an active caller: cached
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        await _time(s.app, _scopes([new_client_id() for _ in range(100)]))
        flood += 100
        refused_real += await status_of(s.app, real_headers) != 200
    elapsed = time.monotonic() - start
    return {
        "real keys looked up": len(real),
        "cache entries after": entries,
        "flood requests/s": flood / elapsed,
        "store reads/s": (s.reads[0] - reads_before) / elapsed,
        "refused without a read/s": (s.cached.refused_misses - refused_before) / elapsed,
        "real caller's requests refused": refused_real,
    }


async def close(s: Size) -> None:
    await s.cached.aclose()
    if s.backend in ("postgres", "redis"):
        await drop_prefix(s.backend, SERVER_URLS[s.backend], s.prefix)
        if s.backend == "postgres":
            await _drop_extra_tables(s.prefix)


async def _drop_extra_tables(prefix: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    url = SERVER_URLS["postgres"]
    engine = create_async_engine("postgresql+asyncpg" + url[url.index("://") :])
    try:
        async with engine.begin() as conn:
            for table in ("audit", "usage"):
                await conn.execute(text(f"DROP TABLE IF EXISTS {prefix}{table}"))
    finally:
        await engine.dispose()


def _row(name: str, values: list[str]) -> str:
    return "| " + " | ".join([name, *values]) + " |"


async def run_backend(backend: str, counts: list[int], rounds: int, batch: int) -> list[str]:
    sizes: list[Size] = []
    out = [f"\n### {backend}\n"]
    try:
        for n in counts:
            started = time.monotonic()
            sizes.append(await _size(backend, n))
            print(f"large_api: {backend} filled to {n:,} in {time.monotonic() - started:.0f} s")
        misses = max(50, batch // 10)
        await measure(sizes, rounds=rounds, batch=batch, misses=misses)
        workloads = list(sizes[0].rounds)
        out.append(
            "µs per request through KeyGuard with its cache (median over interleaved rounds); "
            f"ratios against the {counts[0]:,}-key API.\n"
        )
        out.append(_row("workload", [f"{n:,} keys" for n in counts] + ["ratios"]))
        out.append("|" + "---|" * (len(counts) + 2))
        for w in workloads:
            medians = [statistics.median(s.rounds[w]) for s in sizes]
            ratios = ", ".join(f"{m / medians[0]:.2f}x" for m in medians[1:])
            out.append(_row(w, [f"{m:.2f}" for m in medians] + [ratios]))
        if len(sizes) >= 3:
            miss = [statistics.median(s.rounds["miss"]) for s in sizes]
            out.append(f"\nmiss, {counts[-1]:,} ÷ {counts[1]:,}: {miss[-1] / miss[1]:.2f}x")
        largest = sizes[-1]
        found = await bounds(largest, seconds=2.0 if backend == "memory" else 1.0)
        out.append(f"\nBounds at {largest.keys:,} keys (max_entries {MAX_ENTRIES:,}):\n")
        for name, value in found.items():
            out.append(f"- {name}: {value:,.0f}")
    finally:
        for s in sizes:
            await close(s)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="1,000,000 keys on servers too")
    parser.add_argument("--stores", default="memory,postgres,redis")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args(argv)
    lines = ["## One large API through the cache (`python -m benchmarks.large_api`)"]
    for backend in args.stores.split(","):
        if not reachable(backend):
            print(f"large_api: {backend} unreachable, skipped")
            continue
        counts = [10, 100_000, 1_000_000]
        if backend != "memory" and not args.full:
            counts = counts[:2]
        lines += asyncio.run(run_backend(backend, counts, args.rounds, args.batch))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
