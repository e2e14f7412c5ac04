"""Stores, chosen by URL: ``open_store("memory://")``, ``"sqlite:///keys.db"``, ``"redis://…"``.

``open_store`` does no I/O and needs no event loop: each store connects
lazily, in the loop that first uses it. Adapters for optional drivers are
imported only when their scheme is asked for, so a missing extra is reported
with the command that installs it.
"""

from __future__ import annotations

import re
from typing import Any

from keyguard.errors import ConfigurationError
from keyguard.stores.base import KeyStore
from keyguard.stores.memory import MemoryStore

__all__ = ["KeyStore", "MemoryStore", "open_store"]

_PASSWORD = re.compile(r"(?<=:)[^:@/]*(?=@)")
_SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
_REDIS_SCHEMES = ("redis", "rediss")


def open_store(url: str, **options: Any) -> KeyStore:
    """The store for ``url``; ``options`` go to the adapter (see each adapter's docs).

    ``memory://`` gives a new, independent in-process store on every call.
    Raises ``ConfigurationError`` for an unknown scheme or a missing extra.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"store URL must look like 'scheme://…' (memory://, sqlite:///keys.db, "
            f"postgresql://…, mysql://…, redis://…), got {_redact(url)!r}"
        )
    scheme = url.split("://", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    if base == "memory":
        if options:
            raise ConfigurationError(f"memory:// takes no options, got {sorted(options)}")
        return MemoryStore()
    if base in _SQL_SCHEMES:
        from keyguard.stores.sql import SQLStore

        return SQLStore.from_url(url, **options)
    if base in _REDIS_SCHEMES:
        from keyguard.stores.redis import RedisStore

        return RedisStore.from_url(url, **options)
    raise ConfigurationError(
        f"unknown store scheme {scheme!r}: use memory://, sqlite:///path.db, "
        "postgresql://…, mysql://…, mariadb://…, redis:// or rediss://"
    )


def _redact(url: object) -> str:
    """``url`` with any password masked, for error messages."""
    return _PASSWORD.sub("***", str(url))
