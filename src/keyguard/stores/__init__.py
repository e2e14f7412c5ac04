"""Stores, chosen by URL: ``open_store("memory://")``, ``"sqlite:///keys.db"``, ``"redis://…"``,
``"redis+cluster://…"``.

``open_store`` does no I/O and needs no event loop: each store connects
lazily, in the loop that first uses it. Adapters for optional drivers are
imported only when their scheme is asked for, so a missing extra is reported
with the command that installs it.
"""

from __future__ import annotations

from typing import Any

from keyguard.errors import ConfigurationError
from keyguard.stores._redact import redact
from keyguard.stores.base import ChangeFeed, KeyStore
from keyguard.stores.cache import (
    DEFAULT_CACHE_TTL,
    DEFAULT_MAX_ENTRIES,
    CachedStore,
    check_cache_ttl,
)
from keyguard.stores.memory import MemoryStore

__all__ = ["CachedStore", "ChangeFeed", "KeyStore", "MemoryStore", "open_store"]

_SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
_REDIS_SCHEMES = ("redis", "rediss")
_REDIS_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def open_store(
    url: str,
    *,
    cache_ttl: float | None = DEFAULT_CACHE_TTL,
    cache_size: int = DEFAULT_MAX_ENTRIES,
    **options: Any,
) -> KeyStore:
    """The store for ``url``; ``options`` go to the adapter (see each adapter's docs).

    ``memory://`` gives a new, independent in-process store on every call.
    Every other store is wrapped in a :class:`CachedStore` of ``cache_ttl``
    seconds (at most ``cache_size`` entries) unless ``cache_ttl`` is 0 or
    ``None``: a change made in another process is then seen within
    ``cache_ttl`` seconds (at once on Redis, Redis Cluster and PostgreSQL on
    asyncpg or psycopg 3.2.4+, which announce changes), one made through this store object
    at once. ``memory://`` takes no options. Raises ``ConfigurationError`` for an unknown
    scheme, an unknown option or a missing extra.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"store URL must look like 'scheme://…' (memory://, sqlite:///keys.db, "
            f"postgresql://…, mysql://…, redis://…, redis+cluster://…), got {redact(url)!r}"
        )
    # Checked for every store, memory:// included, so a bad value is never ignored.
    check_cache_ttl(cache_ttl)
    scheme = url.split("://", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    if base == "memory":
        # In-process already: a cache would only add work.
        if options:
            raise ConfigurationError(f"memory:// takes no options, got {sorted(options)}")
        return MemoryStore()
    store: KeyStore
    if base in _SQL_SCHEMES:
        from keyguard.stores.sql import SQLStore

        store = SQLStore.from_url(url, **options)
    elif scheme in _REDIS_CLUSTER_SCHEMES:
        from keyguard.stores.redis_cluster import RedisClusterStore

        store = RedisClusterStore.from_url(url, **options)
    elif base in _REDIS_SCHEMES:
        from keyguard.stores.redis import RedisStore

        store = RedisStore.from_url(url, **options)
    else:
        raise ConfigurationError(
            f"unknown store scheme {scheme!r}: use memory://, sqlite:///path.db, "
            "postgresql://…, mysql://…, mariadb://…, redis://, rediss://, "
            "redis+cluster:// or rediss+cluster://"
        )
    if not cache_ttl:
        return store
    return CachedStore(store, ttl=cache_ttl, max_entries=cache_size)
