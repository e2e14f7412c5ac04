"""How the test suite opens each kind of store.

``BACKENDS`` names every store the ``store`` fixture runs over. Each backend
module supplies an async context manager that yields an empty store and
removes whatever the test wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from keyguard import KeyStore, MemoryStore

BACKENDS = ("memory", "sqlite", "postgres", "mysql", "redis", "cluster")


@asynccontextmanager
async def open_test_store(backend: str, tmp_path: Path) -> AsyncIterator[KeyStore]:
    """An empty store of kind ``backend``; skipped (or failed, in CI) if its server is down."""
    if backend == "memory":
        memory = MemoryStore()
        try:
            yield memory
        finally:
            await memory.aclose()
        return
    opener: Callable[..., AbstractAsyncContextManager[KeyStore]]
    if backend in ("sqlite", "postgres", "mysql"):
        from tests.backends.sql import open_sql_test_store as opener
    elif backend == "redis":
        from tests.backends.redis import open_redis_test_store as opener
    elif backend == "cluster":  # a local Redis Cluster the suite starts (tests/backends/cluster.py)
        from tests.backends.cluster import open_cluster_test_store as opener
    else:  # pragma: no cover - a typo in BACKENDS
        raise ValueError(f"unknown backend {backend!r}")
    async with opener(backend, tmp_path) as store:
        yield store
