"""``CachedStore``: a bounded, short-lived cache of the request path's lookups.

A remote store costs a network round trip per request. ``CachedStore`` wraps
any store and remembers each ``lookup`` answer — the API's state and the key,
or the key's absence — for ``ttl`` seconds, in at most ``max_entries``
entries. Everything else (management reads and every write) goes straight to
the wrapped store.

Staleness is bounded three ways:

* a write made through this ``CachedStore`` (so through any ``KeyManager``,
  middleware or management app sharing it) invalidates what it touches before
  it returns: this process sees its own changes at once;
* where the wrapped store has a change feed (``ChangeFeed``: Redis pub/sub),
  changes made by other processes invalidate the entries they touch as soon
  as the notice arrives;
* in every case an entry is used for at most ``ttl`` seconds, the documented
  bound for a change made elsewhere (R7), e.g. when a notice is lost.

Caching absences is what keeps a flood of made-up client ids from becoming
one store round trip per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from keyguard.errors import ConfigurationError
from keyguard.models import Api, KeyRecord
from keyguard.stores.base import ChangeFeed, KeyStore

__all__ = ["DEFAULT_CACHE_TTL", "CachedStore"]

DEFAULT_CACHE_TTL = 1.0
DEFAULT_MAX_ENTRIES = 10_000

logger = logging.getLogger("keyguard")

# (expires at, the API's generation when cached, exposed, record)
_Entry = tuple[float, int, bool, KeyRecord | None]


class CachedStore:
    """Wrap ``store`` with a lookup cache of ``ttl`` seconds and ``max_entries`` entries.

    ``clock`` is the monotonic clock used for expiry (tests pass their own).
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        ttl: float = DEFAULT_CACHE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= 3600:
            raise ConfigurationError("cache ttl must be a number of seconds in (0, 3600]")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError("cache max_entries must be a positive whole number")
        self.store = store
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[tuple[str, str | None], _Entry] = {}
        self._generations: dict[str, int] = {}
        # Bumped by every invalidation: a lookup that raced one is not cached.
        self._epoch = 0
        self._feed = store if isinstance(store, ChangeFeed) else None
        self._watcher: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"CachedStore({self.store!r}, ttl={self.ttl})"

    def __len__(self) -> int:
        return len(self._entries)

    # -- the request path ---------------------------------------------------------------------

    async def lookup(self, api: str, client_id: str | None) -> tuple[bool, KeyRecord | None]:
        """The wrapped store's answer, from the cache while it is fresh."""
        key = (api, client_id)
        entry = self._entries.get(key)
        generation = self._generations.get(api, 0)
        if entry is not None:
            if entry[0] > self._clock() and entry[1] == generation:
                return entry[2], entry[3]
            del self._entries[key]
        if self._feed is not None and self._watcher is None:
            self._start_watching(self._feed)
        epoch = self._epoch
        exposed, record = await self.store.lookup(api, client_id)
        if self._epoch == epoch:
            if len(self._entries) >= self.max_entries:
                # Oldest first: dicts keep insertion order.
                del self._entries[next(iter(self._entries))]
            self._entries[key] = (self._clock() + self.ttl, generation, exposed, record)
        return exposed, record

    # -- invalidation ---------------------------------------------------------------------------

    def invalidate(self, api: str, client_id: str | None = None) -> None:
        """Forget what is cached of ``api`` (``client_id=None``) or of one of its keys."""
        self._epoch += 1
        if client_id is None:
            self._generations[api] = self._generations.get(api, 0) + 1
        else:
            self._entries.pop((api, client_id), None)

    def clear(self) -> None:
        """Forget everything."""
        self._epoch += 1
        self._entries.clear()

    # -- pass-through reads and invalidating writes --------------------------------------------

    async def get_api(self, api: str) -> Api | None:
        return await self.store.get_api(api)

    async def list_apis(self) -> list[Api]:
        return await self.store.list_apis()

    async def get_key(self, api: str, client_id: str) -> KeyRecord | None:
        return await self.store.get_key(api, client_id)

    async def list_keys(self, api: str) -> list[KeyRecord]:
        return await self.store.list_keys(api)

    async def upsert_api(
        self,
        api: str,
        *,
        exposed: bool | None,
        max_keys_per_kind: int | None,
        default_max_keys_per_kind: int,
    ) -> Api:
        try:
            return await self.store.upsert_api(
                api,
                exposed=exposed,
                max_keys_per_kind=max_keys_per_kind,
                default_max_keys_per_kind=default_max_keys_per_kind,
            )
        finally:
            self.invalidate(api)

    async def insert_key(self, record: KeyRecord) -> None:
        try:
            await self.store.insert_key(record)
        finally:
            self.invalidate(record.api, record.client_id)

    async def set_secret_hash(self, api: str, client_id: str, secret_hash: str) -> bool:
        try:
            return await self.store.set_secret_hash(api, client_id, secret_hash)
        finally:
            self.invalidate(api, client_id)

    async def delete_key(self, api: str, client_id: str) -> bool:
        try:
            return await self.store.delete_key(api, client_id)
        finally:
            self.invalidate(api, client_id)

    async def aclose(self) -> None:
        """Stop watching for changes and close the wrapped store."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        self.clear()
        await self.store.aclose()

    # -- the change feed -----------------------------------------------------------------------

    def _start_watching(self, feed: ChangeFeed) -> None:
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(feed), name="keyguard-cache-watch"
        )

    async def _watch(self, feed: ChangeFeed) -> None:
        delay = 0.1

        def ready() -> None:
            nonlocal delay
            delay = 0.1
            # Notices may have been missed while not listening: start afresh.
            self.clear()

        while True:
            try:
                await feed.watch(self.invalidate, on_ready=ready)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("key store change feed lost (%s); retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.ttl)
