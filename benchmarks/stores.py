"""Opening each store for a benchmark run, seeding it, and cleaning up.

Server URLs come from the same environment variables as the tests
(``KEYGUARD_TEST_POSTGRES_URL``, ``KEYGUARD_TEST_MYSQL_URL``,
``KEYGUARD_TEST_REDIS_URL``), defaulting to this machine's servers. Each
run writes under its own random table or key prefix and removes it after.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from keyguard import KeyManager, KeyStore, open_store
from keyguard.idtags import tag_key_source

SERVER_URLS = {
    "postgres": os.environ.get(
        "KEYGUARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("KEYGUARD_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
    "redis": os.environ.get("KEYGUARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}
BACKENDS = ("memory", "sqlite", "postgres", "mysql", "redis")


@dataclass
class Seeded:
    """A store with an exposed API ``bench`` holding one key of each kind."""

    backend: str
    store: KeyStore
    url: str
    prefix: str
    internal: tuple[bytes, bytes]  # client id, secret
    external: bytes  # client id (no secret)


def reachable(backend: str) -> bool:
    """Whether ``backend``'s server answers (memory and SQLite always do)."""
    if backend not in SERVER_URLS:
        return True
    parts = urlsplit(SERVER_URLS[backend])
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 2):
            return True
    except OSError:
        return False


def store_url(backend: str, workdir: Path) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    return SERVER_URLS[backend]


def open_bench_store(
    backend: str, url: str, prefix: str, *, cache: bool, ttl: float = 1.0
) -> KeyStore:
    """The store for ``backend`` under ``prefix``, with or without keyguard's cache."""
    if backend == "memory":
        return open_store(url)
    options: dict[str, object] = {"cache_ttl": ttl if cache else 0}
    if backend == "redis":
        options["prefix"] = prefix
    else:
        options["table_prefix"] = prefix
    return open_store(url, **options)  # type: ignore[arg-type]


async def seed(
    backend: str, workdir: Path, *, cache: bool, max_keys: int = 5, ttl: float = 1.0
) -> Seeded:
    """Open ``backend`` under a fresh prefix and give it the API ``bench`` and two keys."""
    prefix = (
        f"kgbench_{secrets.token_hex(4)}_"
        if backend != "redis"
        else f"kgbench:{secrets.token_hex(4)}:"
    )
    url = store_url(backend, workdir)
    store = open_bench_store(backend, url, prefix, cache=cache, ttl=ttl)
    manager = KeyManager(store)
    await manager.expose("bench", max_keys_per_kind=max_keys)
    internal = await manager.create_key("bench", name="internal", kind="internal")
    external = await manager.create_key("bench", name="external", kind="external")
    assert internal.secret is not None
    return Seeded(
        backend,
        store,
        url,
        prefix,
        (internal.client_id.encode(), internal.secret.encode()),
        external.client_id.encode(),
    )


async def tag_key_hex(store: KeyStore) -> str:
    """``store``'s client id tag key in hex, for a server process that must accept the ids
    it issued: a memory store there has a tag key of its own unless given this one
    (``KGB_ID_TAG_KEY``, see ``benchmarks.serve``). Never printed."""
    source = tag_key_source(store)
    if source is None:
        raise TypeError(f"{store!r} keeps no client id tag key")
    return (await source.id_tag_key()).hex()


async def drop(seeded: Seeded) -> None:
    """Remove everything the run wrote, and close the store."""
    await seeded.store.aclose()
    await drop_prefix(seeded.backend, seeded.url, seeded.prefix)


async def drop_prefix(backend: str, url: str, prefix: str) -> None:
    if backend == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(url)
        try:
            doomed = [k async for k in client.scan_iter(match=f"{prefix}*", count=10_000)]
            for i in range(0, len(doomed), 10_000):
                await client.delete(*doomed[i : i + 10_000])
        finally:
            await client.aclose()
    elif backend in ("postgres", "mysql"):
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine

        driver = {"postgres": "postgresql+asyncpg", "mysql": "mysql+asyncmy"}[backend]
        engine = create_async_engine(driver + url[url.index("://") :])
        try:
            async with engine.begin() as conn:
                for table in ("keys", "apis", "meta"):
                    await conn.execute(text(f"DROP TABLE IF EXISTS {prefix}{table}"))
        finally:
            await engine.dispose()
