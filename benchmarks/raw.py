"""An uncached store read next to the raw driver's one equivalent query, in one run
(issue #17 item 5): ``python -m benchmarks.raw``.

For each store, one exposed API with one key, and sequential calls of:

- ``lookup``: the store's ``lookup(api, client_id)``, no cache: what every cache miss,
  every ``cache_ttl=0`` deployment and (through ``snapshot``) every refresh pays;
- ``raw``: the same statement, as the store compiles it for its database, sent through
  the bare driver on a connection of its own (asyncpg ``fetchrow``, asyncmy
  ``cursor.execute`` + ``fetchone``, aiosqlite ``execute_fetchall``); on Redis the same
  ``HMGET`` through a bare redis-py client;
- on SQLite also a synchronous ``sqlite3`` select, no thread hop at all.

Rounds interleave the contenders in a new random order; figures are medians over
rounds of the mean µs per call within the round. The ratio is ``lookup ÷ raw``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import report
from benchmarks.stores import SERVER_URLS, drop_prefix, reachable
from keyguard import KeyManager, KeyStore, open_store

Call = Callable[[], Awaitable[object]]
SQL_BACKENDS = ("sqlite", "postgres", "mysql")
ALL = (*SQL_BACKENDS, "redis")


@dataclass
class Setup:
    backend: str
    store: KeyStore
    url: str
    prefix: str
    contenders: dict[str, Call]
    closers: list[Callable[[], Awaitable[None]]]


def _sync(call: Callable[[], object]) -> Call:
    async def run() -> object:
        return call()

    return run


async def _sql(backend: str, workdir: Path) -> Setup:
    from keyguard.stores.sql import SQLStore
    from keyguard.stores.sql._schema import _Schema

    prefix = f"kgraw_{secrets.token_hex(4)}_"
    url = f"sqlite:///{workdir / 'raw.db'}" if backend == "sqlite" else SERVER_URLS[backend]
    store = open_store(url, table_prefix=prefix, cache_ttl=0)
    assert isinstance(store, SQLStore)
    manager = KeyManager(store)
    await manager.expose("bench")
    issued = await manager.create_key("bench", name="bench", kind="external")
    client_id = issued.client_id
    dialect = store.engine.dialect
    compiled = _Schema(prefix, dialect).lookup_key.compile(dialect=dialect)
    sql = str(compiled)
    values = {"api": "bench", "client_id": client_id}
    params = [values[name] for name in compiled.positiontup or ()]

    async def lookup() -> object:
        return await store.lookup("bench", client_id)

    contenders: dict[str, Call] = {"lookup": lookup}
    closers: list[Callable[[], Awaitable[None]]] = []
    if backend == "postgres":
        import asyncpg

        conn = await asyncpg.connect(url.replace("postgresql://", "postgres://", 1))

        async def raw_pg() -> object:
            return await conn.fetchrow(sql, *params)

        contenders["raw asyncpg fetchrow"] = raw_pg
        closers.append(conn.close)
    elif backend == "mysql":
        import asyncmy
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        my = await asyncmy.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 3306,
            user=parsed.username or "root",
            password=parsed.password or "",
            db=parsed.database,
            autocommit=True,
        )

        async def raw_my() -> object:
            async with my.cursor() as cursor:
                await cursor.execute(sql, params)
                return await cursor.fetchone()

        async def close_my() -> None:
            my.close()

        contenders["raw asyncmy execute + fetchone"] = raw_my
        closers.append(close_my)
    else:
        import aiosqlite

        path = str(workdir / "raw.db")
        lite = await aiosqlite.connect(path)
        sync = sqlite3.connect(path)

        async def raw_lite() -> object:
            return await lite.execute_fetchall(sql, params)

        async def close_lite() -> None:
            await lite.close()
            sync.close()

        contenders["raw aiosqlite execute_fetchall"] = raw_lite
        contenders["sync sqlite3 select (no thread)"] = _sync(
            lambda: sync.execute(sql, params).fetchone()
        )
        closers.append(close_lite)
    return Setup(backend, store, url, prefix, contenders, closers)


async def _redis() -> Setup:
    import redis.asyncio as aioredis

    from keyguard.stores.redis._common import _key_fields

    prefix = f"kgraw:{secrets.token_hex(4)}:"
    url = SERVER_URLS["redis"]
    store = open_store(url, prefix=prefix, cache_ttl=0)
    manager = KeyManager(store)
    await manager.expose("bench")
    issued = await manager.create_key("bench", name="bench", kind="external")
    client_id = issued.client_id
    client = aioredis.from_url(url)
    key = f"{prefix}{{bench}}"  # the API's hash (its name in braces: the cluster slot)
    fields = ["exposed", *_key_fields(client_id)]

    async def lookup() -> object:
        return await store.lookup("bench", client_id)

    async def raw() -> object:
        return await client.hmget(key, fields)

    probe = await raw()
    if not isinstance(probe, list) or probe[0] is None:
        raise RuntimeError(f"the API hash {key!r} was not found")
    return Setup(
        "redis",
        store,
        url,
        prefix,
        {"lookup": lookup, "raw redis-py HMGET": raw},
        [client.aclose],
    )


async def _time(call: Call, batch: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(batch):
        await call()
    return (time.perf_counter_ns() - start) / batch / 1000


async def measure(setup: Setup, rounds: int, batch: int) -> dict[str, float]:
    names = list(setup.contenders)
    for name in names:  # warm: connections open, statements prepared
        await _time(setup.contenders[name], max(10, batch // 10))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            samples[name].append(await _time(setup.contenders[name], batch))
    return {name: statistics.median(values) for name, values in samples.items()}


def rows(backend: str, medians: dict[str, float]) -> list[list[str]]:
    lookup = medians["lookup"]
    raw_name = next(name for name in medians if name.startswith("raw"))
    out = []
    for name, value in medians.items():
        ratio = "—" if name == raw_name else f"{value / medians[raw_name]:.2f}x"
        label = f"`{backend}` store `lookup`" if name == "lookup" else name
        out.append([backend, label, report.num(value, 1), ratio])
    out.append([backend, "**lookup ÷ raw**", "", f"**{lookup / medians[raw_name]:.2f}x**"])
    return out


async def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw", description=__doc__)
    parser.add_argument("--stores", default=",".join(ALL), help="comma-separated: " + ",".join(ALL))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=400)
    args = parser.parse_args(argv)
    wanted = [b for b in args.stores.split(",") if b]
    unknown = sorted(set(wanted) - set(ALL))
    if unknown:
        parser.error(f"unknown stores: {', '.join(unknown)}")
    table: list[list[str]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in wanted:
            if not reachable(backend):
                skipped.append(backend)
                continue
            setup = await (_redis() if backend == "redis" else _sql(backend, Path(tmp)))
            try:
                table += rows(backend, await measure(setup, args.rounds, args.batch))
            finally:
                for close in setup.closers:
                    await close()
                await setup.store.aclose()
                if backend != "sqlite":
                    await drop_prefix(backend, setup.url, setup.prefix)
    lines = [
        "#### An uncached read next to the raw driver",
        "",
        f"Machine: {report.machine()}.",
        "",
        f"{args.rounds} interleaved rounds of {args.batch} sequential calls; medians of "
        "the per-round mean, µs per call.",
        "",
        report.table(["store", "call", "µs / call", "÷ raw"], table),
    ]
    if skipped:
        lines += ["", f"Left out (server unreachable): {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(asyncio.run(main(sys.argv[1:])))
