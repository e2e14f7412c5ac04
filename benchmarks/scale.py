"""Does a request cost more when the store holds more keys?

Each store is filled to 10, 10,000 and (without ``--quick``) 1,000,000 keys
and the same request (an internal key, id + secret) is timed, without the
cache, so every request reaches the store. The measured API holds up to
2,000 of the keys; the rest belong to other APIs (each API holds at most
1,000 keys of a kind).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
from pathlib import Path
from typing import Any

from benchmarks import apps, inprocess
from benchmarks.inprocess import Contender
from benchmarks.stores import Seeded, drop, seed
from keyguard import KeyStore
from keyguard.models import KeyKind, KeyRecord, name_key, utcnow
from keyguard.stores import CachedStore

PER_API = 2000  # 1,000 of each kind
FILLER_HASH = "$pbkdf2-sha256$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43


def _filler(total: int) -> dict[str, list[KeyRecord]]:
    """``total`` key records: the first ``PER_API`` for 'bench', the rest in other APIs."""
    by_api: dict[str, list[KeyRecord]] = {}
    now = utcnow()
    for i in range(total):
        # 'bench' already holds the two measured keys (one of each kind).
        bench_room = PER_API - 2
        api = "bench" if i < bench_room else f"filler-{(i - bench_room) // PER_API}"
        kind = KeyKind.INTERNAL if i % 2 else KeyKind.EXTERNAL  # alternate: 999 + 999 in 'bench'
        secret_hash = FILLER_HASH if kind is KeyKind.INTERNAL else None
        by_api.setdefault(api, []).append(
            KeyRecord(api, secrets.token_hex(16), f"filler {i}", kind, secret_hash, now)
        )
    return by_api


def _unwrap(store: KeyStore) -> KeyStore:
    return store.store if isinstance(store, CachedStore) else store


async def fill(seeded: Seeded, total: int) -> None:
    """Add ``total`` keys (minus the two already there) to ``seeded``'s store, fast."""
    store = _unwrap(seeded.store)
    by_api = _filler(max(0, total - 2))
    for api in by_api:
        await store.upsert_api(
            api, exposed=True, max_keys_per_kind=1000, default_max_keys_per_kind=1000
        )
    if seeded.backend in ("sqlite", "postgres", "mysql"):
        await _fill_sql(store, by_api)
    else:
        for records in by_api.values():
            for i in range(0, len(records), 50):
                await asyncio.gather(*(store.insert_key(r) for r in records[i : i + 50]))


async def _fill_sql(store: Any, by_api: dict[str, list[KeyRecord]]) -> None:
    # Benchmark-only bulk load straight into the SQL store's tables (its private
    # schema object): inserting a million keys one transaction at a time would
    # take most of an hour and measure nothing this benchmark is about.
    schema = store._schema
    async with store._engine.begin() as conn:
        for api, records in by_api.items():
            rows = [
                {
                    "client_id": r.client_id,
                    "api": r.api,
                    "name": r.name,
                    "name_key": name_key(r.name),
                    "kind": r.kind.value,
                    "secret_hash": r.secret_hash,
                    "created_at": r.created_at,
                }
                for r in records
            ]
            for i in range(0, len(rows), 5000):
                await conn.execute(schema.keys.insert(), rows[i : i + 5000])
            counts = {k: sum(1 for r in records if r.kind is k) for k in KeyKind}
            await conn.execute(
                schema.apis.update()
                .where(schema.apis.c.name == api)
                .values(
                    internal_count=schema.apis.c.internal_count + counts[KeyKind.INTERNAL],
                    external_count=schema.apis.c.external_count + counts[KeyKind.EXTERNAL],
                )
            )


async def run(
    backends: list[str], workdir: Path, sizes: list[int], *, rounds: int, batch: int
) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    for backend in backends:
        results[backend] = {}
        for size in sizes:
            seeded = await seed(backend, workdir, cache=False, max_keys=1000)
            try:
                await fill(seeded, size)
                c = Contender(
                    f"{backend} {size}",
                    apps.keyguard(seeded.store),
                    [
                        (b"x-ibm-client-id", seeded.internal[0]),
                        (b"x-ibm-client-secret", seeded.internal[1]),
                    ],
                )
                await inprocess.run([c], rounds=max(3, rounds // 3), batch=batch)
                results[backend][size] = statistics.median(c.rounds)
            finally:
                await drop(seeded)
            print(f"scale: {backend} at {size:,} keys: {results[backend][size]:.2f} µs", flush=True)
    return results
